"""Loading and saving user audio for separation.

The model works on mono audio at one sample rate (22 050 Hz); users bring files at any rate
and channel count. `load_audio` downmixes and resamples, and returns an `AudioInfo` receipt
so that `save_audio` can write each separated stem back at the file's own rate, channel
count and length. Reading goes through soundfile (libsndfile): WAV, FLAC, OGG/Vorbis,
AIFF, ... Resampling uses soxr (high quality, linear phase).
"""
import dataclasses
import logging
import os
from typing import Optional, Union

import numpy as np
import soundfile as sf
import soxr


@dataclasses.dataclass(frozen=True)
class AudioInfo:
  """What `load_audio` read, so that outputs can be restored to the same format.

  Attributes:
    sample_rate: rate of the file, in Hz.
    channels: channel count of the file.
    num_frames: length of the file in frames at `sample_rate`.
    path: the file read.
    model_rate: rate of the array `load_audio` returned (the rate it resampled to).
    subtype: libsndfile subtype of the file, e.g. 'PCM_16' (informative).
  """
  sample_rate: int
  channels: int
  num_frames: int
  path: str = ''
  model_rate: Optional[int] = None
  subtype: str = ''


def resample(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
  """Resamples `x` ((N,) or (N, C)) with soxr 'HQ'; returns float32, a no-op at equal rates."""
  x = np.asarray(x, dtype=np.float32)
  if int(from_rate) == int(to_rate):
    return x
  if from_rate <= 0 or to_rate <= 0:
    raise ValueError(f'Sample rates must be positive, got {from_rate} -> {to_rate}.')
  if x.shape[0] == 0:
    return x
  return np.asarray(soxr.resample(x, int(from_rate), int(to_rate), quality='HQ'),
                    dtype=np.float32)


def load_audio(path: str, target_rate: int, min_frames: int = 1):
  """Reads an audio file as float32 mono at `target_rate`.

  Args:
    path: any file libsndfile reads (WAV, FLAC, OGG, AIFF, ...).
    target_rate: the model's sample rate.
    min_frames: the shortest acceptable length at `target_rate` (e.g. the model's hop).

  Returns:
    (audio, info): audio float32 (N,), the channel mean resampled to `target_rate`;
    info the `AudioInfo` needed by `save_audio` to restore rate, channels and length.

  Raises:
    ValueError: missing, unreadable, empty, non-finite or too short audio.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f'Audio file not found: {path}')
  try:
    data, rate = sf.read(path, dtype='float32', always_2d=True)
    subtype = sf.info(path).subtype
  except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
    raise ValueError(f'Cannot read audio file {path}: {e}. Expected a WAV, FLAC or OGG '
                     'file that libsndfile (soundfile) can decode.') from e
  if data.shape[0] == 0 or data.shape[1] == 0:
    raise ValueError(f'Audio file {path} is empty (0 frames).')
  finite = np.isfinite(data)
  if not finite.all():
    bad = np.argwhere(~finite)
    raise ValueError(f'Audio file {path} has {len(bad)} NaN/inf samples (first at frame '
                     f'{bad[0, 0]}, channel {bad[0, 1]}).')
  info = AudioInfo(sample_rate=int(rate), channels=int(data.shape[1]),
                   num_frames=int(data.shape[0]), path=path, model_rate=int(target_rate),
                   subtype=subtype)
  mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
  mono = resample(mono, rate, target_rate)
  if mono.shape[0] < min_frames:
    raise ValueError(
        f'Audio file {path} is too short: {mono.shape[0]} frames at {target_rate} Hz '
        f'({data.shape[0] / rate:.3f} s), at least {min_frames} frames needed.')
  return np.ascontiguousarray(mono, dtype=np.float32), info


def save_audio(path: str, audio: np.ndarray, info_or_rate: Union[AudioInfo, int],
               channels: Optional[int] = None, *, audio_rate: Optional[int] = None,
               subtype: str = 'PCM_16') -> None:
  """Writes `audio` at the rate and channel count of the original file.

  With an `AudioInfo`, `audio` is taken to be at `info.model_rate` (override with
  `audio_rate`), resampled back to `info.sample_rate`, trimmed or zero-padded to
  `info.num_frames`, and a mono signal is repeated into `info.channels` channels. With an
  int rate, `audio` is written at that rate as is. The format follows the extension.

  PCM_16 is the default because separated stems are listened to, not re-processed; samples
  beyond [-1, 1] are clipped (with a warning). Pass subtype='FLOAT' to keep them.

  Args:
    path: output file (.wav, .flac, .ogg, ...).
    audio: (N,) mono or (N, C).
    info_or_rate: the `AudioInfo` from `load_audio`, or an output rate in Hz.
    channels: output channel count (default: the info's, or the array's).
    audio_rate: the rate of `audio` when it differs from `info.model_rate`.
    subtype: libsndfile subtype, e.g. 'PCM_16', 'PCM_24', 'FLOAT'; ignored for OGG.
  """
  x = np.asarray(audio, dtype=np.float32)
  if x.ndim == 1:
    x = x[:, None]
  if x.ndim != 2:
    raise ValueError(f'audio must be (N,) or (N, C), got shape {np.shape(audio)}.')
  if isinstance(info_or_rate, AudioInfo):
    info = info_or_rate
    out_rate = info.sample_rate
    src_rate = audio_rate or info.model_rate or info.sample_rate
    out_channels = channels or info.channels
    x = resample(x, src_rate, out_rate)
    n = info.num_frames
    x = x[:n] if x.shape[0] >= n else np.pad(x, ((0, n - x.shape[0]), (0, 0)))
  else:
    out_rate = int(info_or_rate)
    if audio_rate:
      x = resample(x, audio_rate, out_rate)
    out_channels = channels or x.shape[1]
  if x.shape[1] != out_channels:
    if x.shape[1] == 1:
      x = np.repeat(x, out_channels, axis=1)
    elif out_channels == 1:
      x = x.mean(axis=1, keepdims=True)
    else:
      raise ValueError(f'Cannot map {x.shape[1]} channels to {out_channels}.')
  ext = os.path.splitext(path)[1].lower()
  if ext in ('.ogg', '.oga'):
    kwargs = dict(format='OGG', subtype='VORBIS')
  else:
    kwargs = dict(subtype=subtype)
  if not kwargs.get('subtype', '').startswith(('FLOAT', 'DOUBLE')):
    clipped = int(np.count_nonzero(np.abs(x) > 1.0))
    if clipped:
      logging.warning('save_audio(%s): clipping %d samples beyond [-1, 1].', path, clipped)
      x = np.clip(x, -1.0, 1.0)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  sf.write(path, x, out_rate, **kwargs)
