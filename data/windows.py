"""Evaluation windows of the standard (MSDM) protocol.

Each track of length L gives ceil((L - hop) / hop) windows of `eval_window_samples`
starting at multiples of `eval_hop_samples` (4 s windows, 2 s hop at 22 050 Hz); a last
window that runs past the end is zero-padded when read. A window is kept iff at least
`min_active_stems` stems are non-silent in it, a stem being silent when
||s||_2 / N < `silence_threshold` on raw audio. N is the number of real samples in the
window (MSDM slices the last window short; zero padding does not change the norm).
Deterministic: the result depends only on the audio and the config.
"""
import dataclasses
import math
import sys
from typing import List, Sequence, Tuple

import numpy as np

from . import slakh


@dataclasses.dataclass(frozen=True)
class EvalWindows:
  """Kept windows and the counts of the protocol.

  Attributes:
    windows: kept windows as (track index, start sample), in track then time order.
    active: bool (len(windows), num_stems): which stems are non-silent in each kept window
      (for the score over non-silent references only).
    num_kept: len(windows).
    num_skipped: windows dropped for having fewer than `min_active_stems` active stems.
    window_samples: window length in samples.
  """
  windows: List[Tuple[int, int]]
  active: np.ndarray
  num_kept: int
  num_skipped: int
  window_samples: int

  def summary(self) -> str:
    total = self.num_kept + self.num_skipped
    return (f'evaluation windows: {self.num_kept} kept, {self.num_skipped} skipped '
            f'(of {total}; fewer than the required active stems)')


def num_windows(num_frames: int, hop: int) -> int:
  """ceil((L - hop) / hop), never negative."""
  return max(0, math.ceil((num_frames - hop) / hop))


def window_activity(stems: np.ndarray, window: int, hop: int, threshold: float):
  """Starts and per-stem activity (bool (W, S)) of the windows of one track (L, S) array."""
  length = stems.shape[0]
  starts = np.arange(num_windows(length, hop), dtype=np.int64) * hop
  ends = np.minimum(starts + window, length)
  active = np.zeros((starts.size, stems.shape[1]), bool)
  for j in range(stems.shape[1]):
    cum = np.concatenate([[0.0], np.cumsum(np.square(stems[:, j], dtype=np.float64))])
    energy = np.maximum(cum[ends] - cum[starts], 0.0)
    active[:, j] = np.sqrt(energy) / np.maximum(ends - starts, 1) >= threshold
  return starts, active


def eval_windows(tracks: Sequence[slakh.Track], data_config,
                 verbose: bool = False) -> EvalWindows:
  """The protocol's windows over `tracks` (whole tracks are read once, not kept)."""
  window, hop = int(data_config.eval_window_samples), int(data_config.eval_hop_samples)
  threshold = float(data_config.silence_threshold)
  need = int(data_config.min_active_stems)
  stems = tuple(data_config.stems)
  kept, actives, skipped = [], [], 0
  for i, track in enumerate(tracks):
    audio = slakh.load_track(track, stems)
    starts, active = window_activity(audio, window, hop, threshold)
    keep = active.sum(axis=1) >= need
    kept += [(i, int(s)) for s in starts[keep]]
    actives.append(active[keep])
    skipped += int((~keep).sum())
  result = EvalWindows(
      windows=kept,
      active=np.concatenate(actives) if actives else np.zeros((0, len(stems)), bool),
      num_kept=len(kept), num_skipped=skipped, window_samples=window)
  if verbose:
    print(result.summary(), file=sys.stderr, flush=True)
  return result
