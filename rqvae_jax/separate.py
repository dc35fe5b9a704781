"""Separates songs of any length, rate and channel count with a trained workdir.

  rqvae-separate --workdir DIR song.mp3 [more.flac ...] [-o separated]
  (python -m rqvae_jax.separate ... in a clone; the options: rqvae_jax/separate_cli.py)

writes separated/<model>/<song>/{bass,drums,guitar,piano}.wav (16-bit by default) at the
input's sample rate, length and channel count (each channel is separated on its own, so
stereo stays stereo). A file is checked in one streaming pass (truncated WAV, NaN/inf or
absurd samples: refused), then streamed: blocks are read, resampled to the model's rate with
soxr's streaming resampler, cut into model-sized chunks that overlap by `inference.overlap`,
batched on the device, cross-faded back (`rqvae_jax.chunking`), resampled back and written
block by block, the residual (input - sum of stems) accumulated on the way. Peak memory does
not depend on the song's length. Stems go to a hidden scratch folder as float32 and are
moved into place (converted to the requested format, `rqvae_jax.stem_files`) once all are
complete, so a failed file leaves no half-written stems. A silent input gives silent stems.
"""
import collections
import dataclasses
import os
import shutil
import sys
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rqvae_jax import audio as audio_lib
from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import metrics as metrics_lib
from rqvae_jax import stem_files
from rqvae_jax.chunking import (chunk_starts, crossfade_window, hop_of,  # pylint: disable=unused-import
                                overlap_add, overlap_add_stream, shifted_mean)
from rqvae_jax.model import RQVAE, is_valid_length, next_valid_length, with_inference_tables

# A file whose peak is at most one 16-bit step (dither, or digital silence) is silent: its
# stems are written as silence instead of what the model makes of near-zero input (about
# -30 dBFS of its biases).
SILENCE_PEAK = 2.0 ** -15


@dataclasses.dataclass
class Separator:
  """A restored model and its jitted chunk function; `__call__` separates any-length audio."""
  config: ml_collections.ConfigDict
  variables: Dict
  step: int
  chunk: int
  _fn: Callable = None

  @classmethod
  def from_workdir(cls, workdir: str, checkpoint: Union[str, int] = 'best',
                   config: Optional[ml_collections.ConfigDict] = None) -> 'Separator':
    from rqvae_jax import train_state
    saved = ckpt_lib.load_config(workdir)
    if config is not None:
      ckpt_lib.check_config_matches(saved, config)
    config = config or saved
    state, step = train_state.restore_train_state(workdir, config, checkpoint)
    return cls.from_variables(config, state.inference_variables(config.inference), step)

  @classmethod
  def from_variables(cls, config, variables, step: int = 0) -> 'Separator':
    chunk = int(config.inference.chunk_samples)
    if not is_valid_length(chunk, config.model):
      raise ValueError(f'inference.chunk_samples={chunk} is not a length the model maps back to '
                       f'itself; use {next_valid_length(chunk, config.model)}.')
    model = RQVAE(config.model)
    variables = with_inference_tables(variables, config.inference)

    codebook_size = int(config.model.quantizer.codebook_size)

    @jax.jit
    def fn(variables, mixtures, num_rows):
      stems, aux = model.apply(variables, mixtures, train=False)
      codes = aux.get('codes')              # None: a Gaussian bottleneck has no codes
      if codes is None:
        return stems, None
      # The per-stage histogram in the same program (rows past num_rows only fill a batch: their
      # codes go out of range and are dropped), not a dozen op-by-op dispatches afterwards.
      rows = jnp.arange(codes.shape[0])[:, None, None]
      return stems, metrics_lib.code_histogram(jnp.where(rows < num_rows, codes, -1),
                                               codebook_size)

    return cls(config=config, variables=variables, step=step, chunk=chunk, _fn=fn)

  def separate_chunks(self, mixtures: np.ndarray, num_rows: Optional[int] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """(B, chunk) -> stems (B, chunk, S) and code counts (Q, K) of the first `num_rows` chunks
    (default all: rows past num_rows only fill a batch and are left out of the counts);
    a Gaussian-bottleneck model has no codes: its counts are an empty (0, 0) array."""
    stems, counts = self._run(mixtures, len(mixtures) if num_rows is None else num_rows)
    if counts is None:
      return np.asarray(stems), np.zeros((0, 0), np.float32)
    return np.asarray(stems), np.asarray(counts, np.float32)

  def separate_stems(self, mixtures: np.ndarray) -> np.ndarray:
    """(B, chunk) -> stems (B, chunk, S): `separate_chunks` without fetching the code counts
    (the separation path has no use for them)."""
    return np.asarray(self._run(mixtures, len(mixtures))[0])

  def _run(self, mixtures: np.ndarray, num_rows: int):
    return self._fn(self.variables, jnp.asarray(mixtures, jnp.float32), np.int32(num_rows))

  def __call__(self, mixture: np.ndarray, progress=None) -> np.ndarray:
    """Mono mixture (N,) at the model's rate -> stems (N, S)."""
    mixture = np.asarray(mixture, np.float32)
    if mixture.ndim != 1:
      raise ValueError(f'Separator expects a mono (N,) signal, got shape {mixture.shape}.')
    if not np.all(np.isfinite(mixture)):
      raise ValueError('The mixture has NaN/inf samples; clean them before separating.')
    inf = self.config.inference
    return overlap_add(self.separate_stems, mixture, self.chunk, inf.overlap,
                       inf.batch_size, progress, inf.in_flight,
                       delays=config_shift_delays(self.config))


class _Fifo:
  """Input blocks kept until the output frames they align with are written (the residual)."""

  def __init__(self, channels: int):
    self.blocks = collections.deque()
    self.channels = channels

  def tee(self, blocks):
    for block in blocks:
      self.blocks.append(block)
      yield block

  def pop(self, n: int) -> np.ndarray:
    parts, need = [], n
    while need and self.blocks:
      head = self.blocks.popleft()
      if len(head) > need:
        self.blocks.appendleft(head[need:])
        head = head[:need]
      parts.append(head)
      need -= len(head)
    if need:
      parts.append(np.zeros((need, self.channels), np.float32))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


# --shifts: Demucs' shift trick. Each extra pass separates the song delayed by a random number
# of samples up to MAX_SHIFT_SECONDS (zeros in front), which moves the chunk grid and its
# cross-fades; the passes are averaged. Seeded, so the same song gives the same stems.
MAX_SHIFT_SECONDS = 0.5
SHIFT_SEED = 0


def shift_delays(shifts: int, rate: int) -> List[int]:
  """Delays in model samples of the `shifts` passes: 0, then seeded draws in [0, 0.5 s]."""
  if not isinstance(shifts, (int, np.integer)) or shifts < 1:
    raise ValueError(f'--shifts must be at least 1 (an integer; the config field is '
                     f'inference.shifts), got {shifts!r}.')
  extra = np.random.default_rng(SHIFT_SEED).integers(
      0, int(MAX_SHIFT_SECONDS * rate) + 1, size=shifts - 1)
  return [0] + [int(d) for d in extra]


def config_shift_delays(config: ml_collections.ConfigDict, shifts: Optional[int] = None
                        ) -> List[int]:
  """`shift_delays` at the config's rate: `shifts` passes, or its `inference.shifts` (one
  pass for a config without the field, e.g. one built by hand)."""
  if shifts is None:
    shifts = config.inference.get('shifts', 1)
  return shift_delays(shifts, int(config.data.sample_rate))


def _stem_blocks(separator: 'Separator', path: str, info: audio_lib.AudioInfo, fifo: _Fifo,
                 num_stems: int, block_frames: int, progress, delays: Sequence[int]
                 ) -> Iterator[np.ndarray]:
  """Stems (n, S, C) at the file's rate, block by block, aligned with the file's frames
  (read -> resample -> chunked separation, averaged over `delays` -> resample back, every
  stage streaming)."""
  rate, c = int(separator.config.data.sample_rate), info.channels
  inf = separator.config.inference
  blocks = fifo.tee(audio_lib.read_blocks(path, block_frames))
  model_in = audio_lib.resample_stream(blocks, info.sample_rate, rate, c)
  separate_stream = lambda b: overlap_add_stream(
      separator.separate_stems, b, separator.chunk, inf.overlap,
      inf.batch_size, progress, inf.in_flight)
  stems = shifted_mean(separate_stream, model_in, delays, c)
  flat = (part.reshape(part.shape[0], num_stems * c) for part in stems)   # stem s, ch k: s*C+k
  for part in audio_lib.resample_stream(flat, rate, info.sample_rate, num_stems * c):
    yield part.reshape(part.shape[0], num_stems, c)


def _merge(part: np.ndarray, stems: Sequence[str], fmt: stem_files.OutputFormat) -> np.ndarray:
  """(n, S, C) -> the stems to write: all, or --two-stems' STEM and the sum of the others."""
  if not fmt.two_stems:
    return part
  i = list(stems).index(fmt.two_stems)
  rest = np.delete(part, i, axis=1).sum(axis=1)
  return np.stack([part[:, i], rest], axis=1)


def _write_stems(separator, path: str, info: audio_lib.AudioInfo, folder: str,
                 stems: Sequence[str], block_frames: int, progress,
                 fmt: stem_files.OutputFormat, delays: Sequence[int]) -> Dict[str, object]:
  """Streams the separation of `path` into float32 scratch files `folder`/<i>.wav (one per
  output stem); returns the report with the scratch files and each one's peak."""
  import soundfile as sf
  c, n = info.channels, info.num_frames
  names = fmt.stem_names(stems)
  scratch = [os.path.join(folder, f'{i}.wav') for i in range(len(names))]
  container = 'RF64' if n * c * 4 > 0xFFFFFFF0 - 4096 else 'WAV'   # float WAV past 4 GiB
  writers = [sf.SoundFile(p, 'w', info.sample_rate, c, subtype='FLOAT', format=container)
             for p in scratch]
  peaks = np.zeros(len(names))
  energy, residual, written = 0.0, 0.0, 0
  silent = info.peak is not None and info.peak <= SILENCE_PEAK
  fifo = _Fifo(c)
  if silent:            # the model's biases would make about -30 dBFS of near-zero input
    parts = (np.zeros((min(block_frames, n - i), len(stems), c), np.float32)
             for i in range(0, n, block_frames))
  else:
    parts = _stem_blocks(separator, path, info, fifo, len(stems), block_frames, progress,
                         delays)
  try:
    for part in parts:
      part = part[:n - written]
      if not len(part):
        continue
      if part.shape[1] != len(stems):
        raise ValueError(f'The model returned {part.shape[1]} stems, the config names '
                         f'{len(stems)} ({", ".join(stems)}).')
      bad = ~np.isfinite(part)
      if bad.any():
        first = written + int(np.argmax(bad.reshape(len(part), -1).any(axis=1)))
        raise ValueError(f'The model returned NaN/inf stems for {path} (first at frame '
                         f'{first}): the checkpoint is broken (diverged training?); nothing '
                         'was written for this file.')
      x = fifo.pop(len(part)).astype(np.float64)
      energy += float(np.sum(x * x))
      residual += float(np.sum(np.square(x - part.astype(np.float64).sum(axis=1))))
      part = _merge(part, stems, fmt)
      peaks = np.maximum(peaks, np.abs(part).max(axis=(0, 2)))
      for s, w in enumerate(writers):
        w.write(part[:, s, :])
      written += len(part)
    if written < n:     # resampling back may fall a frame or two short of the file's length
      pad = n - written
      x = fifo.pop(pad).astype(np.float64)
      energy += float(np.sum(x * x))
      residual += float(np.sum(x * x))
      for w in writers:
        w.write(np.zeros((pad, c), np.float32))
  finally:
    parts.close()         # stops the worker threads of a separation cut short by an error
    for w in writers:
      w.close()
  if silent:
    residual_db = None
  else:
    residual_db = float(10 * np.log10(max(residual, 1e-300) / max(energy, 1e-300)))
  return {'silent': silent, 'residual_db': residual_db, 'scratch': scratch,
          'peaks': [float(p) for p in peaks]}


def separate_file(separator: 'Separator', path: str, out_dir: str, stems: Sequence[str],
                  show_progress: bool = True, folder_name: Optional[str] = None,
                  block_frames: int = audio_lib.BLOCK_FRAMES,
                  fmt: Optional[stem_files.OutputFormat] = None,
                  shifts: Optional[int] = None) -> Dict[str, object]:
  """Separates one file into out_dir/<fmt.filename>, streaming, in bounded memory.

  With the default template the stems go to out_dir/<folder_name>/<stem>.<ext>;
  `folder_name` (the template's {track}) defaults to the file's name without extension.
  `fmt` defaults to `OutputFormat.exact()` (float32 WAV, the model's samples unchanged; the
  command's default is 16-bit). Existing files of the same names are replaced once all the
  new stems are complete; on any error nothing is left behind. `shifts` > 1 averages that
  many passes over shifted chunk grids (MAX_SHIFT_SECONDS); None: `inference.shifts`.

  Returns:
    {'path', 'folder', 'files', 'frames', 'sample_rate', 'channels', 'peak', 'silent',
     'residual_db', 'encoded'}: residual_db is 10 log10(sum (input - sum of stems)^2 /
    sum input^2) of the model's float stems, None for a silent input (whose stems are
    written as silence); files maps each written stem to its path; encoded maps it to
    {'gain', 'clipped'} (see `stem_files.finish`).

  Raises:
    ValueError: a file that cannot be separated (see `audio.inspect_audio`), NaN/inf stems
      from the model, or an impossible output format.
  """
  from tqdm import tqdm
  fmt = fmt or stem_files.OutputFormat.exact()
  fmt.check(stems)
  info = audio_lib.inspect_audio(path, block_frames)
  rate = int(separator.config.data.sample_rate)
  inf = separator.config.inference
  delays = config_shift_delays(separator.config, shifts)
  model_frames = int(np.floor(info.num_frames * rate / info.sample_rate + 0.5))
  hop = hop_of(separator.chunk, inf.overlap)
  total = info.channels * sum(len(chunk_starts(model_frames + d, separator.chunk, hop))
                              for d in delays)
  base = os.path.basename(path)
  name = folder_name or os.path.splitext(base)[0]
  names = fmt.stem_names(stems)
  files = [os.path.join(out_dir, p) for p in fmt.relative_paths(
      name, os.path.splitext(base)[1].lstrip('.'), stems)]
  os.makedirs(out_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{name}.partial-', dir=out_dir)
  bar = tqdm(total=total, desc=base, unit='chunk', disable=not show_progress, file=sys.stderr)
  try:
    report = _write_stems(separator, path, info, tmp, stems, block_frames, bar.update, fmt,
                          delays)
    encoded, finished = {}, []
    for stem, scratch, peak in zip(names, report.pop('scratch'), report.pop('peaks')):
      done = os.path.join(tmp, f'{stem}.{fmt.ext}')
      encoded[stem] = stem_files.finish(scratch, done, fmt, peak)
      finished.append(done)
    for done, final in zip(finished, files):   # all complete: move them into place
      os.makedirs(os.path.dirname(final), exist_ok=True)
      os.replace(done, final)
  finally:
    bar.close()
    shutil.rmtree(tmp, ignore_errors=True)
  folders = {os.path.dirname(f) for f in files}
  return {'path': path, 'folder': folders.pop() if len(folders) == 1 else out_dir,
          'files': dict(zip(names, files)), 'frames': int(info.num_frames),
          'sample_rate': int(info.sample_rate), 'channels': int(info.channels),
          'peak': float(info.peak), 'encoded': encoded, **report}


def separate_files(*args, **kwargs) -> int:
  """The separate command's work (`separate_cli.separate_files`), importable from here."""
  from rqvae_jax import separate_cli
  return separate_cli.separate_files(*args, **kwargs)


if __name__ == '__main__':
  from rqvae_jax import separate_cli
  sys.exit(separate_cli.main())
