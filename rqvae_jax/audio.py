"""Loading, checking and saving user audio for separation.

The model works on mono audio at one sample rate (22 050 Hz); users bring files at any rate
and channel count. `load_audio` downmixes and resamples, and returns an `AudioInfo` receipt
so that `save_audio` can write each separated stem back at the file's own rate, channel
count and length. `inspect_audio` checks a file in one streaming pass (constant memory), for
the separate command, which then streams it block by block. Reading goes through soundfile
(libsndfile): WAV, FLAC, OGG/Vorbis, AIFF, ... Resampling uses soxr (high quality, linear
phase).

Checks shared by every reader (training data included: `data.slakh` uses `wav_problem`):
a WAV whose header promises more data than the file holds is truncated (libsndfile would
silently read what is there); NaN/inf samples, and finite samples beyond `MAX_ABS_SAMPLE`
(a float file scaled by mistake, e.g. int16 values stored as float), are refused, since
the model only ever saw audio within about [-1, 1] and would return garbage.
"""
import dataclasses
import logging
import os
from typing import Iterator, Optional, Union

import numpy as np
import soundfile as sf
import soxr

# Largest |sample| accepted: 40 dB above full scale. Float files may exceed 1.0 a little
# (mixes without a limiter); values far beyond it are not audio at full scale.
MAX_ABS_SAMPLE = 100.0
# A RIFF/data chunk size of 0xFFFFFFFF means "unknown, read to the end of the file": what
# streaming writers (e.g. ffmpeg to a pipe) leave in the header. RF64 files put the real
# sizes in their ds64 chunk and 0xFFFFFFFF in the 32-bit fields.
UNKNOWN_SIZE = 0xFFFFFFFF
BLOCK_FRAMES = 1 << 16         # frames per read in the streaming paths (1.5 s at 44.1 kHz)


@dataclasses.dataclass(frozen=True)
class AudioInfo:
  """What `load_audio` / `inspect_audio` read, so that outputs can be restored to the same
  format.

  Attributes:
    sample_rate: rate of the file, in Hz.
    channels: channel count of the file.
    num_frames: length of the file in frames at `sample_rate`.
    path: the file read.
    model_rate: rate of the array `load_audio` returned (the rate it resampled to).
    subtype: libsndfile subtype of the file, e.g. 'PCM_16' (informative).
    peak: largest |sample| of the file (0.0: digital silence); None when not measured.
  """
  sample_rate: int
  channels: int
  num_frames: int
  path: str = ''
  model_rate: Optional[int] = None
  subtype: str = ''
  peak: Optional[float] = None


def wav_problem(path: str) -> Optional[str]:
  """Checks a RIFF/WAVE (or RF64) header against the file size; None when it is consistent.

  libsndfile silently reads what is there when the data chunk runs past the end of the
  file, so a truncated download or copy has to be caught on the header itself. A data size
  of 0xFFFFFFFF in a RIFF file means "until the end of the file" (streaming writers cannot
  seek back to fill it in) and is accepted; in an RF64 file the real size is in ds64.
  """
  try:
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      head = f.read(12)
      if len(head) < 12 or head[:4] not in (b'RIFF', b'RF64') or head[8:12] != b'WAVE':
        return 'not a RIFF/WAVE file'
      rf64_data_size = None
      pos = 12
      while pos + 8 <= size:
        f.seek(pos)
        chunk = f.read(8)
        cid, csize = chunk[:4], int.from_bytes(chunk[4:8], 'little')
        if cid == b'ds64' and csize >= 16:
          rf64_data_size = int.from_bytes(f.read(16)[8:16], 'little')
        if cid == b'data':
          avail = size - pos - 8
          if csize == UNKNOWN_SIZE:
            if rf64_data_size is None:       # streaming header: the data runs to the end
              return None
            csize = rf64_data_size
          if csize > avail:
            return (f'truncated: the data chunk declares {csize} bytes, the file holds '
                    f'{avail}')
          return None
        if csize == UNKNOWN_SIZE:
          return f'malformed: chunk {cid!r} has an unknown size before the data chunk'
        pos += 8 + csize + (csize & 1)
      return 'truncated or malformed: no data chunk'
  except OSError as e:
    return f'unreadable ({e})'


def check_path(path: str) -> str:
  """Checks that `path` names a readable audio file before any decoding; returns it as str.

  Raises:
    ValueError: a missing path, a folder, or a RIFF/WAVE file whose header does not match
      its size (truncated), each with what to do about it.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f'{path} is a folder, not an audio file: give the files themselves '
                     f'(e.g. {os.path.join(path, "*.wav")}).')
  if not os.path.isfile(path):
    raise ValueError(f'Audio file not found: {path}')
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic in (b'RIFF', b'RF64'):       # checked by content, whatever the extension
    problem = wav_problem(path)
    if problem:
      raise ValueError(f'Audio file {path} is {problem}; re-download or re-export it.'
                       if problem.startswith('truncated') else
                       f'Audio file {path}: {problem}; re-export it as WAV or FLAC.')
  elif os.path.splitext(path)[1].lower() in NEEDS_FFMPEG:
    try:                                # named like AAC: refused now, unless it decodes
      sf.info(path)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
      raise _read_error(path, e) from e
  return path


def sample_problem(block: np.ndarray, first_frame: int = 0) -> Optional[str]:
  """NaN/inf samples or |samples| > MAX_ABS_SAMPLE in a (n, C) block; None when fine."""
  finite = np.isfinite(block)
  if not finite.all():
    bad = np.argwhere(~finite)
    return (f'has {len(bad)} NaN/inf samples (first at frame {first_frame + bad[0, 0]}, '
            f'channel {bad[0, 1]})')
  loud = np.abs(block) > MAX_ABS_SAMPLE
  if loud.any():
    bad = np.argwhere(loud)
    peak = float(np.max(np.abs(block)))
    return (f'has samples up to {peak:.3g} (first beyond {MAX_ABS_SAMPLE:g} at frame '
            f'{first_frame + bad[0, 0]}, channel {bad[0, 1]}), where full scale is 1.0: '
            'rescale the file to peak 1.0 (it looks like integer sample values stored as '
            'float) and separate it again')
  return None


# Formats libsndfile does not decode (containers of AAC, ALAC, WMA...): ffmpeg converts them.
NEEDS_FFMPEG = ('.m4a', '.aac', '.mp4', '.m4b', '.alac', '.wma', '.webm', '.mkv', '.ac3')


def _read_error(path: str, e: Exception) -> ValueError:
  ext = os.path.splitext(path)[1].lower()
  if ext in NEEDS_FFMPEG:
    return ValueError(f'Cannot read audio file {path}: libsndfile does not decode {ext} '
                      f'(AAC/ALAC/WMA); convert it with ffmpeg first, e.g. `ffmpeg -i {path} '
                      f'{os.path.splitext(path)[0]}.flac`.')
  return ValueError(f'Cannot read audio file {path}: {e}. Expected a file that libsndfile '
                    '(soundfile) decodes: WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF, ...')


def read_blocks(path: str, block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
  """Yields the file as float32 (n, C) blocks of `block_frames` frames (the last shorter)."""
  try:
    with sf.SoundFile(path) as f:
      while True:
        block = f.read(block_frames, dtype='float32', always_2d=True)
        if not len(block):
          return
        yield block
  except (sf.LibsndfileError, RuntimeError, TypeError) as e:
    raise _read_error(path, e) from e


def inspect_audio(path: str, block_frames: int = BLOCK_FRAMES) -> AudioInfo:
  """Checks a whole file in one streaming pass (constant memory) and measures its peak.

  Raises:
    ValueError: missing, folder, truncated, unreadable, empty, NaN/inf or absurd samples.
  """
  path = check_path(path)
  try:
    with sf.SoundFile(path) as f:
      rate, channels, subtype = int(f.samplerate), int(f.channels), f.subtype
  except (sf.LibsndfileError, RuntimeError, TypeError) as e:
    raise _read_error(path, e) from e
  frames, peak = 0, 0.0
  for block in read_blocks(path, block_frames):
    problem = sample_problem(block, frames)
    if problem:
      raise ValueError(f'Audio file {path} {problem}.')
    peak = max(peak, float(np.max(np.abs(block))))
    frames += block.shape[0]
  if frames == 0 or channels == 0:
    raise ValueError(f'Audio file {path} is empty (0 frames).')
  return AudioInfo(sample_rate=rate, channels=channels, num_frames=frames, path=path,
                   subtype=subtype, peak=peak)


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


def resample_stream(blocks, from_rate: int, to_rate: int, channels: int
                    ) -> Iterator[np.ndarray]:
  """Resamples an iterable of (n, C) blocks with soxr's streaming resampler.

  The output is the same as `resample` on the whole signal (soxr keeps the filter state
  between blocks and flushes it at the end), without holding the signal in memory.
  """
  if int(from_rate) == int(to_rate):
    for block in blocks:
      yield np.asarray(block, np.float32)
    return
  if from_rate <= 0 or to_rate <= 0:
    raise ValueError(f'Sample rates must be positive, got {from_rate} -> {to_rate}.')
  stream = soxr.ResampleStream(int(from_rate), int(to_rate), int(channels), dtype='float32',
                               quality='HQ')
  for block in blocks:
    out = stream.resample_chunk(np.ascontiguousarray(block, np.float32), last=False)
    if len(out):
      yield out.reshape(-1, channels)
  out = stream.resample_chunk(np.zeros((0, channels), np.float32), last=True)
  if len(out):
    yield out.reshape(-1, channels)


def load_audio(path: str, target_rate: int, min_frames: int = 1):
  """Reads a whole audio file as float32 mono at `target_rate`.

  Args:
    path: any file libsndfile reads (WAV, FLAC, OGG, AIFF, ...).
    target_rate: the model's sample rate.
    min_frames: the shortest acceptable length at `target_rate` (e.g. the model's hop).

  Returns:
    (audio, info): audio float32 (N,), the channel mean resampled to `target_rate`;
    info the `AudioInfo` needed by `save_audio` to restore rate, channels and length.

  Raises:
    ValueError: missing, folder, truncated, unreadable, empty, NaN/inf, absurd or too short.
  """
  path = check_path(path)
  try:
    data, rate = sf.read(path, dtype='float32', always_2d=True)
    subtype = sf.info(path).subtype
  except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
    raise _read_error(path, e) from e
  if data.shape[0] == 0 or data.shape[1] == 0:
    raise ValueError(f'Audio file {path} is empty (0 frames).')
  problem = sample_problem(data)
  if problem:
    raise ValueError(f'Audio file {path} {problem}.')
  info = AudioInfo(sample_rate=int(rate), channels=int(data.shape[1]),
                   num_frames=int(data.shape[0]), path=path, model_rate=int(target_rate),
                   subtype=subtype, peak=float(np.max(np.abs(data))))
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
  beyond [-1, 1] are clipped (with a warning). Pass subtype='FLOAT' to keep them. NaN/inf
  samples are refused: libsndfile would write them as -1.0 (full-scale clicks) in 16-bit.

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
  bad = int(np.count_nonzero(~np.isfinite(x)))
  if bad:
    raise ValueError(f'Not writing {path}: the audio has {bad} NaN/inf samples (a diverged '
                     'model or a broken checkpoint?); nothing was written.')
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
