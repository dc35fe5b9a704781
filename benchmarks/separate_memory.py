"""Peak memory of the separate command against song length: it must not grow with the song.

  python -m benchmarks.separate_memory [--minutes 1 10] [--config demo]

Generates 44.1 kHz stereo 16-bit WAVs of each length (written block by block), then
separates each one in its own process with `separate.separate_file`, the command's path
(streaming read, soxr streaming resampling, chunked separation, streaming write), and
reports that process's peak resident memory (ru_maxrss) beside its memory before the song
(model built and compiled). Prints one JSON object and appends it to --out.

The model is the `--config` variant (default demo) **randomly initialised** (PRNGKey(0)):
memory depends on the shapes, not the weights, so no trained workdir is needed.
The issue's target (tracker issue 12): the 10-minute file's peak <= 1.25x the 1-minute
file's, and <= 2 GiB, on CPU with the demo model.
"""
import argparse
import datetime
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 44100


def write_song(path: str, seconds: float, block: int = 1 << 16, seed: int = 0) -> int:
  """A stereo 16-bit WAV of `seconds` (tones, a beat and noise), written block by block."""
  import soundfile as sf
  n = int(round(seconds * RATE))
  rng = np.random.default_rng(seed)
  with sf.SoundFile(path, 'w', RATE, 2, subtype='PCM_16') as f:
    for start in range(0, n, block):
      t = (start + np.arange(min(block, n - start))) / RATE
      bass = 0.25 * np.sin(2 * np.pi * 55 * t)
      lead = 0.15 * np.sin(2 * np.pi * 440 * t + 3 * np.sin(2 * np.pi * 0.5 * t))
      beat = 0.3 * np.exp(-30 * (t % 0.5)) * rng.standard_normal(len(t))
      f.write(np.stack([bass + lead + beat, bass + 0.8 * lead + beat], -1))
  return n


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(path: str, variant: str, out_dir: str) -> dict:
  """Separates `path` in this process; returns its peak memory before and after the song."""
  import jax
  from configs.rqvae import get_config
  from rqvae_jax import separate, train_state
  config = get_config(variant)
  state = train_state.create_train_state(config, jax.random.PRNGKey(0))
  sep = separate.Separator.from_variables(config, state.variables(use_ema=True))
  del state
  warm = np.zeros((config.inference.batch_size, sep.chunk), np.float32)
  sep.separate_chunks(warm)                                   # compile before measuring
  before = _rss_mib()
  t = time.perf_counter()
  report = separate.separate_file(sep, path, out_dir, config.data.stems, show_progress=False)
  seconds = time.perf_counter() - t
  return {'frames': report['frames'], 'rss_before_song_mib': round(before, 1),
          'peak_rss_mib': round(_rss_mib(), 1), 'separate_s': round(seconds, 1),
          'audio_s_per_s': round(report['frames'] / RATE / seconds, 2),
          'residual_db': report['residual_db']}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--minutes', type=float, nargs='+', default=[1.0, 10.0])
  ap.add_argument('--config', default='demo', help='variant of configs/rqvae.py')
  ap.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'separate_memory.jsonl'))
  ap.add_argument('--child', help=argparse.SUPPRESS)          # internal: one measurement
  args = ap.parse_args(argv)
  if args.child:
    with tempfile.TemporaryDirectory() as out_dir:
      print(json.dumps(child(args.child, args.config, out_dir)))
    return 0
  import jax
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for minutes in args.minutes:
      path = os.path.join(tmp, f'song_{minutes:g}min.wav')
      write_song(path, minutes * 60)
      proc = subprocess.run([sys.executable, '-m', 'benchmarks.separate_memory', '--child',
                             path, '--config', args.config], cwd=REPO, capture_output=True,
                            text=True, check=False)
      if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f'separating the {minutes:g}-minute file failed.')
      runs.append({'minutes': minutes, **json.loads(proc.stdout.strip().splitlines()[-1])})
      os.remove(path)
  result = {
      'benchmark': 'separate_memory',
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'host': platform.node(), 'cpu_model': machine.cpu_model(),
      'cpu_flags': machine.cpu_flags(), 'cpu_count': os.cpu_count(),
      'platform': jax.default_backend(), 'jax': jax.__version__,
      'config': args.config, 'weights': 'random init (PRNGKey(0)): memory depends on shapes',
      'input': '44.1 kHz stereo PCM_16 WAV', 'runs': runs}
  if len(runs) >= 2:
    short, long_ = runs[0], runs[-1]
    ratio = long_['peak_rss_mib'] / short['peak_rss_mib']
    result.update({'peak_ratio_longest_to_shortest': round(ratio, 3),
                   'meets_target': bool(ratio <= 1.25 and long_['peak_rss_mib'] <= 2048)})
  line = json.dumps(result)
  print(line)
  if args.out:
    with open(args.out, 'a') as f:
      f.write(line + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
