"""The benchmark suite: prints one JSON object and appends it to a JSONL file for plotting.

  python -m benchmarks.run [--config paper] [--batch 2] [--what train,separate,data]
                           [--steps 5] [--compare_original [--rounds 3]] [--quick]

Measures, on whatever device JAX sees: compile time, step time (median/min/max after
warm-up), training audio-seconds/s, separation audio-seconds/s for 4 s chunks and for a
3-minute song through the separate command's path (overlap-add), peak host memory (and
device memory on GPU), the data stream's examples/s, and the mel loss's share of the step.
`--compare_original` runs the original PyTorch code's bench (../shared/original/bench.sh)
in the same sitting and adds the speed ratios; with `--rounds N` it alternates ours and the
original N times and reports each round's ratios and their median (on these shared 2-core
machines one side's time swings 10-20 % between minutes, so one pair can mislead).
`--quick` is the CI-safe smoke version.
"""
import argparse
import datetime
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import machine
from rqvae_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_host_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _device_memory():
  import jax
  stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != 'cpu' else None
  if not stats:
    return None
  return {'peak_bytes_in_use_mib': stats.get('peak_bytes_in_use', 0) / 2**20,
          'bytes_limit_mib': stats.get('bytes_limit', 0) / 2**20}


def _timed(fn, steps: int, warmup: int):
  import jax
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  for _ in range(warmup - 1):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return first, times


def bench_train(config, batch: int, steps: int, warmup: int):
  import jax
  from rqvae_jax import parallel, train_state, training
  config = config.copy_and_resolve_references()
  config.batch_size = batch
  mesh = parallel.make_mesh()
  repl = parallel.replicated(mesh)
  state = jax.device_put(train_state.create_train_state(config, jax.random.PRNGKey(0)), repl)
  step = jax.jit(functools.partial(training.train_step, config=config),
                 in_shardings=(repl, parallel.data_sharded(mesh)), out_shardings=(repl, repl),
                 donate_argnums=(0,))
  rng = np.random.default_rng(0)
  host = (0.05 * rng.normal(size=(batch, config.data.segment_samples, 4))).astype(np.float32)
  data = parallel.shard_batch(host, mesh)
  holder = {'state': state}

  def run():
    holder['state'], m = step(holder['state'], data)
    return m['loss/total']

  compile_s, times = _timed(run, steps, warmup)
  seconds = batch * config.data.segment_samples / config.data.sample_rate
  med = float(np.median(times))
  return {'compile_s': round(compile_s - med, 2), 'step_s_median': round(med, 4),
          'step_s_min': round(min(times), 4), 'step_s_max': round(max(times), 4),
          'train_audio_s_per_s': round(seconds / med, 3),
          'train_steps_per_s': round(1 / med, 3)}


def bench_separate(config, batch: int, steps: int, warmup: int, song_seconds: float):
  import jax
  from rqvae_jax import train_state
  from rqvae_jax.separate import Separator, overlap_add
  state = train_state.create_train_state(config, jax.random.PRNGKey(0))
  sep = Separator.from_variables(config, state.variables(use_ema=True))
  rng = np.random.default_rng(0)
  chunks = (0.05 * rng.normal(size=(batch, sep.chunk))).astype(np.float32)
  compile_s, times = _timed(lambda: sep.separate_stems(chunks), steps, warmup)
  med = float(np.median(times))
  out = {'separate_compile_s': round(compile_s - med, 2),
         'separate_chunk_batch': batch,
         'separate_audio_s_per_s': round(batch * sep.chunk / config.data.sample_rate / med, 2)}
  # The same chunks with `inference.in_flight` device calls at once (the separate path).
  in_flight = int(config.inference.in_flight)
  calls = max(steps, 2) * in_flight
  stream = (0.05 * rng.normal(size=calls * batch * sep.chunk)).astype(np.float32)
  fn = sep.separate_stems
  t = time.perf_counter()
  overlap_add(fn, stream, sep.chunk, 0.0, batch, in_flight=in_flight)
  dt = time.perf_counter() - t
  out.update({'separate_in_flight': in_flight,
              'separate_in_flight_audio_s_per_s': round(stream.size / config.data.sample_rate
                                                        / dt, 2)})
  if song_seconds <= 0:                          # later --rounds: chunks only
    return out
  # A whole song through the separate command's path (overlap-add, inference batch size).
  song = (0.05 * rng.normal(size=int(song_seconds * config.data.sample_rate))).astype(np.float32)
  sep(song[:sep.chunk * 2])                      # compile the inference batch shape
  t = time.perf_counter()
  sep(song)
  dt = time.perf_counter() - t
  out.update({'song_seconds': song_seconds, 'song_separate_s': round(dt, 3),
              'song_audio_s_per_s': round(song_seconds / dt, 2),
              'song_overlap': float(config.inference.overlap),
              'song_batch': int(config.inference.batch_size), 'song_in_flight': in_flight})
  return out


def bench_mel_share(config, batch: int, steps: int, warmup: int):
  """The mel loss's share of a training step: 1 - t(step without mel) / t(step)."""
  if not config.loss.mel_weight:
    return {'mel_loss_share': 0.0}
  full = bench_train(config, batch, steps, warmup)['step_s_median']
  no_mel = config.copy_and_resolve_references()
  no_mel.loss.mel_weight = 0.0
  rest = bench_train(no_mel, batch, steps, warmup)['step_s_median']
  return {'mel_loss_share': round(max(0.0, 1 - rest / full), 3),
          'step_s_without_mel': rest}


def bench_data(config, batch: int, quick: bool):
  from benchmarks import data_throughput
  from data import synthetic
  cfg = config.copy_and_resolve_references()
  with tempfile.TemporaryDirectory() as tmp:
    cfg.data.synthetic.cache_dir = tmp
    cfg.data.synthetic.num_train = 4 if quick else 8
    cfg.data.synthetic.num_validation = cfg.data.synthetic.num_test = 1
    cfg.data.synthetic.min_seconds, cfg.data.synthetic.max_seconds = (3.0, 4.0) if quick else (20.0, 30.0)
    root = synthetic.ensure_synthetic(cfg.data)
    r = data_throughput.measure(cfg.data, root, batch, 5 if quick else 30)
  return {'data_examples_per_s': r['examples_per_s']}


def original_bench(batch: int, steps: int):
  script = os.path.join(REPO, '..', 'shared', 'original', 'bench.sh')
  if not os.path.exists(script):
    return {'error': f'{script} not found'}
  # As its users run it: without the glibc tunable this process may have re-executed with
  # (rqvae_jax/hugepages.py; the original was slower with it).
  out = subprocess.run(['bash', script, '--batch', str(batch), '--steps', str(steps)],
                       capture_output=True, text=True, env=hugepages.without_tunable(os.environ))
  lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
  return json.loads(lines[-1]) if lines else {'error': out.stderr[-500:]}


def speed_ratios(ours, original):
  """Ours over the original (>1: ours is faster) for training and separation, where both
  sides have the figure."""
  out = {}
  if 'train_step_s' in original and 'step_s_median' in ours:
    out['train_speedup_vs_original'] = round(original['train_step_s'] / ours['step_s_median'], 2)
  if 'separate_audio_s_per_s' in original and 'separate_audio_s_per_s' in ours:
    out['separate_speedup_vs_original'] = round(
        ours['separate_audio_s_per_s'] / original['separate_audio_s_per_s'], 2)
    if 'separate_in_flight_audio_s_per_s' in ours:
      out['separate_in_flight_speedup_vs_original'] = round(
          ours['separate_in_flight_audio_s_per_s'] / original['separate_audio_s_per_s'], 2)
  return out


def alternate_rounds(rounds: int, ours_fn, original_fn):
  """Runs ours_fn(), original_fn() alternately `rounds` times: each round's figures and
  ratios."""
  out = []
  for _ in range(rounds):
    ours = ours_fn()
    original = original_fn()
    out.append({'ours': ours, 'original': original, **speed_ratios(ours, original)})
  return out


def median_ratios(rounds):
  """Per ratio, the median over the rounds that have it (what the README quotes)."""
  out = {}
  for key in ('train_speedup_vs_original', 'separate_speedup_vs_original',
              'separate_in_flight_speedup_vs_original'):
    values = [r[key] for r in rounds if key in r]
    if values:
      out[key] = round(float(np.median(values)), 2)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='paper', help='variant of configs/rqvae.py')
  ap.add_argument('--batch', type=int, default=2)
  ap.add_argument('--what', default='train,separate,data')
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--song_seconds', type=float, default=180.0)
  ap.add_argument('--mel_share', action='store_true', help='also time the step without mel')
  ap.add_argument('--compare_original', action='store_true')
  ap.add_argument('--rounds', type=int, default=1,
                  help='with --compare_original: alternate ours and the original this many '
                       'times, report the median ratios (the 3-minute song only in the first)')
  ap.add_argument('--quick', action='store_true', help='smoke config, tiny sizes (CI)')
  ap.add_argument('--set', action='append', default=[],
                  help='config override KEY=VALUE (python literal), e.g. model.dtype="bfloat16"')
  ap.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results.jsonl'))
  args = ap.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import ast
  import jax
  import jaxlib
  sys.path.insert(0, REPO)
  from configs.rqvae import get_config
  from rqvae_jax import compilation_cache
  compilation_cache.enable()

  variant = 'smoke' if args.quick else args.config
  config = get_config(variant)
  for item in args.set:
    key, value = item.split('=', 1)
    node = config
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = ast.literal_eval(value)
  steps, warmup = (1, 1) if args.quick else (args.steps, args.warmup)
  song_seconds = 5.0 if args.quick else args.song_seconds
  what = set(args.what.split(','))
  dev = jax.devices()[0]
  result = {
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'device_kind': dev.device_kind, 'platform': dev.platform, 'device_count': jax.device_count(),
      'cpu_count': os.cpu_count(), 'host': platform.node(),
      'cpu_model': machine.cpu_model(), 'cpu_flags': machine.cpu_flags(),
      'code': machine.code_commit(REPO), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''), 'thp_mode': hugepages.thp_mode(),
      'config': variant, 'overrides': args.set, 'batch': args.batch,
      'segment_samples': int(config.data.segment_samples), 'quick': bool(args.quick)}

  def ours(song_seconds: float):
    """Training and separation figures; the song is skipped when song_seconds is 0."""
    r = {}
    if 'train' in what:
      r.update(bench_train(config, args.batch, steps, warmup))
    if 'separate' in what:
      r.update(bench_separate(config, max(args.batch, 1), steps, warmup, song_seconds))
    return r

  result.update(ours(song_seconds))
  if args.mel_share:
    result.update(bench_mel_share(config, args.batch, steps, warmup))
  if 'data' in what:
    result.update(bench_data(config, args.batch, args.quick))
  result['peak_host_mib'] = round(_peak_host_mib(), 1)
  result['device_memory'] = _device_memory()
  if args.compare_original:
    result['original'] = original_bench(args.batch, max(steps, 1))
    ratios = speed_ratios(result, result['original'])
    result.update(ratios)
    if args.rounds > 1:
      first = {'ours': {k: result[k] for k in ('step_s_median', 'separate_audio_s_per_s',
                                               'separate_in_flight_audio_s_per_s') if k in result},
               'original': result['original'], **ratios}
      result['rounds'] = [first] + alternate_rounds(
          args.rounds - 1, lambda: ours(0.0), lambda: original_bench(args.batch, max(steps, 1)))
      result.update(median_ratios(result['rounds']))
  line = json.dumps(result)
  print(line)
  if args.out:
    with open(args.out, 'a') as f:
      f.write(line + '\n')
  return result


if __name__ == '__main__':
  hugepages.reexec_if_useful()
  main()
