"""Slakh2100 in the prepared layout: validation scan and windowed reads.

The layout is the one the multi-source diffusion models (MSDM) repository prepares:

    ROOT/{train,validation,test}/TrackNNNNN/{bass,drums,guitar,piano}.wav   (22 050 Hz mono)

`scan` checks every track (four stems, readable, not truncated, sample rate, mono, equal
lengths, finite samples for float WAVs, duration limits) and reports what it kept and why
it dropped the rest. `load_stems` reads one window by seeking, so training never loads
whole files. Other data (44.1 kHz, stereo, FLAC, the original Slakh2100 layout) is
converted once with `python -m data.prepare SRC DST`.

Command line:
    python -m data.slakh scan ROOT [--split train|validation|test|all] [--config VARIANT]
    python -m data.slakh prepare SRC DST ...      (same as python -m data.prepare)
"""
import argparse
import concurrent.futures
import dataclasses
import json
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf

# One header check for training data and user files (truncated WAVs, streaming headers);
# `slakh.wav_problem` stays importable from here for data.prepare.
from rqvae_jax.audio import wav_problem

SPLITS = ('train', 'validation', 'test')
SYNTHETIC_MANIFEST = 'synthetic.json'


def expected_layout(data_config) -> str:
  stems = ','.join(data_config.stems)
  return (f'ROOT/{{train,validation,test}}/TrackNNNNN/{{{stems}}}.wav, mono, '
          f'{data_config.sample_rate} Hz (the multi-source diffusion models layout); convert '
          'other data once with `python -m data.prepare SRC DST`')


@dataclasses.dataclass(frozen=True)
class Track:
  """A validated track folder.

  Attributes:
    path: the track folder (holds one `<stem>.wav` per stem).
    num_frames: length of every stem, in frames.
    sample_rate: their sample rate.
    missing: stems without a file, read as silence (only with missing_stems='zeros').
  """
  path: str
  num_frames: int
  sample_rate: int = 22050
  missing: Tuple[str, ...] = ()

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.path))

  def stem_path(self, stem: str) -> str:
    return os.path.join(self.path, f'{stem}.wav')


@dataclasses.dataclass(frozen=True)
class ScanReport:
  """What `scan` kept and dropped, with reasons."""
  root: str
  split: str
  kept: List[Track]
  dropped: List[Tuple[str, str]]
  duration_limits: Optional[Tuple[float, float]] = None

  def summary(self) -> str:
    hours = sum(t.num_frames / t.sample_rate for t in self.kept) / 3600.0
    lines = [f'{os.path.join(self.root, self.split)}: {len(self.kept)} tracks kept '
             f'({hours:.2f} h), {len(self.dropped)} dropped'
             + ('' if self.duration_limits else ' (synthetic set: no duration limits)')]
    lines += [f'  dropped {os.path.basename(p)}: {reason}' for p, reason in self.dropped]
    return '\n'.join(lines)


def _finite(path: str, block: int = 1 << 20) -> Optional[str]:
  for i, data in enumerate(sf.blocks(path, blocksize=block, dtype='float32', always_2d=True)):
    bad = ~np.isfinite(data)
    if bad.any():
      first = i * block + int(np.argmax(bad.any(axis=1)))
      return f'non-finite samples (NaN/inf), first at frame {first}'
  return None


def check_track(folder: str, stems: Sequence[str], sample_rate: int,
                duration_limits: Optional[Tuple[float, float]],
                missing_stems: str = 'drop'):
  """Returns (Track, None) for a usable track folder, else (None, reason)."""
  missing = [s for s in stems if not os.path.isfile(os.path.join(folder, f'{s}.wav'))]
  if missing and (missing_stems != 'zeros' or len(missing) == len(stems)):
    others = sorted(f for f in os.listdir(folder) if os.path.splitext(f)[0] in missing)
    hint = f' (found {", ".join(others)}: convert with python -m data.prepare)' if others else ''
    return None, f'missing stem(s): {", ".join(s + ".wav" for s in missing)}{hint}'
  present = [s for s in stems if s not in missing]
  problems, frames = [], {}
  for s in present:
    path = os.path.join(folder, f'{s}.wav')
    problem = wav_problem(path)
    if problem:
      problems.append(f'{s}.wav {problem}')
      continue
    try:
      info = sf.info(path)
      with sf.SoundFile(path) as f:  # decode the first and the last frames
        f.read(1024)
        if f.frames > 1024:
          f.seek(f.frames - 1024)
          f.read(1024)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
      problems.append(f'{s}.wav unreadable ({e})')
      continue
    if info.samplerate != sample_rate:
      problems.append(f'{s}.wav is {info.samplerate} Hz, expected {sample_rate} Hz')
    if info.channels != 1:
      problems.append(f'{s}.wav has {info.channels} channels, expected mono')
    if info.frames == 0:
      problems.append(f'{s}.wav is empty')
    if info.subtype.startswith(('FLOAT', 'DOUBLE')):  # integer PCM is always finite
      problem = _finite(path)
      if problem:
        problems.append(f'{s}.wav has {problem}')
    frames[s] = info.frames
  if problems:
    return None, '; '.join(problems)
  if len(set(frames.values())) > 1:
    return None, 'unequal lengths: ' + ', '.join(f'{s} {n}' for s, n in frames.items())
  n = frames[present[0]]
  seconds = n / sample_rate
  if duration_limits is not None:
    lo, hi = duration_limits
    if not lo <= seconds < hi:
      return None, f'duration {seconds:.2f} s outside [{lo:g}, {hi:g}) s'
  return Track(path=folder, num_frames=int(n), sample_rate=int(sample_rate),
               missing=tuple(missing)), None


def is_synthetic(root: str) -> bool:
  return os.path.isfile(os.path.join(root, SYNTHETIC_MANIFEST))


def scan(root: str, split: str, data_config, verbose: bool = True,
         missing_stems: Optional[str] = None) -> ScanReport:
  """Validates every track folder of ROOT/split; returns the usable ones.

  Track folders are the sub-folders of ROOT/split (hidden ones skipped), sorted by name.
  Real data must last `min_track_seconds <= d < max_track_seconds` (the original's 12 s
  and 640 s); the synthetic set (a root holding synthetic.json) sets its own durations
  and is exempt.

  `missing_stems` (default `data_config.missing_stems`, else 'drop'): 'drop' drops a
  track that lacks a stem file (the original RQ-VAE code); 'zeros' keeps it and reads
  the absent stems as silence (MSDM's evaluation does so).

  Raises:
    ValueError: when no track is usable, naming ROOT and the expected layout.
  """
  root = os.path.abspath(os.path.expanduser(root))
  split_dir = os.path.join(root, split)
  layout = expected_layout(data_config)
  if not os.path.isdir(split_dir):
    raise ValueError(f'No usable tracks: {split_dir} is not a folder. Expected {layout}.')
  limits = None if is_synthetic(root) else (float(data_config.min_track_seconds),
                                            float(data_config.max_track_seconds))
  folders = sorted(os.path.join(split_dir, d) for d in os.listdir(split_dir)
                   if not d.startswith('.') and os.path.isdir(os.path.join(split_dir, d)))
  stems, rate = tuple(data_config.stems), int(data_config.sample_rate)
  if missing_stems is None:
    missing_stems = data_config.get('missing_stems', 'drop')
  if missing_stems not in ('drop', 'zeros'):
    raise ValueError(f"missing_stems must be 'drop' or 'zeros', got {missing_stems!r}.")
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(lambda d: check_track(d, stems, rate, limits, missing_stems),
                            folders))
  kept = [t for t, _ in results if t is not None]
  dropped = [(d, r) for d, (t, r) in zip(folders, results) if t is None]
  report = ScanReport(root=root, split=split, kept=kept, dropped=dropped,
                      duration_limits=limits)
  if verbose:
    print(report.summary(), file=sys.stderr, flush=True)
  if not kept:
    detail = '' if not dropped else ' Problems: ' + '; '.join(
        f'{os.path.basename(p)}: {r}' for p, r in dropped[:5]) + (
            ' ...' if len(dropped) > 5 else '')
    raise ValueError(f'No usable tracks in {split_dir} (root {root}): {len(folders)} '
                     f'track folders, none valid.{detail} Expected {layout}.')
  return report


def load_stems(track: Track, start: int, length: int, stems: Sequence[str]) -> np.ndarray:
  """Reads frames [start, start + length) of every stem, seeking; zero-pads past the end.

  Returns:
    float32 (length, len(stems)); a stem with several channels is averaged, a missing
    one (Track.missing) is silence.
  """
  if start < 0 or length < 0:
    raise ValueError(f'start and length must be >= 0, got {start}, {length}.')
  out = np.zeros((length, len(stems)), np.float32)
  for i, stem in enumerate(stems):
    if stem in track.missing:
      continue
    with sf.SoundFile(track.stem_path(stem)) as f:
      if start >= f.frames:
        continue
      f.seek(start)
      data = f.read(min(length, f.frames - start), dtype='float32', always_2d=True)
    out[:data.shape[0], i] = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
  return out


def load_track(track: Track, stems: Sequence[str]) -> np.ndarray:
  """The whole track, float32 (num_frames, len(stems)) (evaluation, not training)."""
  return load_stems(track, 0, track.num_frames, stems)


def add_data_config_arguments(parser) -> None:
  """--config (a variant of configs/rqvae.py) and the track duration limits, for the CLIs."""
  parser.add_argument('--config', default='paper', help='variant of configs/rqvae.py')
  parser.add_argument('--min-seconds', type=float, help='default: data.min_track_seconds')
  parser.add_argument('--max-seconds', type=float, help='default: data.max_track_seconds')


def data_config_from_args(args):
  """The config's data section with the command line's duration limits applied."""
  from rqvae_jax import bundled  # pylint: disable=g-import-not-at-top
  rqvae = bundled.configs_module()
  data_config = rqvae.get_config(args.config).data
  if args.min_seconds is not None:
    data_config.min_track_seconds = args.min_seconds
  if args.max_seconds is not None:
    data_config.max_track_seconds = args.max_seconds
  return data_config


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == 'prepare':
    from . import prepare  # pylint: disable=g-import-not-at-top
    return prepare.main(argv[1:])
  parser = argparse.ArgumentParser(prog='python -m data.slakh', description=(
      'scan ROOT: validate a prepared Slakh2100 folder; prepare SRC DST: convert data '
      '(see python -m data.prepare --help).'))
  parser.add_argument('command', choices=['scan'])
  parser.add_argument('root')
  parser.add_argument('--split', default='all', choices=SPLITS + ('all',))
  add_data_config_arguments(parser)
  parser.add_argument('--json', action='store_true', help='print the kept tracks as JSON')
  from rqvae_jax import cli  # pylint: disable=g-import-not-at-top
  args = parser.parse_args(cli.argparse_argv(sys.argv[1:] if argv is None else argv))   # --a_b too
  data_config = data_config_from_args(args)
  ok = True
  listing = {}
  for split in (SPLITS if args.split == 'all' else (args.split,)):
    try:
      report = scan(args.root, split, data_config, verbose=False)
      print(report.summary())
      listing[split] = [dataclasses.asdict(t) for t in report.kept]
    except ValueError as e:
      print(f'error: {e}')
      ok = False
  if args.json:
    print(json.dumps(listing))
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
