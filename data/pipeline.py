"""The training stream: random stem windows read from WAV files, on tf.data.

Every example is a pure function of (seed, step, global example index): process p of P
yields global indices p*B .. (p+1)*B - 1 of each step (B the per-process batch). Hence

* the global batch of step s is the same whatever the process count,
* a run resumed at `start_step=s` sees exactly the batches an uninterrupted run would,
* processes read disjoint examples, with no coordination.

Example = (track, start): a track is drawn with probability proportional to its length
(uniform over all segment-sized chunks of all tracks, like the original's item index), the
window starts at that chunk plus a shift uniform in [-segment/2, segment/2) (with
`shift_augmentation`), clipped so the window stays inside the track; a track shorter than
a segment is zero-padded. Only the window is read from disk (soundfile seek + read).

TensorFlow runs on the CPU only: it is imported lazily by the first stream (`import_tf`,
so `resolve_root` and friends stay cheap) and GPUs are hidden from it right away, so it
never reserves accelerator memory that JAX needs. Where TensorFlow is not installed (a GPU
image that ships JAX but not TensorFlow, whose wheel is too big to carry there), the same
examples come from a thread pool instead (`threaded_batches`), with a warning: the
batches are identical, only tf.data's autotuning is lost.

A stem that becomes unreadable during a run (a network disk that drops, a file replaced
under the run) must not end hours of training: a failed read is retried, then the track is
given up with a logged warning and the example is redrawn from the other tracks
(`ReadFaults` counts both; training writes them to TensorBoard).
"""
import collections
import concurrent.futures
import logging
import os
import threading
import time
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import slakh
from . import synthetic
from .slakh import Track, load_stems, load_track  # pylint: disable=unused-import


def import_tf():
  """Imports TensorFlow with GPUs hidden (safe to call repeatedly)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # devices already initialised elsewhere: too late
    pass
  return tf


def resolve_root(data_config) -> str:
  """data_config.root if set (must exist), else the synthetic set (generated once)."""
  root = data_config.get('root', '') or ''
  if root:
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
      raise ValueError(f'data.root {root} does not exist. Expected '
                       f'{slakh.expected_layout(data_config)}; or leave data.root empty '
                       'for the synthetic default.')
    return root
  return synthetic.ensure_synthetic(data_config)


def load_tracks(data_config, split: str, verbose: bool = True) -> List[Track]:
  """resolve_root + scan: the validated tracks of one split."""
  return slakh.scan(resolve_root(data_config), split, data_config, verbose=verbose).kept


def example_window(num_frames: Sequence[int], segment: int, shift: bool, seed: int,
                   step: int, index: int, redraw: int = 0) -> Tuple[int, int]:
  """(track index, start) of global example `index` of training step `step`; `redraw` > 0
  draws a replacement for an example whose track could not be read."""
  frames = np.asarray(num_frames, np.int64)
  chunks = np.maximum(frames // segment, 1)
  key = [int(seed) % (1 << 63), int(step), int(index)] + ([int(redraw)] if redraw else [])
  rng = np.random.default_rng(key)
  u = int(rng.integers(int(chunks.sum())))
  cum = np.cumsum(chunks)
  t = int(np.searchsorted(cum, u, side='right'))
  start = (u - int(cum[t] - chunks[t])) * segment
  if shift:
    start += int(rng.integers(-(segment // 2), segment - segment // 2))
  start = int(np.clip(start, 0, max(0, int(frames[t]) - segment)))
  return t, start


class ReadFaults:
  """Failed training reads, shared by the reading threads: retries, then tracks given up.

  Attributes:
    retries: further attempts after a failed read, `delay_s` x attempt apart.
    skipped_examples: examples redrawn because their track was given up.
    bad_tracks: paths of the tracks given up, in order.
  """

  def __init__(self, retries: int = 2, delay_s: float = 0.5):
    self.retries, self.delay_s = int(retries), float(delay_s)
    self.skipped_examples = 0
    self.bad_tracks: List[str] = []
    self._bad = set()
    self._lock = threading.Lock()

  def is_bad(self, t: int) -> bool:
    with self._lock:
      return t in self._bad

  def give_up(self, t: int, track: Track, error: BaseException, num_tracks: int) -> None:
    with self._lock:
      if t not in self._bad:
        self._bad.add(t)
        self.bad_tracks.append(track.path)
        logging.warning('Skipping training track %s from now on: unreadable after %d '
                        'attempts (%s). %d of %d tracks skipped.', track.path,
                        self.retries + 1, error, len(self._bad), num_tracks)
      if len(self._bad) >= num_tracks:
        raise ValueError(f'Every training track became unreadable (last: {track.path}: '
                         f'{error}); check the data disk.')

  def count_skip(self) -> None:
    with self._lock:
      self.skipped_examples += 1

  def scalars(self) -> dict:
    with self._lock:
      return {'train/skipped_examples_total': float(self.skipped_examples),
              'train/unreadable_tracks': float(len(self._bad))}


def read_example(tracks: Sequence[Track], frames: Sequence[int], segment: int, shift: bool,
                 seed: int, step: int, index: int, stems: Sequence[str],
                 faults: ReadFaults) -> np.ndarray:
  """Stems (segment, S) of example `index` of `step`; an unreadable track is retried, then
  given up, and the example redrawn from the others (the same redraws for the same faults)."""
  for redraw in range(1000):
    t, start = example_window(frames, segment, shift, seed, step, index, redraw)
    if faults.is_bad(t):
      continue
    for attempt in range(faults.retries + 1):
      try:
        data = load_stems(tracks[t], start, segment, stems)
      except (OSError, RuntimeError, ValueError) as e:  # libsndfile errors are RuntimeErrors
        error = e
        if attempt < faults.retries:
          time.sleep(faults.delay_s * (attempt + 1))
        continue
      if redraw:
        faults.count_skip()
      return data
    faults.give_up(t, tracks[t], error, len(tracks))
  raise ValueError('No readable training track found in 1000 draws; check the data disk.')


def _example_reader(data_config, tracks: Sequence[Track], batch_size: int, seed: int,
                    process_index: int, process_count: int, faults: Optional[ReadFaults]):
  """read(counter) -> stems (segment, S) of example counter % B of step counter // B of this
  process: what both streams map over the counters."""
  if not tracks:
    raise ValueError('train_batches needs at least one track.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
  stems = tuple(data_config.stems)
  segment = int(data_config.segment_samples)
  shift = bool(data_config.get('shift_augmentation', True))
  frames = [t.num_frames for t in tracks]
  tracks = list(tracks)
  offset = process_index * batch_size
  faults = faults if faults is not None else ReadFaults()

  def read(counter):
    step, j = divmod(int(counter), batch_size)
    return read_example(tracks, frames, segment, shift, seed, step, offset + j, stems, faults)
  return read


def _stop_step(start_step: int, num_steps: Optional[int], batch_size: int) -> int:
  return (start_step + num_steps) if num_steps is not None else (1 << 62) // batch_size


def train_dataset(data_config, tracks: Sequence[Track], batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  num_steps: Optional[int] = None, faults: Optional[ReadFaults] = None):
  """The tf.data.Dataset behind `train_batches` (batches (B, N, S) float32)."""
  read = _example_reader(data_config, tracks, batch_size, seed, process_index, process_count,
                         faults)
  tf = import_tf()
  segment, num_stems = int(data_config.segment_samples), len(data_config.stems)

  def read_tf(counter):
    x = tf.numpy_function(read, [counter], tf.float32, stateful=False)
    x.set_shape((segment, num_stems))
    return x

  stop = _stop_step(start_step, num_steps, batch_size)
  ds = tf.data.Dataset.range(start_step * batch_size, stop * batch_size)
  ds = ds.map(read_tf, num_parallel_calls=int(data_config.get('num_parallel_reads', 4)),
              deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.prefetch(int(data_config.get('prefetch_batches', 2)))
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = max(2, int(data_config.get(
      'num_parallel_reads', 4)))
  return ds.with_options(options)


def threaded_batches(data_config, tracks: Sequence[Track], batch_size: int, seed: int,
                     start_step: int = 0, process_index: int = 0, process_count: int = 1,
                     num_steps: Optional[int] = None, faults: Optional[ReadFaults] = None
                     ) -> Iterator[np.ndarray]:
  """`train_batches` without TensorFlow: the same examples, read by `num_parallel_reads`
  threads (soundfile and NumPy release the GIL while they read and convert) at most
  `prefetch_batches` + 1 batches ahead, yielded in order."""
  read = _example_reader(data_config, tracks, batch_size, seed, process_index, process_count,
                         faults)
  workers = max(1, int(data_config.get('num_parallel_reads', 4)))
  ahead = (int(data_config.get('prefetch_batches', 2)) + 1) * batch_size
  stop = _stop_step(start_step, num_steps, batch_size) * batch_size

  def batches():
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='rqvae-read')
    pending = collections.deque()
    counter = start_step * batch_size
    try:
      while True:
        while counter < stop and len(pending) < ahead:
          pending.append(pool.submit(read, counter))
          counter += 1
        if len(pending) < batch_size:
          return
        yield np.stack([pending.popleft().result() for _ in range(batch_size)])
    finally:
      for f in pending:
        f.cancel()
      pool.shutdown(wait=True)
  return batches()


def train_batches(data_config, tracks: Sequence[Track], batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  num_steps: Optional[int] = None, faults: Optional[ReadFaults] = None
                  ) -> Iterator[np.ndarray]:
  """Yields float32 (batch_size, segment_samples, num_stems) stem batches, step by step:
  tf.data where TensorFlow is installed, else `threaded_batches` (the same batches).

  Args:
    data_config: the config's `data` section.
    tracks: the training tracks (`load_tracks(data_config, 'train')`).
    batch_size: the PER-PROCESS batch.
    seed: the run's data seed.
    start_step: first step to yield (resume).
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    num_steps: stop after this many steps (default: endless).
    faults: where failed reads are counted (default: a private `ReadFaults()`).
  """
  kwargs = dict(start_step=start_step, process_index=process_index,
                process_count=process_count, num_steps=num_steps, faults=faults)
  try:
    import_tf()
  except ImportError as e:
    logging.warning('TensorFlow cannot be imported (%s): training batches come from a thread '
                    'pool (the same batches as tf.data; pip install tensorflow-cpu for '
                    'tf.data).', e)
    return threaded_batches(data_config, tracks, batch_size, seed, **kwargs)
  return train_dataset(data_config, tracks, batch_size, seed, **kwargs).as_numpy_iterator()


def mixture(stems: np.ndarray) -> np.ndarray:
  """The mixture the model separates: the sum of the stems (last axis)."""
  return stems.sum(axis=-1)
