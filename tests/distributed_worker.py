"""One process of tests/test_distributed.py: a smoke training run, then its resume.

  python -m tests.distributed_worker --workdir DIR --out FILE.json --steps 2,4
      [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I] [--local-devices 2]

With --coordinator, the process joins a multi-process JAX runtime through the project's own
entry (`parallel.maybe_initialize_distributed`, from the JAX_COORDINATOR_* variables, bound
to the loopback address only; CPU collectives over gloo). Without it, a single process with
--local-devices fake CPU devices runs the same global batch on the same 2-device mesh: the
reference. The process trains `training.train_and_evaluate` to the first step count, then
calls it again with the second on the same workdir (a real resume: the state comes back from
the Orbax checkpoint on disk), and writes as JSON: the losses it logged per step, the
validations, which training examples it read (global index per step, and a checksum of each
window), and a digest of the final parameters (their values in an .npz beside FILE.json).
"""
import argparse
import json
import os
import sys
import time
import zlib


def _record_reads(pipeline, log):
  """Wraps `pipeline.read_example` (looked up at call time by the tf.data map) to log
  (seed, step, global index, crc32 of the window) of every example this process reads."""
  original = pipeline.read_example

  def read_example(tracks, frames, segment, shift, seed, step, index, stems, faults):
    data = original(tracks, frames, segment, shift, seed, step, index, stems, faults)
    log.append((int(seed), int(step), int(index), zlib.crc32(data.tobytes())))
    return data

  pipeline.read_example = read_example


def _record_scalars(metric_writers, log):
  """Wraps the writers train_and_evaluate creates to keep every scalar it writes."""
  create = metric_writers.create_default_writer

  def create_default_writer(*args, **kwargs):
    writer = create(*args, **kwargs)
    write = writer.write_scalars

    def write_scalars(step, scalars):
      log.append({'step': int(step), **{k: float(v) for k, v in scalars.items()}})
      return write(step, scalars)

    writer.write_scalars = write_scalars
    return writer

  metric_writers.create_default_writer = create_default_writer


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--out', required=True)
  ap.add_argument('--steps', default='2,4', help='train to the first count, then resume to the next')
  ap.add_argument('--coordinator', default='')
  ap.add_argument('--num-processes', type=int, default=1)
  ap.add_argument('--process-id', type=int, default=0)
  ap.add_argument('--local-devices', type=int, default=1)
  ap.add_argument('--synthetic-dir', required=True)
  ap.add_argument('--small-graph', action='store_true',
                  help="conftest.SMALL_GRAPH: the smoke model's layer kinds, half the compile")
  args = ap.parse_args(argv)

  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if args.local_devices > 1:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.local_devices}')
  if args.coordinator:
    port = args.coordinator.rsplit(':', 1)[1]
    os.environ.update({'JAX_COORDINATOR_ADDRESS': args.coordinator,
                       'JAX_NUM_PROCESSES': str(args.num_processes),
                       'JAX_PROCESS_ID': str(args.process_id),
                       # jax binds the coordinator to every address by default.
                       'JAX_COORDINATOR_BIND_ADDRESS': f'127.0.0.1:{port}'})
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import numpy as np
  from clu import metric_writers
  from rqvae_jax import bundled, compilation_cache, parallel, training
  from tests.conftest import SMALL_GRAPH, smoke_config

  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  parallel.maybe_initialize_distributed()
  compilation_cache.enable()
  pipeline = bundled.data_module('pipeline')
  reads, scalars = [], []
  _record_reads(pipeline, reads)
  _record_scalars(metric_writers, scalars)

  import pathlib
  cfg = smoke_config(pathlib.Path(args.synthetic_dir).parent)
  cfg.data.synthetic.cache_dir = args.synthetic_dir
  if args.small_graph:
    cfg.update_from_flattened_dict(SMALL_GRAPH)
  cfg.data.num_parallel_reads = 1        # reads in order: the log is easy to compare
  if os.environ.get('RQVAE_WORKER_STACKS'):     # debugging a stall: every thread's stack
    import faulthandler
    faulthandler.dump_traceback_later(float(os.environ['RQVAE_WORKER_STACKS']), repeat=True)
  t0 = time.time()
  timings = []
  for steps in [int(s) for s in args.steps.split(',')]:
    cfg.num_train_steps = steps
    state = training.train_and_evaluate(cfg, args.workdir)
    timings.append(round(time.time() - t0, 1))

  # Replicated: every process holds the whole state on its own device.
  params = jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), state.params)
  leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  np.savez(args.out + '.npz', **leaves)
  val = []
  if jax.process_index() == 0:           # the main process records the validations
    with open(os.path.join(args.workdir, 'val_history.jsonl')) as f:
      val = [json.loads(line) for line in f if line.strip()]
  result = {'process_index': jax.process_index(), 'process_count': jax.process_count(),
            'device_count': jax.device_count(), 'local_devices': jax.local_device_count(),
            'step': int(np.asarray(state.step.addressable_data(0))),
            'seconds': timings, 'reads': reads, 'scalars': scalars, 'val': val}
  with open(args.out, 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  main()
