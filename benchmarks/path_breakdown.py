"""Where a trained model's separation comes from: SI-SDRi with one path of the model cut.

  python -m benchmarks.path_breakdown --workdir runs/demo [--split test] [--every 4]

Scores the protocol's windows (every `--every`-th kept window of the split, each separated
alone, eval mode, the checkpoint's EMA codebooks) four ways (`RQVAE.forward_path`): the
full forward pass, the unquantized latent (quantizer bypassed), the skips alone (latent
zeroed) and the codes alone (skips zeroed). Prints one JSON object: mean SI-SDRi over
non-silent reference stems per path and stem, beside the all-zero baseline. If 'skips_only'
matches 'full', the latent path carries nothing; if 'unquantized' matches 'full', the
quantizer costs nothing.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from benchmarks import machine

PATHS = ('full', 'unquantized', 'skips_only', 'codes_only')


def breakdown(workdir: str, split: str = 'test', every: int = 4, checkpoint='best',
              batch_size: int = 8):
  import jax
  import jax.numpy as jnp
  from data import pipeline, slakh, windows as windows_lib
  from rqvae_jax import metrics
  from rqvae_jax.model import RQVAE, next_valid_length
  from rqvae_jax.separate import Separator

  sep = Separator.from_workdir(workdir, checkpoint)
  cfg = sep.config
  tracks = slakh.scan(pipeline.resolve_root(cfg.data), split, cfg.data, verbose=False).kept
  ev = windows_lib.eval_windows(tracks, cfg.data)
  picked = list(range(0, len(ev.windows), max(1, every)))
  window = int(cfg.data.eval_window_samples)
  length = next_valid_length(window, cfg.model)
  model = RQVAE(cfg.model)
  from rqvae_jax import bottleneck
  paths = PATHS if bottleneck.has_codes(cfg.model) else tuple(p for p in PATHS
                                                              if p != 'unquantized')
  fns = {p: jax.jit(lambda v, x, p=p: model.apply(v, x, p, method=RQVAE.forward_path))
         for p in paths}
  scores = {p: [] for p in paths + ('all_zero',)}
  active = ev.active[picked]
  for b in range(0, len(picked), batch_size):
    idx = picked[b:b + batch_size]
    stems = np.stack([pipeline.load_stems(tracks[t], s, window, cfg.data.stems)
                      for t, s in (ev.windows[i] for i in idx)]).astype(np.float32)
    mix = stems.sum(-1)
    padded = np.pad(mix, ((0, 0), (0, length - window)))
    for p in paths:
      est = np.asarray(fns[p](sep.variables, jnp.asarray(padded)))[:, :window]
      scores[p].append(np.asarray(metrics.si_sdr_improvement(stems, est, mix)))
    scores['all_zero'].append(np.asarray(metrics.si_sdr_improvement(stems, 0 * stems, mix)))
  out = {'workdir': workdir, 'split': split, 'step': int(sep.step), 'windows': len(picked),
         'cpu': machine.cpu_model(), 'cpu_flags': machine.cpu_flags(),
         'date': time.strftime('%Y-%m-%d %H:%M'), 'nonsilent': {}}
  for p, values in scores.items():
    v = np.concatenate(values)
    per_stem = {s: float(np.mean(v[active[:, i], i])) for i, s in enumerate(cfg.data.stems)}
    out['nonsilent'][p] = {'mean': float(np.mean(v[active])), **per_stem}
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--split', default='test')
  parser.add_argument('--every', type=int, default=4, help='score every k-th kept window')
  parser.add_argument('--checkpoint', default='best')
  args = parser.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  result = breakdown(args.workdir, args.split, args.every, args.checkpoint)
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  sys.exit(main() and 0)
