"""Throughput of the training stream: random 4 s stem windows read from WAV files.

    python -m benchmarks.data_throughput [--batch 2] [--batches 30] [--root ROOT]
                                         [--config paper] [--compare-tfds]

Prints one JSON object. Without --root, a small synthetic set (8 training tracks of
20-40 s) is generated in a temporary folder. The first batch (tf.data start-up) is timed
separately; `cpu_ms_per_example` is the process CPU time (all threads) per example, i.e.
what the stream takes away from a training step running beside it.

With --compare-tfds the same windows are also read from TFDS records (the train split of
`synthetic_slakh` with include_train=True: disjoint 4 s windows, shuffled) to show which
source is faster for training.

Measured on the 2-core CPU machine (shared with other jobs, load average ~3, warm page
cache, 8 synthetic tracks, 4 s windows):

    --batch 2 --batches 30:   247 examples/s, 4.1 ms CPU/example; a 0.5 s training step
                              needs 4 examples/s (62x headroom, 1.6% of the step's CPU)
    --batch 16 --batches 20:  351 examples/s, 2.9 ms CPU/example (WAV)
                              1411 examples/s, 0.7 ms CPU/example (TFDS records)

The stream is not the bottleneck of a training step; see data/tfds/builders.py for why
training still reads WAVs rather than records.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

from configs import rqvae
from data import pipeline
from data import slakh
from data import synthetic


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _time_iterator(it, batch_size: int, num_batches: int) -> dict:
  t = time.perf_counter()
  next(it)
  startup = time.perf_counter() - t
  cpu, t = _cpu_seconds(), time.perf_counter()
  for _ in range(num_batches):
    next(it)
  seconds = time.perf_counter() - t
  examples = batch_size * num_batches
  return dict(examples_per_s=round(examples / seconds, 2),
              batches_per_s=round(num_batches / seconds, 2), seconds=round(seconds, 3),
              startup_s=round(startup, 3),
              cpu_ms_per_example=round(1e3 * (_cpu_seconds() - cpu) / examples, 2))


def _machine() -> dict:
  return dict(device='cpu (tf.data on CPU; GPUs hidden from TensorFlow)',
              cpu_count=os.cpu_count(), platform=platform.platform(),
              python=platform.python_version(),
              load_average_1min=round(os.getloadavg()[0], 2))


def measure(data_config, root: str, batch_size: int, num_batches: int, seed: int = 0,
            step_seconds: float = 0.5) -> dict:
  """Examples/s of `pipeline.train_batches` over the train split of `root`.

  `step_seconds` is the duration of a training step at this batch size; the result says
  how many times faster than that the stream delivers (`headroom`) and which fraction of
  a step's time its CPU work takes (`cpu_fraction_of_step`, all threads, one core).
  """
  tracks = slakh.scan(root, 'train', data_config, verbose=False).kept
  it = pipeline.train_batches(data_config, tracks, batch_size, seed)
  result = dict(source='wav', **_time_iterator(it, batch_size, num_batches))
  result.update(batch_size=batch_size, num_batches=num_batches,
                segment_samples=int(data_config.segment_samples),
                sample_rate=int(data_config.sample_rate), tracks=len(tracks),
                num_parallel_reads=int(data_config.num_parallel_reads), **_machine())
  result.update(
      assumed_step_seconds=step_seconds,
      headroom=round(result['examples_per_s'] * step_seconds / batch_size, 1),
      cpu_fraction_of_step=round(result['cpu_ms_per_example'] * batch_size
                                 / (1e3 * step_seconds), 4))
  return result


def measure_tfds(data_config, data_dir: str, batch_size: int, num_batches: int,
                 seed: int = 0) -> dict:
  """Examples/s reading shuffled training windows from TFDS records instead."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import data.tfds as data_tfds  # pylint: disable=g-import-not-at-top
  tf = pipeline.import_tf()
  t = time.perf_counter()
  builder = data_tfds.eval_builder(data_config, data_dir=data_dir, include_train=True)
  build = time.perf_counter() - t
  segment = int(data_config.segment_samples)
  ds = builder.as_dataset(split='train', shuffle_files=False,  # ordered dataset
                          read_config=tfds.ReadConfig(shuffle_seed=seed))
  ds = ds.map(lambda ex: ex['stems'][:segment], num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.shuffle(256, seed=seed).repeat().batch(batch_size, drop_remainder=True).prefetch(2)
  result = dict(source='tfds', **_time_iterator(ds.as_numpy_iterator(), batch_size,
                                                  num_batches))
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(builder.data_dir) for f in files)
  result.update(build_s=round(build, 2), records_mb=round(size / 2 ** 20, 1),
                train_windows=builder.info.splits['train'].num_examples)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--root', default='', help='prepared folder (default: temp synthetic)')
  parser.add_argument('--config', default='paper', help='variant of configs/rqvae.py')
  parser.add_argument('--tracks', type=int, default=8, help='synthetic training tracks')
  parser.add_argument('--compare-tfds', action='store_true')
  parser.add_argument('--step-seconds', type=float, default=0.5,
                      help='training step time to compare with (batch 2 x 4 s: 0.5-1.5 s)')
  args = parser.parse_args(argv)
  data_config = rqvae.get_config(args.config).data
  tmp = tempfile.mkdtemp(prefix='rqvae_data_bench_')
  try:
    root = args.root
    if not root:
      data_config.synthetic.cache_dir = tmp
      data_config.synthetic.num_train = args.tracks
      data_config.synthetic.num_validation = 1
      data_config.synthetic.num_test = 1
      t = time.perf_counter()
      root = synthetic.ensure_synthetic(data_config)
      generate_s = time.perf_counter() - t
    result = measure(data_config, root, args.batch, args.batches,
                     step_seconds=args.step_seconds)
    if not args.root:
      result['synthetic_generation_s'] = round(generate_s, 2)
    if args.compare_tfds:
      if args.root:
        data_config.root = args.root
      result['tfds'] = measure_tfds(data_config, os.path.join(tmp, 'tfds'), args.batch,
                                    args.batches)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
