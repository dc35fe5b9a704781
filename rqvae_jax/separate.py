"""Separates songs of any length, rate and channel count with a trained workdir.

  python -m rqvae_jax.separate --workdir DIR song.wav [more.flac ...] --out separated/

writes separated/<song>/{bass,drums,guitar,piano}.wav at the input's sample rate, length and
channel count (each channel is separated on its own, so stereo stays stereo). The song is cut
into model-sized chunks that overlap by `inference.overlap`, batched on the device, and
cross-faded back with a Hann window (overlap-add normalised by the summed window).
"""
import collections
import concurrent.futures
import dataclasses
import os
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rqvae_jax import audio as audio_lib
from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import metrics as metrics_lib
from rqvae_jax.model import RQVAE, is_valid_length, next_valid_length


def chunk_starts(length: int, chunk: int, hop: int) -> np.ndarray:
  """Starts of the chunks covering [0, length) (the last one may run past the end)."""
  count = max(1, int(np.ceil(max(length - chunk, 0) / hop)) + 1)
  return np.arange(count) * hop


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


def overlap_add(separate_fn: Callable[[np.ndarray], np.ndarray], mixture: np.ndarray,
                chunk: int, overlap: float, batch_size: int, progress=None,
                in_flight: int = 1, pass_num_rows: bool = False) -> np.ndarray:
  """Mixture (N,) -> stems (N, S) by chunked, batched, cross-faded separation.

  separate_fn maps (batch_size, chunk) mixtures to (batch_size, chunk, S) stems. The last
  batch is filled up with all-zero rows; with `pass_num_rows` separate_fn is called as
  separate_fn(batch, num_rows), num_rows being how many leading rows are chunks of the
  mixture (so statistics such as code counts can leave the filler out). With
  `in_flight` > 1 that many batches are separated at once from worker threads (XLA on CPU
  runs parts of the model, e.g. the LSTM recurrence, on one core, so two calls in flight
  keep both cores busy); the result does not depend on it.
  """
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f'overlap must be in [0, 1), got {overlap}.')
  if in_flight < 1:
    raise ValueError(f'in_flight must be >= 1, got {in_flight}.')
  n = mixture.shape[0]
  hop = max(1, int(round(chunk * (1.0 - overlap))))
  starts = chunk_starts(n, chunk, hop)
  padded = np.zeros(starts[-1] + chunk, np.float32)
  padded[:n] = mixture
  window = crossfade_window(chunk, hop)
  out, weight = None, np.zeros(padded.shape[0], np.float32)

  def batch_of(group):
    batch = np.zeros((batch_size, chunk), np.float32)
    for j, s in enumerate(group):
      batch[j] = padded[s:s + chunk]
    return (batch, len(group)) if pass_num_rows else (batch,)

  def add(group, stems):
    nonlocal out
    stems = np.asarray(stems)
    if out is None:
      out = np.zeros((padded.shape[0], stems.shape[-1]), np.float32)
    for j, s in enumerate(group):
      out[s:s + chunk] += stems[j] * window[:, None]
      weight[s:s + chunk] += window
    if progress is not None:
      progress(len(group))

  groups = [starts[b:b + batch_size] for b in range(0, len(starts), batch_size)]
  if in_flight == 1:
    for group in groups:
      add(group, separate_fn(*batch_of(group)))
  else:  # at most in_flight batches queued, so memory stays bounded on long files
    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
      for group in groups:
        pending.append((group, pool.submit(separate_fn, *batch_of(group))))
        if len(pending) >= in_flight:
          done_group, future = pending.popleft()
          add(done_group, future.result())
      while pending:
        done_group, future = pending.popleft()
        add(done_group, future.result())
  return (out / weight[:, None])[:n]


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


def separate_file(separator: Separator, path: str, out_dir: str, stems: Sequence[str],
                  show_progress: bool = True) -> Dict[str, float]:
  """Separates one file into out_dir/<song>/<stem>.wav; returns lengths and the residual."""
  import soundfile as sf
  from tqdm import tqdm

  rate = separator.config.data.sample_rate
  _, info = audio_lib.load_audio(path, rate, min_frames=1)
  channels, _ = sf.read(path, dtype='float32', always_2d=True)
  per_channel = [audio_lib.resample(channels[:, c], info.sample_rate, rate)
                 for c in range(info.channels)]
  inf = separator.config.inference
  hop = max(1, int(round(separator.chunk * (1 - inf.overlap))))
  total = len(per_channel) * len(chunk_starts(per_channel[0].shape[0], separator.chunk, hop))
  bar = tqdm(total=total, desc=os.path.basename(path), unit='chunk', disable=not show_progress,
             file=sys.stderr)
  separated = np.stack([separator(x, progress=bar.update) for x in per_channel], axis=-1)
  bar.close()                                                # (N, S, C)
  song = os.path.splitext(os.path.basename(path))[0]
  folder = os.path.join(out_dir, song)
  os.makedirs(folder, exist_ok=True)
  written = []
  for s, name in enumerate(stems):
    target = os.path.join(folder, f'{name}.wav')
    audio_lib.save_audio(target, separated[:, s, :], info, subtype='FLOAT')
    written.append(sf.read(target, dtype='float32', always_2d=True)[0])
  total_out = np.sum(written, axis=0)
  residual = np.sqrt(np.mean(np.square(channels - total_out)))
  ref = np.sqrt(np.mean(np.square(channels))) + 1e-12
  return {'path': path, 'folder': folder, 'frames': int(info.num_frames),
          'sample_rate': int(info.sample_rate), 'channels': int(info.channels),
          'residual_db': float(20 * np.log10(max(residual, 1e-12) / ref))}


def main(argv):
  from absl import flags
  flags_ = flags.FLAGS
  files = argv[1:]
  if not files:
    raise SystemExit('Give at least one audio file: python -m rqvae_jax.separate --workdir DIR '
                     'song.wav [more files] --out separated/')
  from rqvae_jax import compilation_cache
  compilation_cache.enable()
  separator = Separator.from_workdir(flags_.workdir, flags_.checkpoint)
  if flags_.overlap is not None:
    separator.config.inference.overlap = flags_.overlap
  if flags_.batch_size:
    separator.config.inference.batch_size = flags_.batch_size
  if flags_.in_flight:
    separator.config.inference.in_flight = flags_.in_flight
  print(f'Restored {flags_.workdir} at step {separator.step}.', file=sys.stderr)
  for path in files:
    r = separate_file(separator, path, flags_.out, separator.config.data.stems)
    print(f"{r['folder']}: {len(separator.config.data.stems)} stems, {r['frames']} frames at "
          f"{r['sample_rate']} Hz x {r['channels']} ch; stems sum to the input within "
          f"{r['residual_db']:.1f} dB (residual / input RMS)")


def _define_flags():
  from absl import flags
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json and checkpoints).')
  flags.DEFINE_string('out', 'separated', 'Output folder; stems go to OUT/<song>/<stem>.wav.')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.")
  flags.DEFINE_float('overlap', None, 'Chunk overlap in [0, 1) (default: the config\'s).')
  flags.DEFINE_integer('batch_size', 0, 'Chunks per device call (default: the config\'s).')
  flags.DEFINE_integer('in_flight', 0, 'Device calls at once (default: the config\'s).')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
