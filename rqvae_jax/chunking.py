"""Chunked, batched, cross-faded separation of signals of any length, in bounded memory.

The model maps fixed-size chunks to stems. A long signal is cut into chunks of `chunk`
samples starting every `hop` = chunk * (1 - overlap) samples (the last one zero-padded past
the end), the chunks go to the device in batches, and the stems are cross-faded back with a
Hann-shaped window, the overlap-add normalised by the summed window.

`overlap_add_stream` does it on a stream of multi-channel blocks and yields finished stems
as soon as no later chunk can change them, so a song of any length is separated with memory
bounded by the chunk, the batch and the number of batches in flight. Every channel is cut at
the same starts and its chunks share batches with the other channels' (a stereo song fills
batches twice as fast). `overlap_add` is the same on one whole mono array (evaluation).
`shifted_mean` averages such streams over delayed copies of the input (--shifts).
"""
import collections
import concurrent.futures
import itertools
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import numpy as np


def chunk_starts(length: int, chunk: int, hop: int) -> np.ndarray:
  """Starts of the chunks covering [0, length) (the last one may run past the end)."""
  count = max(1, int(np.ceil(max(length - chunk, 0) / hop)) + 1)
  return np.arange(count) * hop


def hop_of(chunk: int, overlap: float) -> int:
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f'overlap must be in [0, 1), got {overlap}.')
  return max(1, int(round(chunk * (1.0 - overlap))))


def crossfade_window(chunk: int, hop: int) -> np.ndarray:
  """Hann-shaped fades over the overlap, flat elsewhere; never zero, so the overlap-add can
  be normalised everywhere (a sample seen by one chunk gets exactly that chunk's value)."""
  w = np.ones(chunk, np.float32)
  overlap = chunk - hop
  if overlap > 0:
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
    w[:overlap] = ramp
    w[chunk - overlap:] = ramp[::-1]
  return w


class _Buffer:
  """Samples [start, start + len) of a growing signal; older samples are dropped."""

  def __init__(self, shape_tail):
    self.start = 0
    self.data = np.zeros((0,) + tuple(shape_tail), np.float32)

  @property
  def end(self) -> int:
    return self.start + self.data.shape[0]

  def ensure(self, end: int) -> None:
    if end > self.end:
      pad = np.zeros((end - self.end,) + self.data.shape[1:], np.float32)
      self.data = np.concatenate([self.data, pad])

  def take(self, stop: int) -> np.ndarray:
    """Removes and returns samples [start, stop)."""
    n = max(0, stop - self.start)
    head, self.data = self.data[:n], self.data[n:]
    self.start += n
    return head


def overlap_add_stream(separate_fn: Callable[..., np.ndarray], blocks: Iterable[np.ndarray],
                       chunk: int, overlap: float, batch_size: int, progress=None,
                       in_flight: int = 1, pass_num_rows: bool = False
                       ) -> Iterator[np.ndarray]:
  """Blocks (n, C) of a signal -> finished stems (m, S, C), in order, in bounded memory.

  separate_fn maps (batch_size, chunk) mixtures to (batch_size, chunk, S) stems. A last batch
  is filled up with all-zero rows; with `pass_num_rows` separate_fn is called as
  separate_fn(batch, num_rows), num_rows being how many leading rows are real chunks (so
  statistics such as code counts can leave the filler out). With `in_flight` > 1 that many
  batches are separated at once from worker threads (XLA on CPU runs parts of the model,
  e.g. the LSTM recurrence, on one core, so two calls in flight keep both cores busy); the
  result does not depend on it. `progress(k)` is called with the chunks each batch added.
  """
  if in_flight < 1:
    raise ValueError(f'in_flight must be >= 1, got {in_flight}.')
  hop = hop_of(chunk, overlap)
  window = crossfade_window(chunk, hop)
  source: Optional[_Buffer] = None       # input samples not yet needed by a chunk dropped
  out: Optional[_Buffer] = None          # weighted sums of stems, (len, S, C)
  weight = _Buffer(())                   # summed window, (len,)
  rows = collections.deque()             # (start, channel, samples) not yet batched
  pending = collections.deque()          # (rows of a batch, future or result)
  next_start, total = 0, 0

  def submit(batch_rows):
    batch = np.zeros((batch_size, chunk), np.float32)
    for j, (_, _, x) in enumerate(batch_rows):
      batch[j] = x
    args = (batch, len(batch_rows)) if pass_num_rows else (batch,)
    meta = [(s, c) for s, c, _ in batch_rows]
    pending.append((meta, pool.submit(separate_fn, *args) if pool else separate_fn(*args)))

  def add(meta, stems):
    nonlocal out
    stems = np.asarray(stems)
    if out is None:
      out = _Buffer((stems.shape[-1], channels))
    for j, (s, c) in enumerate(meta):
      out.ensure(s + chunk)
      weight.ensure(s + chunk)
      out.data[s - out.start:s - out.start + chunk, :, c] += stems[j] * window[:, None]
      if c == 0:                         # one window per start, whatever the channels
        weight.data[s - weight.start:s - weight.start + chunk] += window
    if progress is not None:
      progress(len(meta))

  def finished(upto):
    """Stems of the samples before `upto` (no chunk still to come starts before it)."""
    if out is None or upto <= out.start:
      return None
    w = weight.take(upto)
    return out.take(upto) / w[:, None, None]

  def drain(keep: int):
    """Adds the results of all but `keep` batches in flight; yields what is then finished."""
    while len(pending) > keep:
      meta, result = pending.popleft()
      add(meta, result.result() if pool else result)
      first_open = (pending[0][0][0][0] if pending else rows[0][0] if rows else next_start)
      done = finished(min(first_open, total))
      if done is not None and len(done):
        yield done

  pool = concurrent.futures.ThreadPoolExecutor(in_flight) if in_flight > 1 else None
  channels = None
  try:
    for block in blocks:
      block = np.asarray(block, np.float32)
      if block.ndim != 2:
        raise ValueError(f'blocks must be (n, channels), got shape {block.shape}.')
      if source is None:
        channels = block.shape[1]
        source = _Buffer((channels,))
      elif block.shape[1] != channels:
        raise ValueError(f'a block has {block.shape[1]} channels, the first had {channels}.')
      source.data = np.concatenate([source.data, block])
      total += block.shape[0]
      while next_start + chunk <= total:
        for c in range(channels):
          rows.append((next_start, c, source.data[next_start - source.start:
                                                  next_start - source.start + chunk, c]))
        next_start += hop
      source.take(next_start)
      while len(rows) >= batch_size:
        submit([rows.popleft() for _ in range(batch_size)])
        yield from drain(in_flight - 1)
    if source is None or total == 0:
      return
    for s in chunk_starts(total, chunk, hop):   # the chunks that run past the end, zero-padded
      if s < next_start:
        continue
      source.ensure(s + chunk)
      for c in range(channels):
        rows.append((s, c, source.data[s - source.start:s - source.start + chunk, c]))
      next_start = s + hop
    while rows:
      submit([rows.popleft() for _ in range(min(batch_size, len(rows)))])
      yield from drain(in_flight - 1)
    yield from drain(0)
    if out is not None and out.start < total:   # nothing left in flight: all is finished
      yield finished(total)
  finally:
    if pool:
      pool.shutdown(wait=True, cancel_futures=True)


def overlap_add(separate_fn: Callable[..., np.ndarray], mixture: np.ndarray, chunk: int,
                overlap: float, batch_size: int, progress=None, in_flight: int = 1,
                pass_num_rows: bool = False, delays: Sequence[int] = (0,)) -> np.ndarray:
  """Mixture (N,) -> stems (N, S): `overlap_add_stream` on one whole mono array, averaged
  over copies delayed by `delays` samples (`shifted_mean`; the default is one plain pass)."""
  mixture = np.asarray(mixture, np.float32)
  separate_stream = lambda blocks: overlap_add_stream(
      separate_fn, blocks, chunk, overlap, batch_size, progress, in_flight, pass_num_rows)
  parts = list(shifted_mean(separate_stream, [mixture[:, None]], delays, 1))
  if not parts:
    return np.zeros((0, 0), np.float32)
  return np.concatenate(parts)[:, :, 0]


def _delayed(blocks: Iterable[np.ndarray], delay: int, channels: int) -> Iterator[np.ndarray]:
  if delay:
    yield np.zeros((delay, channels), np.float32)
  yield from blocks


def _advanced(parts: Iterator[np.ndarray], delay: int) -> Iterator[np.ndarray]:
  """The stream without its first `delay` frames (closing it closes `parts`, so the worker
  threads of a separation cut short stop at once)."""
  try:
    for part in parts:
      if delay >= len(part):
        delay -= len(part)
        continue
      yield part[delay:]
      delay = 0
  finally:
    if hasattr(parts, 'close'):
      parts.close()


def _mean_in_step(streams: List[Iterator[np.ndarray]]) -> Iterator[np.ndarray]:
  """Frame-wise mean of equally long streams whose blocks differ in size; pulls the stream
  that is furthest behind, so the others' buffers (and the tee'd input) stay short."""
  buffers = [collections.deque() for _ in streams]
  lengths = [0] * len(streams)
  live = [True] * len(streams)
  try:
    while any(live):
      i = min((k for k in range(len(streams)) if live[k]), key=lambda k: lengths[k])
      part = next(streams[i], None)
      if part is None:
        live[i] = False
      elif len(part):
        buffers[i].append(part)
        lengths[i] += len(part)
      ready = min(lengths)
      if ready:
        heads = []
        for k, buffer in enumerate(buffers):
          head = np.concatenate(list(buffer))
          buffer.clear()
          if len(head) > ready:
            buffer.append(head[ready:])
          lengths[k] -= ready
          heads.append(head[:ready])
        yield np.mean(heads, axis=0, dtype=np.float64).astype(np.float32)
  finally:
    for stream in streams:
      if hasattr(stream, 'close'):
        stream.close()


def shifted_mean(separate_stream: Callable[[Iterable[np.ndarray]], Iterator[np.ndarray]],
                 blocks: Iterable[np.ndarray], delays: Sequence[int], channels: int
                 ) -> Iterator[np.ndarray]:
  """The mean over `delays` of separate_stream(the blocks delayed by d samples), each result
  advanced back by d: Demucs' shift trick on a stream, in bounded memory.

  A delay moves every chunk boundary and cross-fade, so the mean smooths what the model
  makes of where a sound falls in its chunk. One delay of 0 is separate_stream(blocks).
  """
  if list(delays) == [0]:
    yield from separate_stream(blocks)
    return
  copies = itertools.tee(blocks, len(delays))
  streams = [_advanced(separate_stream(_delayed(copy, d, channels)), d)
             for copy, d in zip(copies, delays)]
  yield from _mean_in_step(streams)
