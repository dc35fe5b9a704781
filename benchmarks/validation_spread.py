"""How noisy is a validation SI-SDRi mean over a subset of windows? A measurement, not a test.

    python -m benchmarks.validation_spread [--config paper] [--split validation] [--subset 128]

The plateau rule halves the lr when validation SI-SDRi improved by less than 0.05 dB between
two evaluations; that needs a validation mean whose standard error is well below 0.05 dB.
Without a trained model's per-window scores, the spread of window difficulty is measured
with the baselines on the protocol windows of a split: the all-zero estimate's SI-SDRi is
-SI-SDR(mixture, stem), which varies from window to window with how loud each stem is in the
mixture (the mixture/4 baseline has SI-SDRi 0 on every window by scale invariance, so it
carries no spread). A model's per-window SI-SDRi follows the same difficulty.

Prints one JSON object: per-window std of the mean over non-silent stems, the standard error
std / sqrt(n) for the subset size and for the whole split, and the std of the validation
metric itself (mean over stems of per-stem means over windows) over random subsets.
"""
import argparse
import json

import numpy as np

from configs.rqvae import get_config
from data import pipeline, slakh, windows as windows_lib
from rqvae_jax import metrics


def per_window_baseline(config, split: str):
  """(all-zero SI-SDRi (W, S), active (W, S)) over the split's protocol windows."""
  d = config.data
  tracks = slakh.scan(pipeline.resolve_root(d), split, d).kept
  ev = windows_lib.eval_windows(tracks, d)
  values = []
  for t, start in ev.windows:
    stems = pipeline.load_stems(tracks[t], start, d.eval_window_samples, d.stems)[None]
    mix = stems.sum(-1)
    values.append(np.asarray(metrics.si_sdr_improvement(stems, np.zeros_like(stems), mix))[0])
  return np.stack(values), np.asarray(ev.active, bool)


def validation_metric(values, active) -> float:
  """What `validation.validate` reports: mean over stems of the per-stem mean over windows."""
  per_stem = [values[active[:, s], s].mean() for s in range(values.shape[1])
              if active[:, s].any()]
  return float(np.mean(per_stem))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='paper')
  parser.add_argument('--split', default='validation')
  parser.add_argument('--subset', type=int, default=128)
  parser.add_argument('--draws', type=int, default=2000)
  args = parser.parse_args()
  config = get_config(args.config)
  values, active = per_window_baseline(config, args.split)
  per_window = np.array([v[a].mean() for v, a in zip(values, active)])
  std = float(np.std(per_window, ddof=1))
  n = len(per_window)
  rng = np.random.default_rng(0)
  subset = min(args.subset, n)
  draws = [validation_metric(values[i], active[i]) for i in
           (rng.choice(n, subset, replace=False) for _ in range(args.draws))]
  # Subsets without replacement from a finite split: the finite-population correction.
  fpc = np.sqrt((n - subset) / max(n - 1, 1))
  print(json.dumps({
      'split': args.split, 'windows': n, 'subset': subset,
      'per_window_std_db': std,
      'standard_error_subset_db': std / np.sqrt(subset),
      'standard_error_subset_finite_split_db': std / np.sqrt(subset) * fpc,
      'metric_std_over_random_subsets_db': float(np.std(draws)),
      'standard_error_whole_split_db': std / np.sqrt(n),
      'all_zero_validation_metric_db': validation_metric(values, active),
  }, indent=2))


if __name__ == '__main__':
  main()
