"""Separates songs of any length, rate and channel count with a trained workdir.

  python -m rqvae_jax.separate --workdir DIR song.wav [more.flac ...] --out separated/

writes separated/<song>/{bass,drums,guitar,piano}.wav at the input's sample rate, length and
channel count (each channel is separated on its own, so stereo stays stereo). A file is
checked in one streaming pass (truncated WAV, NaN/inf or absurd samples: refused), then
streamed: blocks are read, resampled to the model's rate with soxr's streaming resampler,
cut into model-sized chunks that overlap by `inference.overlap`, batched on the device,
cross-faded back (`rqvae_jax.chunking`), resampled back and written block by block, the
residual (input - sum of stems) accumulated on the way. Peak memory does not depend on the
song's length. Stems go to a hidden temporary folder renamed into place at the end, so a
failed file leaves no half-written stems. A silent input gives silent stems.

The command goes on past a bad file (one line of error), and exits non-zero at the end with
a summary; errors are one clear line, with the traceback under --verbose.
"""
import collections
import dataclasses
import os
import shutil
import sys
import tempfile
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rqvae_jax import audio as audio_lib
from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import metrics as metrics_lib
from rqvae_jax.chunking import (chunk_starts, crossfade_window, hop_of,  # pylint: disable=unused-import
                                overlap_add, overlap_add_stream)
from rqvae_jax.model import RQVAE, is_valid_length, next_valid_length

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
    from rqvae_jax import training
    saved = ckpt_lib.load_config(workdir)
    if config is not None:
      ckpt_lib.check_config_matches(saved, config)
    config = config or saved
    abstract = jax.eval_shape(lambda: training.create_train_state(config, jax.random.PRNGKey(0)))
    checkpointer = ckpt_lib.Checkpointer(workdir)
    state, _, step = checkpointer.restore(checkpoint, abstract)
    checkpointer.close()
    variables = state.variables(use_ema=bool(config.inference.use_ema_codebooks))
    return cls.from_variables(config, variables, step)

  @classmethod
  def from_variables(cls, config, variables, step: int = 0) -> 'Separator':
    chunk = int(config.inference.chunk_samples)
    if not is_valid_length(chunk, config.model):
      raise ValueError(f'inference.chunk_samples={chunk} is not a length the model maps back to '
                       f'itself; use {next_valid_length(chunk, config.model)}.')
    model = RQVAE(config.model)

    @jax.jit
    def fn(variables, mixtures):
      stems, aux = model.apply(variables, mixtures, train=False)
      return stems, aux['codes']

    return cls(config=config, variables=variables, step=step, chunk=chunk, _fn=fn)

  def separate_chunks(self, mixtures: np.ndarray, num_rows: Optional[int] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """(B, chunk) -> stems (B, chunk, S) and code counts (Q, K) of the first `num_rows` chunks
    (default all: rows past num_rows only fill a batch and are left out of the counts)."""
    stems, codes = self._fn(self.variables, jnp.asarray(mixtures, jnp.float32))
    codes = np.asarray(codes)[:len(mixtures) if num_rows is None else num_rows]
    counts = metrics_lib.code_histogram(codes, int(self.config.model.quantizer.codebook_size))
    return np.asarray(stems), np.asarray(counts, np.float32)

  def __call__(self, mixture: np.ndarray, progress=None) -> np.ndarray:
    """Mono mixture (N,) at the model's rate -> stems (N, S)."""
    mixture = np.asarray(mixture, np.float32)
    if mixture.ndim != 1:
      raise ValueError(f'Separator expects a mono (N,) signal, got shape {mixture.shape}.')
    if not np.all(np.isfinite(mixture)):
      raise ValueError('The mixture has NaN/inf samples; clean them before separating.')
    inf = self.config.inference
    return overlap_add(lambda b: self.separate_chunks(b)[0], mixture, self.chunk, inf.overlap,
                       inf.batch_size, progress, inf.in_flight)


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


def _stem_blocks(separator: 'Separator', path: str, info: audio_lib.AudioInfo, fifo: _Fifo,
                 num_stems: int, block_frames: int, progress) -> Iterator[np.ndarray]:
  """Stems (n, S, C) at the file's rate, block by block, aligned with the file's frames
  (read -> resample -> chunked separation -> resample back, every stage streaming)."""
  rate, c = int(separator.config.data.sample_rate), info.channels
  inf = separator.config.inference
  blocks = fifo.tee(audio_lib.read_blocks(path, block_frames))
  model_in = audio_lib.resample_stream(blocks, info.sample_rate, rate, c)
  stems = overlap_add_stream(lambda b: separator.separate_chunks(b)[0], model_in,
                             separator.chunk, inf.overlap, inf.batch_size, progress,
                             inf.in_flight)
  flat = (part.reshape(part.shape[0], num_stems * c) for part in stems)   # stem s, ch k: s*C+k
  for part in audio_lib.resample_stream(flat, rate, info.sample_rate, num_stems * c):
    yield part.reshape(part.shape[0], num_stems, c)


def _write_stems(separator, path: str, info: audio_lib.AudioInfo, folder: str,
                 stems: Sequence[str], block_frames: int, progress) -> Dict[str, float]:
  """Streams the separation of `path` into stem files in `folder`; returns the report."""
  import soundfile as sf
  c, n = info.channels, info.num_frames
  fmt = 'RF64' if n * c * 4 > 0xFFFFFFF0 - 4096 else 'WAV'   # float WAV past 4 GiB: RF64
  writers = [sf.SoundFile(os.path.join(folder, f'{s}.wav'), 'w', info.sample_rate, c,
                          subtype='FLOAT', format=fmt) for s in stems]
  energy, residual, written = 0.0, 0.0, 0
  silent = info.peak is not None and info.peak <= SILENCE_PEAK
  fifo = _Fifo(c)
  if silent:            # the model's biases would make about -30 dBFS of near-zero input
    parts = (np.zeros((min(block_frames, n - i), len(stems), c), np.float32)
             for i in range(0, n, block_frames))
  else:
    parts = _stem_blocks(separator, path, info, fifo, len(stems), block_frames, progress)
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
  return {'silent': silent, 'residual_db': residual_db}


def separate_file(separator: 'Separator', path: str, out_dir: str, stems: Sequence[str],
                  show_progress: bool = True, folder_name: Optional[str] = None,
                  block_frames: int = audio_lib.BLOCK_FRAMES) -> Dict[str, object]:
  """Separates one file into out_dir/<folder_name>/<stem>.wav, streaming, in bounded memory.

  `folder_name` defaults to the file's name without extension. An existing folder of that
  name is replaced once the new stems are complete; on any error nothing is left behind.

  Returns:
    {'path', 'folder', 'frames', 'sample_rate', 'channels', 'peak', 'silent',
     'residual_db'}: residual_db is 10 log10(sum (input - sum of stems)^2 / sum input^2),
    None for a silent input (whose stems are written as silence).

  Raises:
    ValueError: a file that cannot be separated (see `audio.inspect_audio`), or NaN/inf
      stems from the model.
  """
  from tqdm import tqdm
  info = audio_lib.inspect_audio(path, block_frames)
  rate = int(separator.config.data.sample_rate)
  inf = separator.config.inference
  model_frames = int(np.floor(info.num_frames * rate / info.sample_rate + 0.5))
  total = info.channels * len(chunk_starts(model_frames, separator.chunk,
                                           hop_of(separator.chunk, inf.overlap)))
  name = folder_name or os.path.splitext(os.path.basename(path))[0]
  folder = os.path.join(out_dir, name)
  os.makedirs(out_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{name}.partial-', dir=out_dir)
  umask = os.umask(0o022)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)        # mkdtemp's 0700 is for the scratch name, not the output
  bar = tqdm(total=total, desc=os.path.basename(path), unit='chunk', disable=not show_progress,
             file=sys.stderr)
  try:
    report = _write_stems(separator, path, info, tmp, stems, block_frames, bar.update)
    if os.path.isdir(folder):
      shutil.rmtree(folder)
    os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    bar.close()
  return {'path': path, 'folder': folder, 'frames': int(info.num_frames),
          'sample_rate': int(info.sample_rate), 'channels': int(info.channels),
          'peak': float(info.peak), **report}


def separate_files(files: Sequence[str], workdir: str, out: str, checkpoint='best',
                   overlap: Optional[float] = None, batch_size: int = 0, in_flight: int = 0,
                   show_progress: bool = True, stream=None) -> int:
  """The command: checks the output folder and the inputs, restores the model once,
  separates every good file, and returns the exit code (1 when any file failed).

  A bad file costs one line of error and does not stop the others; the summary at the end
  lists what failed. Errors that concern every file (a missing workdir, an unwritable
  output folder) raise: run_guarded prints them.
  """
  from rqvae_jax import cli
  stream = stream or sys.stderr
  if not files:
    raise ValueError('Give at least one audio file: python -m rqvae_jax.separate --workdir '
                     'DIR song.wav [more files] --out separated/')
  out = cli.check_output_dir(out)                      # before minutes of separation
  named, failed = cli.output_names(files)
  for path in list(p for p, _ in named):
    try:
      audio_lib.check_path(path)
    except ValueError as e:
      failed[path] = cli.one_line(e)
  named = [(p, n) for p, n in named if p not in failed]
  for path, message in failed.items():
    print(f'error: {path}: {message}', file=stream)
  done = []
  if named:
    from rqvae_jax import compilation_cache
    compilation_cache.enable()
    separator = Separator.from_workdir(workdir, checkpoint)
    if overlap is not None:
      separator.config.inference.overlap = overlap
    if batch_size:
      separator.config.inference.batch_size = batch_size
    if in_flight:
      separator.config.inference.in_flight = in_flight
    hop_of(separator.chunk, separator.config.inference.overlap)   # a bad --overlap fails here
    print(f'Restored {workdir} at step {separator.step}.', file=stream)
    stems = separator.config.data.stems
    for path, name in named:
      try:
        r = separate_file(separator, path, out, stems, show_progress, folder_name=name)
      except ValueError as e:
        failed[path] = cli.one_line(e)
        print(f'error: {path}: {failed[path]}', file=stream)
        continue
      done.append(path)
      head = (f"{r['folder']}: {len(stems)} stems, {r['frames']} frames at "
              f"{r['sample_rate']} Hz x {r['channels']} ch")
      if r['silent']:
        print(f'{head}; the input is silent (peak {r["peak"]:.2g}), so are the stems')
      else:
        print(f"{head}; stems sum to the input within {r['residual_db']:.1f} dB "
              '(residual / input energy)')
  if failed:
    print(f'Separated {len(done)} of {len(done) + len(failed)} files into {out}; '
          f'{len(failed)} failed:',
          file=stream)
    for path, message in failed.items():
      print(f'  {path}: {message}', file=stream)
    return 1
  return 0


def main(argv):
  from absl import flags
  from rqvae_jax import cli
  f = flags.FLAGS
  if not f.verbose:
    from absl import logging
    logging.set_verbosity(logging.WARNING)   # Orbax logs every restore step at INFO
  return cli.run_guarded(lambda: separate_files(
      argv[1:], f.workdir, f.out, f.checkpoint, f.overlap, f.batch_size, f.in_flight),
                         f.verbose)


def _define_flags():
  from absl import flags
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json and checkpoints).')
  flags.DEFINE_string('out', 'separated', 'Output folder; stems go to OUT/<song>/<stem>.wav.')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.")
  flags.DEFINE_float('overlap', None, 'Chunk overlap in [0, 1) (default: the config\'s).')
  flags.DEFINE_integer('batch_size', 0, 'Chunks per device call (default: the config\'s).')
  flags.DEFINE_integer('in_flight', 0, 'Device calls at once (default: the config\'s).')
  flags.DEFINE_bool('verbose', False, 'Print tracebacks with errors (for bug reports).')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
