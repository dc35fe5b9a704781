"""How separated stems are stored: file format, sample format, clipping, file names.

Separation streams each stem into a float32 WAV in a hidden scratch folder (so a song of any
length is never held in memory); `finish` then turns each into the requested file. Integer
formats cannot hold samples beyond [-1, 1], and a stem can exceed full scale even when the
mixture does not (two stems in opposite phase), so clipping is handled explicitly, as
Demucs does:

* `rescale` (the default): a stem whose peak exceeds 1/1.01 is scaled by 1 / (1.01 peak)
  as a whole (one gain per stem file), so nothing clips; the stems then no longer sum
  exactly to the mixture, and the command says by how much each was turned down.
* `clamp`: samples beyond [-1, 1] are clipped (counted and reported).
* `none`: samples are kept as they are, which only float32 files can store.

Integer samples are rounded here (x * 2^(bits-1), clipped to the integer range) and written
as integers, so a 16-bit file holds exactly round(32768 x) and the report matches the file.
The scratch file is renamed into place when it already is what was asked for (float32 WAV,
nothing to rescale or clamp); otherwise one more streaming pass writes the final file.
"""
import dataclasses
import os
import string
from typing import Dict, List, Optional, Sequence

import numpy as np

DEFAULT_FILENAME = '{track}/{stem}.{ext}'
FILENAME_FIELDS = ('track', 'trackext', 'stem', 'ext')
CLIP_MODES = ('rescale', 'clamp', 'none')
RESCALE_MARGIN = 1.01                 # Demucs' headroom: a rescaled stem peaks at 1/1.01
_BLOCK = 1 << 16
_WAV_LIMIT = 0xFFFFFFF0 - 4096        # bytes of data a RIFF WAV can hold; beyond: RF64


@dataclasses.dataclass(frozen=True)
class OutputFormat:
  """What the stem files are.

  Attributes:
    subtype: 'PCM_16' (the command's default), 'PCM_24' (--int24) or 'FLOAT' (--float32).
    container: 'WAV' or 'FLAC' (--flac; integer samples only).
    clip_mode: 'rescale', 'clamp' or 'none' (see the module docstring).
    filename: where each stem goes under the output folder, a template of {track} (the
      song's name without extension), {trackext} (its extension), {stem} and {ext}.
    two_stems: a stem name: write it and `no_<stem>` (the sum of the others) only.
  """
  subtype: str = 'PCM_16'
  container: str = 'WAV'
  clip_mode: str = 'rescale'
  filename: str = DEFAULT_FILENAME
  two_stems: Optional[str] = None

  @classmethod
  def exact(cls) -> 'OutputFormat':
    """float32 WAV, samples kept as the model made them (the library's default)."""
    return cls(subtype='FLOAT', clip_mode='none')

  @property
  def ext(self) -> str:
    return self.container.lower()

  def stem_names(self, stems: Sequence[str]) -> List[str]:
    """Names of the files written for a model's `stems`."""
    return [self.two_stems, f'no_{self.two_stems}'] if self.two_stems else list(stems)

  def check(self, stems: Optional[Sequence[str]] = None) -> None:
    """Refuses impossible combinations before any separation (--two-stems is checked
    against `stems` when given).

    Raises:
      ValueError: naming the option to change.
    """
    if self.subtype not in ('PCM_16', 'PCM_24', 'FLOAT'):
      raise ValueError(f'Unknown sample format {self.subtype!r}.')
    if self.container not in ('WAV', 'FLAC'):
      raise ValueError(f'Unknown file format {self.container!r}.')
    if self.clip_mode not in CLIP_MODES:
      raise ValueError(f'--clip-mode must be one of {", ".join(CLIP_MODES)}, got '
                       f'{self.clip_mode!r}.')
    if self.container == 'FLAC' and self.subtype == 'FLOAT':
      raise ValueError('FLAC stores integer samples only: use --flac alone (16-bit) or with '
                       '--int24, or --float32 without --flac.')
    if self.clip_mode == 'none' and self.subtype != 'FLOAT':
      raise ValueError('--clip-mode none keeps samples beyond [-1, 1], which only --float32 '
                       'files can store; use rescale or clamp for integer samples.')
    if self.two_stems is not None and stems is not None and self.two_stems not in stems:
      raise ValueError(f'--two-stems {self.two_stems}: the model separates '
                       f'{", ".join(stems)}; choose one of them.')
    check_filename(self.filename)

  def relative_paths(self, track: str, trackext: str, stems: Sequence[str]) -> List[str]:
    """The stem files' paths under the output folder, in the order of `stem_names`."""
    return [os.path.normpath(self.filename.format(track=track, trackext=trackext, stem=s,
                                                  ext=self.ext))
            for s in self.stem_names(stems)]


def check_filename(template: str) -> None:
  """A --filename template names each stem's file distinctly and stays in the output folder.

  Raises:
    ValueError: unknown fields, no {stem}, an absolute path or one leaving the folder.
  """
  try:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
  except ValueError as e:
    raise ValueError(f'--filename {template!r} is not a valid template ({e}).') from e
  unknown = fields - set(FILENAME_FIELDS)
  if unknown:
    raise ValueError(f'--filename {template!r} uses {", ".join(sorted(unknown))}; the fields '
                     f'are {{{"}, {".join(FILENAME_FIELDS)}}}.')
  if 'stem' not in fields:
    raise ValueError(f'--filename {template!r} has no {{stem}}: every stem would be written '
                     'to the same file.')
  sample = os.path.normpath(template.format(track='t', trackext='wav', stem='s', ext='wav'))
  if os.path.isabs(sample) or sample.split(os.sep)[0] == '..':
    raise ValueError(f'--filename {template!r} must stay inside the output folder (a '
                     'relative path without ..).')


def rescale_gain(peak: float) -> float:
  """Demucs' `rescale`: 1 / max(1.01 peak, 1)."""
  return 1.0 / max(RESCALE_MARGIN * float(peak), 1.0)


def _quantize(x: np.ndarray, subtype: str) -> np.ndarray:
  """Float samples in [-1, 1] -> the integers the file will hold (int16; int32 holding 24 bits
  in its top bytes, which is how libsndfile writes int32 data to a 24-bit file)."""
  if subtype == 'PCM_16':
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
  if subtype == 'PCM_24':
    q = np.clip(np.round(x.astype(np.float64) * 8388608.0), -8388608, 8388607)
    return (q.astype(np.int32) << 8)
  return x.astype(np.float32)


def _open(path: str, rate: int, channels: int, frames: int, fmt: OutputFormat):
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  container = fmt.container
  width = {'PCM_16': 2, 'PCM_24': 3, 'FLOAT': 4}[fmt.subtype]
  if container == 'WAV' and frames * channels * width > _WAV_LIMIT:
    container = 'RF64'
  return sf.SoundFile(path, 'w', rate, channels, subtype=fmt.subtype, format=container)


def finish(scratch: str, dst: str, fmt: OutputFormat, peak: float) -> Dict[str, float]:
  """Turns the float32 scratch WAV of one stem into `dst` in the requested format.

  Returns:
    {'gain': the factor applied (rescale; 1.0 otherwise), 'clipped': samples clamped}.
  """
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  gain = rescale_gain(peak) if fmt.clip_mode == 'rescale' else 1.0
  needs_clip = fmt.clip_mode == 'clamp' and peak > 1.0
  if (fmt.subtype == 'FLOAT' and fmt.container == 'WAV' and gain == 1.0
      and not needs_clip):
    os.replace(scratch, dst)
    return {'gain': 1.0, 'clipped': 0}
  clipped = 0
  with sf.SoundFile(scratch) as src:
    with _open(dst, src.samplerate, src.channels, src.frames, fmt) as out:
      while True:
        x = src.read(_BLOCK, dtype='float32', always_2d=True)
        if not len(x):
          break
        if gain != 1.0:
          x = x * np.float32(gain)
        if fmt.clip_mode != 'none':
          over = np.abs(x) > 1.0
          if over.any():
            clipped += int(np.count_nonzero(over))
            x = np.clip(x, -1.0, 1.0)
        out.write(_quantize(x, fmt.subtype))
  os.remove(scratch)
  return {'gain': gain, 'clipped': clipped}


def describe(results: Dict[str, Dict[str, float]], fmt: OutputFormat) -> str:
  """'; bass turned down 1.2 dB to fit' style notes for the command's report ('' if none)."""
  notes = []
  for stem, r in results.items():
    if r['gain'] < 1.0:
      notes.append(f'{stem} turned down {-20 * np.log10(r["gain"]):.1f} dB to fit')
    if r['clipped']:
      notes.append(f'{stem}: {r["clipped"]} samples clamped')
  if not notes:
    return ''
  return '; ' + ', '.join(notes) + (' (--clip-mode)' if fmt.clip_mode != 'none' else '')
