"""Validation during training: the fixed validation windows, their SI-SDRi, the summaries.

`validation_batches` picks the protocol's windows of the validation split (a spread subset or
all of them), `validate` scores a state on them (padding rows count in no mean),
`record_validation` keeps the history as JSON lines and a PNG curve in the workdir, and
`write_examples` puts audio and spectrograms of the first batch in TensorBoard.
"""
import json
import os
from typing import Dict, Iterator, List, Tuple

import jax
import ml_collections
import numpy as np

from rqvae_jax import parallel


def validate(state, p_eval_step, val_batches, mesh,
             config: ml_collections.ConfigDict) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
  """Mean validation loss and SI-SDRi per stem (over non-silent reference stems), plus the
  first batch's audio for the summaries.

  val_batches: (stems, valid) pairs (`validation_batches`). Rows with valid False only pad a
  batch and count in no SI-SDRi mean; the loss is a mean of batch losses weighted by their
  valid rows (a padded batch's own mean still includes its padding: the loss is only logged).
  """
  stems = config.data.stems
  total, counted, first = np.zeros(len(stems)), np.zeros(len(stems)), None
  loss_sum, loss_rows = 0.0, 0
  for batch, valid in val_batches:
    out = p_eval_step(state, parallel.shard_batch(batch, mesh))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      out, valid = multihost_utils.process_allgather(
          (out, parallel.shard_batch(np.asarray(valid), mesh)), tiled=True)
    out = jax.device_get(out)
    valid = np.asarray(valid, bool)
    active = np.asarray(out['active'], bool) & valid[:, None]
    total += np.where(active, out['sisdri'], 0).sum(0)
    counted += active.sum(0)
    loss_sum += float(out['loss']) * int(valid.sum())
    loss_rows += int(valid.sum())
    if first is None:
      first = {'stems': batch, 'estimate': np.asarray(out['estimate'])}
  per_stem = total / np.maximum(counted, 1)
  result = {'val/loss': loss_sum / max(loss_rows, 1),
            'val/sisdri_mean': float(np.mean(per_stem[counted > 0])) if counted.any() else 0.0}
  result.update({f'val/sisdri_{name}': float(v)
                 for name, v, n in zip(stems, per_stem, counted) if n > 0})
  return result, first


def write_examples(writer, step: int, example: Dict[str, np.ndarray], config) -> None:
  from rqvae_jax import summaries
  n = min(config.num_audio_examples, example['stems'].shape[0])
  sr = config.data.sample_rate
  audios, images = {}, {}
  for i in range(n):
    true, est = example['stems'][i], example['estimate'][i]
    audios[f'example{i}/mixture'] = true.sum(-1)[None, :, None]
    for s, name in enumerate(config.data.stems):
      audios[f'example{i}/{name}_true'] = true[None, :, s:s + 1]
      audios[f'example{i}/{name}_separated'] = est[None, :, s:s + 1]
    images[f'example{i}/spectrograms_true'] = summaries.stems_image(true)[None]
    images[f'example{i}/spectrograms_separated'] = summaries.stems_image(est)[None]
  writer.write_audios(step, {k: np.clip(v, -1, 1).astype(np.float32) for k, v in audios.items()},
                      sample_rate=sr)
  writer.write_images(step, images)


VAL_HISTORY = 'val_history.jsonl'
VAL_CURVE = 'val_sisdri.png'


def record_validation(workdir: str, step: int, val: Dict[str, float], stems) -> None:
  """Appends a validation to workdir/val_history.jsonl and redraws workdir/val_sisdri.png
  (validation SI-SDRi per stem and mean against the step; a step validated again after a
  resume keeps its latest figures)."""
  from rqvae_jax import summaries  # pylint: disable=g-import-not-at-top
  history_path = os.path.join(workdir, VAL_HISTORY)
  with open(history_path, 'a') as f:
    f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in val.items()}}) + '\n')
  by_step = {}
  with open(history_path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        by_step[row['step']] = row
  steps = sorted(by_step)
  series = {}
  for name in ('mean',) + tuple(stems):
    key = f'val/sisdri_{name}'
    series[name] = (steps, [by_step[s].get(key, float('nan')) for s in steps])
  summaries.curve_png(os.path.join(workdir, VAL_CURVE), series,
                      title='validation SI-SDRi (dB, non-silent stems)', y_label='dB')


class ValidationBatches:
  """This process's validation batches: (stems (B, N, S) float32, valid (B,) bool) pairs.

  The windows are read from the audio files batch by batch on each iteration, so the whole
  validation split (`num_eval_batches = 0`) need not fit in memory. `valid` is False on the
  rows that only pad the last batch to `batch_size` (copies of a real window, so the model
  sees ordinary audio): `validate` leaves them out of its means.
  """

  def __init__(self, tracks, rows: List[Tuple[int, int]], num_real: int, batch_size: int,
               data_config: ml_collections.ConfigDict):
    self.tracks, self.rows, self.num_real = tracks, rows, num_real
    self.batch_size, self.data_config = batch_size, data_config

  def __len__(self) -> int:
    return len(self.rows) // self.batch_size

  def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    from rqvae_jax import bundled
    pipeline = bundled.data_module('pipeline')
    d = self.data_config
    for b in range(0, len(self.rows), self.batch_size):
      rows = self.rows[b:b + self.batch_size]
      stems = np.stack([pipeline.load_stems(self.tracks[t], start, d.eval_window_samples,
                                            d.stems) for t, start in rows]).astype(np.float32)
      yield stems, np.arange(b, b + len(rows)) < self.num_real


def validation_batches(tracks, config: ml_collections.ConfigDict, batch_size: int
                       ) -> ValidationBatches:
  """The validation windows of this process, in batches of `batch_size` with a validity mask.

  `num_eval_batches > 0`: a fixed subset of that many global batches, spread evenly over the
  split's protocol windows (so over tracks, not the first few). `num_eval_batches = 0`: every
  protocol window of the split, as the original validates on the whole split (a 128-window
  subset has a standard error far above the plateau rule's 0.05 dB; README: Fidelity). The
  last batches are padded with invalid rows; every process gets the same number of batches,
  since the evaluation step is one collective program.
  """
  from rqvae_jax import bundled
  windows_lib = bundled.data_module('windows')
  ev = windows_lib.eval_windows(tracks, config.data)
  if not ev.windows:
    raise ValueError('The validation split has no window with two active stems; check the data.')
  count, index = jax.process_count(), jax.process_index()
  if config.num_eval_batches:
    wanted = config.num_eval_batches * batch_size * count
    spread = np.unique(np.linspace(0, len(ev.windows) - 1, wanted).round().astype(int))
  else:
    spread = np.arange(len(ev.windows))
  picked = [ev.windows[i] for i in spread[index::count]]
  per_process = -(-len(spread) // count)
  total = -(-per_process // batch_size) * batch_size
  fill = picked or [ev.windows[spread[0]]]
  rows = picked + [fill[i % len(fill)] for i in range(total - len(picked))]
  return ValidationBatches(tracks, rows, len(picked), batch_size, config.data)
