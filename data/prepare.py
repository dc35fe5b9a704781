"""One-time conversion of music data into the prepared Slakh2100 layout.

    python -m data.prepare SRC DST [--config paper] [--splits train,validation,test]
                           [--workers N] [--overwrite]

SRC may be

* the original Slakh2100 (or its redux): SRC/{train,validation,test}/TrackNNNNN/ with
  metadata.yaml and stems/Snn.flac (or .wav). Each rendered stem is assigned by its
  `inst_class` (Bass, Drums or `is_drum`, Guitar, Piano); stems of one class are summed,
  every other class is dropped, and a class a track lacks becomes a silent stem (as MSDM
  does).
* a layout like ours with other formats: SRC/SPLIT/TRACK/{bass,drums,guitar,piano}.EXT in
  any sample rate, channel count or format libsndfile reads (WAV, FLAC, OGG, AIFF).

Every stem is downmixed to mono (channel mean) and resampled with soxr (HQ) to the
config's rate; stems of unequal length are zero-padded to the longest; a track whose
loudest stem would clip is scaled down as a whole. Tracks that cannot be fixed (missing
stem file unless --fill-missing, truncated or unreadable file, NaN/inf samples, duration
outside the config's limits) are reported and not written. Output is PCM_16 WAV, written to a temporary
folder per track and renamed, so an interrupted run can be resumed (existing tracks are
kept unless --overwrite). The result is then scanned with `data.slakh.scan`.
"""
import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
import soxr

from . import slakh

AUDIO_EXTS = ('.wav', '.flac', '.ogg', '.oga', '.aif', '.aiff', '.w64', '.rf64')
SPLIT_ALIASES = {'train': 'train', 'validation': 'validation', 'val': 'validation',
                 'valid': 'validation', 'test': 'test'}
SLAKH_CLASSES = {'Bass': 'bass', 'Drums': 'drums', 'Guitar': 'guitar', 'Piano': 'piano'}


@dataclasses.dataclass(frozen=True)
class _Job:
  src: str
  dst: str
  stems: Tuple[str, ...]
  sample_rate: int
  limits: Tuple[float, float]
  overwrite: bool
  fill_missing: bool = False


@dataclasses.dataclass(frozen=True)
class PrepareReport:
  """Per track: 'written' (with the fixes applied), 'existing' or 'dropped' (with why)."""
  dst: str
  results: List[Tuple[str, str, str]]  # (source folder, status, message)

  def summary(self) -> str:
    count = lambda s: sum(1 for _, st, _ in self.results if st == s)
    lines = [f'prepare -> {self.dst}: {count("written")} written, {count("existing")} '
             f'already there, {count("dropped")} dropped']
    for src, status, msg in self.results:
      if status == 'dropped' or (status == 'written' and msg):
        lines.append(f'  {status} {os.path.relpath(src, os.path.dirname(self.dst))}: {msg}')
    return '\n'.join(lines)


def _read_mono(path: str, rate: int) -> Tuple[np.ndarray, List[str]]:
  """Reads any libsndfile format as float32 mono at `rate`; raises ValueError if bad."""
  notes = []
  if path.lower().endswith('.wav'):
    problem = slakh.wav_problem(path)
    if problem:
      raise ValueError(f'{os.path.basename(path)} {problem}')
  try:
    data, src_rate = sf.read(path, dtype='float32', always_2d=True)
  except (sf.LibsndfileError, RuntimeError, ValueError) as e:
    raise ValueError(f'{os.path.basename(path)} unreadable ({e})') from e
  if not np.isfinite(data).all():
    raise ValueError(f'{os.path.basename(path)} has NaN/inf samples')
  if data.shape[1] > 1:
    notes.append(f'downmixed {data.shape[1]} ch')
  x = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
  if src_rate != rate:
    notes.append(f'resampled {src_rate} Hz')
    x = soxr.resample(x, src_rate, rate, quality='HQ').astype(np.float32)
  return np.ascontiguousarray(x, np.float32), notes


def _find(folder: str, stem: str) -> Optional[str]:
  for ext in AUDIO_EXTS:
    for name in (stem + ext, stem + ext.upper()):
      if os.path.isfile(os.path.join(folder, name)):
        return os.path.join(folder, name)
  return None


def _read_slakh_original(folder: str, job: _Job) -> Tuple[Dict[str, np.ndarray], List[str]]:
  import yaml  # pylint: disable=g-import-not-at-top
  # A corrupt metadata.yaml drops its track (a ValueError), not the whole prepare.
  try:
    with open(os.path.join(folder, 'metadata.yaml')) as f:
      meta = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ValueError(f'metadata.yaml unreadable ({" ".join(str(e).split())})') from e
  if not isinstance(meta, dict) or not isinstance(meta.get('stems') or {}, dict):
    raise ValueError('metadata.yaml is not a Slakh2100 metadata file (expected a mapping '
                     'with a "stems" mapping)')
  audio_dir = os.path.join(folder, str(meta.get('audio_dir') or 'stems'))
  sums: Dict[str, np.ndarray] = {}
  notes, used = [], []
  for sid, stem_meta in sorted((meta.get('stems') or {}).items(), key=lambda kv: str(kv[0])):
    stem_meta = stem_meta if isinstance(stem_meta, dict) else {}
    sid = str(sid)
    target = 'drums' if stem_meta.get('is_drum') else SLAKH_CLASSES.get(
        stem_meta.get('inst_class'))
    if target not in job.stems or stem_meta.get('audio_rendered') is False:
      continue
    path = _find(audio_dir, sid)
    if path is None:
      continue
    x, _ = _read_mono(path, job.sample_rate)
    prev = sums.get(target)
    if prev is not None:
      n = max(prev.shape[0], x.shape[0])
      x = np.pad(x, (0, n - x.shape[0])) + np.pad(prev, (0, n - prev.shape[0]))
    sums[target] = x
    used.append(f'{sid}->{target}')
  if not sums:
    raise ValueError(f'no {"/".join(job.stems)} stems rendered')
  absent = [s for s in job.stems if s not in sums]
  notes.append(f'original layout ({len(used)} stems used)')
  if absent:
    notes.append(f'silent {",".join(absent)}')
  return sums, notes


def _read_flat(folder: str, job: _Job) -> Tuple[Dict[str, np.ndarray], List[str]]:
  paths = {s: _find(folder, s) for s in job.stems}
  missing = [s for s, p in paths.items() if p is None]
  if missing and (not job.fill_missing or len(missing) == len(paths)):
    raise ValueError(f'missing stem(s): {", ".join(missing)}')
  out, notes = {}, set()
  if missing:
    notes.add(f'silent {",".join(missing)}')
  for s, p in paths.items():
    if p is None:
      continue
    out[s], n = _read_mono(p, job.sample_rate)
    notes.update(n)
    if not p.lower().endswith('.wav'):
      notes.add(f'converted {os.path.splitext(p)[1][1:].upper()}')
  return out, sorted(notes)


def _prepare_track(job: _Job) -> Tuple[str, str, str]:
  if os.path.isdir(job.dst) and not job.overwrite:
    return job.src, 'existing', ''
  try:
    if os.path.isfile(os.path.join(job.src, 'metadata.yaml')):
      stems, notes = _read_slakh_original(job.src, job)
    else:
      stems, notes = _read_flat(job.src, job)
    n = max(x.shape[0] for x in stems.values())
    if n == 0:
      raise ValueError('empty stems')
    short = {s: n - stems.get(s, np.zeros(0)).shape[0] for s in job.stems}
    padded = [f'{s} +{v}' for s, v in short.items() if v and s in stems]
    if padded:
      notes.append('padded ' + ', '.join(padded))
    full = {s: np.pad(stems[s], (0, n - stems[s].shape[0])) if s in stems
            else np.zeros(n, np.float32) for s in job.stems}
    seconds = n / job.sample_rate
    lo, hi = job.limits
    if not lo <= seconds < hi:
      raise ValueError(f'duration {seconds:.2f} s outside [{lo:g}, {hi:g}) s')
    peak = max(float(np.abs(x).max()) for x in full.values())
    if peak > 0.999:
      full = {s: x * np.float32(0.999 / peak) for s, x in full.items()}
      notes.append(f'scaled by {0.999 / peak:.3f} against clipping')
  except (ValueError, OSError) as e:
    return job.src, 'dropped', str(e)
  tmp = job.dst + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for s, x in full.items():
    sf.write(os.path.join(tmp, f'{s}.wav'), x, job.sample_rate, subtype='PCM_16')
  if os.path.isdir(job.dst):
    shutil.rmtree(job.dst)
  os.rename(tmp, job.dst)
  return job.src, 'written', '; '.join(notes)


def _split_dirs(src: str, splits: Sequence[str]) -> List[Tuple[str, str]]:
  found = []
  for d in sorted(os.listdir(src)):
    target = SPLIT_ALIASES.get(d.lower())
    if target in splits and os.path.isdir(os.path.join(src, d)):
      found.append((os.path.join(src, d), target))
  return found


def prepare(src: str, dst: str, data_config, splits: Sequence[str] = slakh.SPLITS,
            workers: Optional[int] = None, overwrite: bool = False,
            fill_missing: bool = False, verbose: bool = True) -> PrepareReport:
  """Converts SRC into the prepared layout under DST; returns what happened per track.

  fill_missing: write a silent stem for a stem file a (non-original-layout) track lacks,
  instead of dropping the track (the original layout always gets silent stems).
  """
  src, dst = os.path.abspath(os.path.expanduser(src)), os.path.abspath(os.path.expanduser(dst))
  if not os.path.isdir(src):
    raise ValueError(f'Source folder {src} does not exist.')
  if src == dst:
    raise ValueError('SRC and DST must differ.')
  split_dirs = _split_dirs(src, splits)
  if not split_dirs:
    raise ValueError(f'{src} has none of the split folders {", ".join(splits)} '
                     '(train, validation/val, test). Expected SRC/SPLIT/TRACK/...')
  jobs = []
  for split_dir, split in split_dirs:
    for d in sorted(os.listdir(split_dir)):
      folder = os.path.join(split_dir, d)
      if d.startswith('.') or not os.path.isdir(folder):
        continue
      jobs.append(_Job(src=folder, dst=os.path.join(dst, split, d),
                       stems=tuple(data_config.stems),
                       sample_rate=int(data_config.sample_rate),
                       limits=(float(data_config.min_track_seconds),
                               float(data_config.max_track_seconds)),
                       overwrite=overwrite, fill_missing=fill_missing))
  for split in {s for _, s in split_dirs}:
    os.makedirs(os.path.join(dst, split), exist_ok=True)
  workers = workers or min(os.cpu_count() or 1, 8)
  start = last = time.time()
  results = []
  if workers <= 1 or len(jobs) <= 2:
    iterator = map(_prepare_track, jobs)
    pool = None
  else:
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn'))
    iterator = pool.map(_prepare_track, jobs)
  try:
    for result in iterator:
      results.append(result)
      if verbose and time.time() - last > 10.0:
        print(f'prepare: {len(results)}/{len(jobs)} tracks', file=sys.stderr, flush=True)
        last = time.time()
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  report = PrepareReport(dst=dst, results=results)
  if verbose:
    print(report.summary(), file=sys.stderr)
    print(f'prepare: {time.time() - start:.1f} s', file=sys.stderr)
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m data.prepare', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('src')
  parser.add_argument('dst')
  parser.add_argument('--splits', default=','.join(slakh.SPLITS))
  parser.add_argument('--workers', type=int)
  parser.add_argument('--overwrite', action='store_true')
  parser.add_argument('--fill-missing', action='store_true',
                      help='write silence for a missing stem file instead of dropping')
  parser.add_argument('--verbose', action='store_true', help='tracebacks with errors')
  slakh.add_data_config_arguments(parser)
  from rqvae_jax import cli  # pylint: disable=g-import-not-at-top
  args = parser.parse_args(cli.argparse_argv(sys.argv[1:] if argv is None else argv))   # --a_b too
  data_config = slakh.data_config_from_args(args)
  splits = tuple(s.strip() for s in args.splits.split(',') if s.strip())
  try:
    report = prepare(args.src, args.dst, data_config, splits=splits, workers=args.workers,
                     overwrite=args.overwrite, fill_missing=args.fill_missing)
  except (ValueError, OSError) as e:      # a wrong SRC or DST: the sentence, not a traceback
    if args.verbose:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 1
  ok = True
  for split in splits:
    if not os.path.isdir(os.path.join(report.dst, split)):
      continue
    try:
      print(slakh.scan(report.dst, split, data_config, verbose=False).summary())
    except ValueError as e:
      print(f'error: {e}')
      ok = False
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
