"""The evaluation protocol over a split: SI-SDRi per stem, baselines, codebook usage.

MSDM's protocol (the default, `eval.mode='track'`): whole tracks are separated (chunked
overlap-add), then scored on 4 s windows with a 2 s hop, keeping windows with at least two
non-silent stems. `eval.mode='window'` is the original RQ-VAE code's variant: each window is
separated on its own. Two figures are reported: the MSDM-compatible mean over every stem of
every kept window, and the mean over non-silent reference stems only (a silent reference
rewards a quiet estimate with up to ~+100 dB, so an all-zero separator scores high on the
first; the all-zero and mixture/4 baselines are printed beside the model for that reason).
The absolute SI-SDR of the estimates (`sisdr_abs`, same two figures) is reported beside the
improvement: SI-SDRi = SI-SDR(estimate) - SI-SDR(mixture), and the mixture/4 baseline's
absolute SI-SDR is that second term. Code counts (perplexity, used codes) cover the chunks
of the split only (of every pass, with `inference.shifts` > 1), not the all-zero rows that
fill a last batch.
"""
import json
import os
import sys
import time
from typing import Any, Dict, Union

import ml_collections
import numpy as np

from rqvae_jax import audio as audio_lib
from rqvae_jax import bottleneck
from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import metrics as metrics_lib
from rqvae_jax.separate import Separator, config_shift_delays, overlap_add


def _summary(values: np.ndarray, active: np.ndarray, stems) -> Dict[str, Any]:
  """values (W, S) SI-SDRi; active (W, S) -> MSDM and non-silent means/medians per stem."""
  out = {}
  for name, mask in (('msdm', np.ones_like(active, bool)), ('nonsilent', active)):
    per_stem = {s: (float(np.mean(values[mask[:, i], i])) if mask[:, i].any() else None)
                for i, s in enumerate(stems)}
    median = {s: (float(np.median(values[mask[:, i], i])) if mask[:, i].any() else None)
              for i, s in enumerate(stems)}
    picked = values[mask]
    out[name] = {'per_stem_mean': per_stem, 'per_stem_median': median,
                 'mean': float(np.mean(picked)) if picked.size else None,
                 'median': float(np.median(picked)) if picked.size else None,
                 'mean_over_stems': float(np.mean([v for v in per_stem.values() if v is not None]))
                 if any(v is not None for v in per_stem.values()) else None,
                 'count': int(mask.sum())}
  return out


def _leakage_summary(leak: np.ndarray, active: np.ndarray, stems) -> Dict[str, Dict[str, Any]]:
  """leak (W, S, S) cos^2 [estimate, reference] -> {estimate: {reference: mean}}, averaged
  over the windows where that reference is not silent."""
  out = {}
  for i, est_name in enumerate(stems):
    out[est_name] = {ref_name: (float(np.mean(leak[active[:, j], i, j])) if active[:, j].any()
                                else None) for j, ref_name in enumerate(stems)}
  return out


def _sisdri(ref, est, mix):
  return np.asarray(metrics_lib.si_sdr_improvement(ref, est, mix))


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str = 'test',
             checkpoint: Union[str, int] = 'best', verbose: bool = True) -> Dict[str, Any]:
  """Runs the protocol and writes workdir/eval/<split>/metrics.json and example WAVs."""
  from rqvae_jax import bundled
  pipeline, slakh = bundled.data_module('pipeline'), bundled.data_module('slakh')
  windows_lib = bundled.data_module('windows')
  from rqvae_jax import train_state

  separator = Separator.from_workdir(workdir, checkpoint, config)
  config = separator.config
  data_cfg = config.data
  stems = tuple(data_cfg.stems)
  root = pipeline.resolve_root(data_cfg)
  tracks = slakh.scan(root, split, data_cfg, verbose=verbose).kept
  if config.eval.max_tracks:
    tracks = tracks[:config.eval.max_tracks]
  ev = windows_lib.eval_windows(tracks, data_cfg, verbose=verbose)
  if not ev.windows:
    raise ValueError(f'No evaluation window of split {split!r} has {data_cfg.min_active_stems} '
                     'active stems; nothing to score.')
  window = int(data_cfg.eval_window_samples)
  mode = config.eval.mode
  if mode not in ('track', 'window'):
    raise ValueError(f"eval.mode must be 'track' or 'window', got {mode!r}.")
  if mode == 'window' and window != separator.chunk:
    raise ValueError(f'eval.mode=window needs eval_window_samples ({window}) == '
                     f'inference.chunk_samples ({separator.chunk}).')

  # Track mode averages inference.shifts passes over shifted chunk grids (the separate
  # command's --shifts); window mode separates each window once, alone, as the original.
  delays = config_shift_delays(config)
  out_dir = os.path.join(workdir, 'eval', split)
  os.makedirs(os.path.join(out_dir, 'examples'), exist_ok=True)
  q = config.model.quantizer
  has_codes = bottleneck.has_codes(config.model)
  counts = np.zeros((q.num_quantizers, q.codebook_size) if has_codes else (0, 0), np.int64)
  model_vals, zero_vals, mix4_vals, leak_vals = [], [], [], []
  abs_vals = {'model': [], 'all_zero': [], 'mixture_over_4': []}
  by_track: Dict[int, list] = {}
  for w, (t, start) in enumerate(ev.windows):
    by_track.setdefault(t, []).append((w, start))
  examples_written = 0
  t0 = time.time()
  for done, (t, items) in enumerate(sorted(by_track.items())):
    track = slakh.load_track(tracks[t], stems)
    mixture = track.sum(-1)
    if mode == 'track':
      chunk_counts = []

      def fn(batch, num_rows):
        est, c = separator.separate_chunks(batch, num_rows)
        chunk_counts.append(c)
        return est

      estimate = overlap_add(fn, mixture, separator.chunk, config.inference.overlap,
                             config.inference.batch_size, in_flight=config.inference.in_flight,
                             pass_num_rows=True, delays=delays)
      counts += np.sum(chunk_counts, axis=0).astype(np.int64)
    padded_len = max(s for _, s in items) + window
    pad = lambda x: np.pad(x, [(0, max(0, padded_len - x.shape[0]))] + [(0, 0)] * (x.ndim - 1))
    ref_all, mix_all = pad(track), pad(mixture)
    refs = np.stack([ref_all[s:s + window] for _, s in items])
    mixes = np.stack([mix_all[s:s + window] for _, s in items])
    if mode == 'track':
      est_all = pad(estimate)
      ests = np.stack([est_all[s:s + window] for _, s in items])
    else:
      ests = []
      for b in range(0, len(mixes), config.inference.batch_size):
        chunk = mixes[b:b + config.inference.batch_size]
        full = np.zeros((config.inference.batch_size, window), np.float32)
        full[:len(chunk)] = chunk
        est, c = separator.separate_chunks(full, len(chunk))
        ests.append(est[:len(chunk)])
        counts += c.astype(np.int64)
      ests = np.concatenate(ests)
    zeros = np.zeros_like(refs)
    mix4 = np.repeat(mixes[..., None] / len(stems), len(stems), -1)
    model_vals.append(_sisdri(refs, ests, mixes))
    leak_vals.append(np.asarray(metrics_lib.leakage(refs, ests)))
    zero_vals.append(_sisdri(refs, zeros, mixes))
    mix4_vals.append(_sisdri(refs, mix4, mixes))
    for name, est in (('model', ests), ('all_zero', zeros), ('mixture_over_4', mix4)):
      abs_vals[name].append(np.asarray(metrics_lib.si_sdr(refs, est)))
    while examples_written < config.eval.num_example_wavs and examples_written < len(items):
      j = examples_written
      folder = os.path.join(out_dir, 'examples', f'{tracks[t].name}_{items[j][1]}')
      os.makedirs(folder, exist_ok=True)
      audio_lib.save_audio(os.path.join(folder, 'mixture.wav'), mixes[j], data_cfg.sample_rate)
      for s, name in enumerate(stems):
        audio_lib.save_audio(os.path.join(folder, f'{name}_true.wav'), refs[j][:, s],
                             data_cfg.sample_rate)
        audio_lib.save_audio(os.path.join(folder, f'{name}_separated.wav'), ests[j][:, s],
                             data_cfg.sample_rate)
      examples_written += 1
    if verbose:
      rate = (done + 1) / (time.time() - t0)
      print(f'\r[{split}] track {done + 1}/{len(by_track)}  {rate:.2f} tracks/s  ETA '
            f'{(len(by_track) - done - 1) / max(rate, 1e-9):.0f} s', end='', file=sys.stderr,
            flush=True)
  if verbose:
    print(file=sys.stderr)
  active = ev.active
  model_vals, zero_vals, mix4_vals = (np.concatenate(v) for v in (model_vals, zero_vals, mix4_vals))
  sisdr_abs = {k: _summary(np.concatenate(v), active, stems) for k, v in abs_vals.items()}
  leak = _leakage_summary(np.concatenate(leak_vals), active, stems)
  # Windows were grouped by track in the same (track, time) order as ev.windows.
  result = {
      'split': split, 'mode': mode, 'checkpoint_step': int(separator.step),
      'shifts': len(delays) if mode == 'track' else 1,
      'config_hash': train_state.config_hash(config), 'num_tracks': len(tracks),
      'windows_kept': int(ev.num_kept), 'windows_skipped': int(ev.num_skipped),
      'silence_threshold': float(data_cfg.silence_threshold),
      'model': {**_summary(model_vals, active, stems), 'sisdr_abs': sisdr_abs['model']},
      'leakage': leak,
      'baselines': {'all_zero': {**_summary(zero_vals, active, stems),
                                 'sisdr_abs': sisdr_abs['all_zero']},
                    'mixture_over_4': {**_summary(mix4_vals, active, stems),
                                       'sisdr_abs': sisdr_abs['mixture_over_4']}},
      'bottleneck': bottleneck.kind(config.model),
      'codebook': _codebook_summary(counts, separator.variables, q) if has_codes else None,
  }
  # Write-then-rename: a crash or a full disk mid-write keeps the previous metrics.json whole.
  ckpt_lib.write_text_atomic(os.path.join(out_dir, 'metrics.json'),
                             json.dumps(result, indent=2))
  if verbose:
    print(format_table(result, stems))
    print(f'Wrote {os.path.join(out_dir, "metrics.json")} and example WAVs in '
          f'{os.path.join(out_dir, "examples")}.')
  return result


def _codebook_summary(counts, variables, q) -> Dict[str, Any]:
  usage = np.asarray(variables['codebook_stats']['quantizer']['usage'])
  return {'perplexity': [float(x) for x in np.asarray(metrics_lib.perplexity(counts))],
          'used_codes': [int(x) for x in np.asarray(metrics_lib.used_codes(counts))],
          'dead_codes': [int(x) for x in np.asarray(metrics_lib.dead_codes(usage,
                                                                           q.dead_threshold))],
          'codebook_size': int(q.codebook_size)}


def format_table(result: Dict[str, Any], stems) -> str:
  """SI-SDRi (dB) of the model and the baselines, per stem, both figures; then their absolute
  SI-SDR, the same way."""
  rows = [('model', result['model']), ('all-zero', result['baselines']['all_zero']),
          ('mixture/4', result['baselines']['mixture_over_4'])]
  fmt = lambda v: f'{v:8.2f}' if v is not None else '       -'
  lines = [f"SI-SDRi (dB), split {result['split']}, step {result['checkpoint_step']}, "
           f"{result['windows_kept']} windows kept, {result['windows_skipped']} skipped",
           f"{'':24s}" + ''.join(f'{s:>8s}' for s in stems) + f"{'mean':>8s}{'median':>8s}"]

  def figures(pick):
    for figure, label in (('nonsilent', 'non-silent stems'), ('msdm', 'MSDM (all stems)')):
      lines.append(f'-- {label}')
      for name, r in rows:
        v = pick(r)[figure]
        lines.append(f'  {name:22s}' + ''.join(fmt(v['per_stem_mean'][s]) for s in stems)
                     + fmt(v['mean']) + fmt(v['median']))

  figures(lambda r: r)
  if all('sisdr_abs' in r for _, r in rows):      # absent in an older metrics.json
    lines.append("SI-SDR (dB, absolute; mixture/4's is the mixture's, SI-SDRi = model's - it)")
    figures(lambda r: r['sisdr_abs'])
  leak = result.get('leakage')
  if leak:
    lines.append('-- leakage: share of each estimate explained by each reference (cos^2)')
    header = '  estimate \\ reference'
    lines.append(f'{header:24s}' + ''.join(f'{s:>8s}' for s in stems))
    for est_name in stems:
      lines.append(f'  {est_name:22s}' + ''.join(fmt(leak[est_name][r]) for r in stems))
  return '\n'.join(lines)
