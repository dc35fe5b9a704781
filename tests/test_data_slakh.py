"""Scan and prepare of the Slakh2100 layout, on small trees written here."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import soxr

from configs import rqvae
from data import prepare as prepare_lib
from data import slakh

SR = 22050
STEMS = ('bass', 'drums', 'guitar', 'piano')


def small_config():
  d = rqvae.get_config('smoke').data
  d.min_track_seconds = 0.5
  d.max_track_seconds = 30.0
  return d


def tone(n, freq, rate=SR, channels=1, seed=0, amp=0.3):
  t = np.arange(n) / rate
  x = amp * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(seed).standard_normal(n)
  x = x.astype(np.float32)
  return np.stack([x, 0.5 * x], 1)[:, :channels] if channels > 1 else x


def write_track(folder, n=SR, rate=SR, channels=1, ext='wav', lengths=None, subtype='PCM_16',
                stems=STEMS):
  os.makedirs(folder, exist_ok=True)
  for i, s in enumerate(stems):
    m = lengths[s] if lengths and s in lengths else n
    sf.write(os.path.join(folder, f'{s}.{ext}'), tone(m, 110 * (i + 1), rate, channels, i),
             rate, subtype=subtype)


def bad_tree(root):
  """One good track and one of each problem; returns {track name: expected reason part}."""
  split = os.path.join(root, 'train')
  write_track(os.path.join(split, 'Track00001'))
  write_track(os.path.join(split, 'Track00002'), stems=('bass', 'drums', 'piano'))
  write_track(os.path.join(split, 'Track00003'), lengths={'drums': SR - 100})
  write_track(os.path.join(split, 'Track00004'), rate=44100, n=44100)
  write_track(os.path.join(split, 'Track00005'), channels=2)
  write_track(os.path.join(split, 'Track00006'))
  path = os.path.join(split, 'Track00006', 'guitar.wav')
  with open(path, 'rb+') as f:
    f.truncate(os.path.getsize(path) - 5000)
  write_track(os.path.join(split, 'Track00007'), subtype='FLOAT')
  x, _ = sf.read(os.path.join(split, 'Track00007', 'piano.wav'), dtype='float32')
  x[1234] = np.nan
  sf.write(os.path.join(split, 'Track00007', 'piano.wav'), x, SR, subtype='FLOAT')
  os.makedirs(os.path.join(split, 'Track00008'))
  write_track(os.path.join(split, 'Track00009'), n=SR // 4)
  write_track(os.path.join(split, 'Track00010'), ext='flac')
  return {
      'Track00002': 'missing stem(s): guitar.wav',
      'Track00003': 'unequal lengths',
      'Track00004': '44100 Hz, expected 22050 Hz',
      'Track00005': '2 channels, expected mono',
      'Track00006': 'guitar.wav truncated',
      'Track00007': 'piano.wav has non-finite samples',
      'Track00008': 'missing stem(s): bass.wav, drums.wav, guitar.wav, piano.wav',
      'Track00009': 'duration 0.25 s outside [0.5, 30) s',
      'Track00010': 'found bass.flac',
  }


def test_scan_accepts_good_tree(tmp_path):
  for i in range(3):
    write_track(str(tmp_path / 'train' / f'Track{i + 1:05d}'), n=SR + i)
  report = slakh.scan(str(tmp_path), 'train', small_config(), verbose=False)
  assert [t.name for t in report.kept] == ['Track00001', 'Track00002', 'Track00003']
  assert [t.num_frames for t in report.kept] == [SR, SR + 1, SR + 2]
  assert report.dropped == []
  assert '3 tracks kept' in report.summary()


def test_scan_names_each_problem(tmp_path):
  expected = bad_tree(str(tmp_path))
  report = slakh.scan(str(tmp_path), 'train', small_config(), verbose=False)
  assert [t.name for t in report.kept] == ['Track00001']
  reasons = {os.path.basename(p): r for p, r in report.dropped}
  assert set(reasons) == set(expected)
  for name, part in expected.items():
    assert part in reasons[name], (name, reasons[name])
  summary = report.summary()
  assert '1 tracks kept' in summary and '9 dropped' in summary
  assert all(name in summary for name in expected)


def test_scan_default_duration_limits(tmp_path):
  write_track(str(tmp_path / 'test' / 'Track00001'), n=SR * 2)
  with pytest.raises(ValueError, match=r'duration 2.00 s outside \[12, 640\) s'):
    slakh.scan(str(tmp_path), 'test', rqvae.get_config('paper').data, verbose=False)


def test_scan_empty_folder_is_a_clear_error(tmp_path):
  os.makedirs(tmp_path / 'train')
  with pytest.raises(ValueError) as e:
    slakh.scan(str(tmp_path), 'train', small_config(), verbose=False)
  assert str(tmp_path) in str(e.value)
  assert 'TrackNNNNN/{bass,drums,guitar,piano}.wav' in str(e.value)
  with pytest.raises(ValueError, match='is not a folder'):
    slakh.scan(str(tmp_path / 'nowhere'), 'train', small_config(), verbose=False)


def test_prepare_fixes_the_fixable(tmp_path):
  src, dst = str(tmp_path / 'src'), str(tmp_path / 'dst')
  bad_tree(src)
  # Fixable too: a stereo 44.1 kHz FLAC track with stems of unequal length.
  write_track(os.path.join(src, 'train', 'Track00011'), rate=44100, n=44100, channels=2,
              ext='flac', lengths={'piano': 44000})
  report = prepare_lib.prepare(src, dst, small_config(), workers=1, verbose=False)
  status = {os.path.basename(s): (st, msg) for s, st, msg in report.results}
  fixed = ['Track00001', 'Track00003', 'Track00004', 'Track00005', 'Track00010', 'Track00011']
  dropped = ['Track00002', 'Track00006', 'Track00007', 'Track00008', 'Track00009']
  assert sorted(n for n, (st, _) in status.items() if st == 'written') == fixed
  assert sorted(n for n, (st, _) in status.items() if st == 'dropped') == dropped
  assert 'truncated' in status['Track00006'][1]
  assert 'NaN' in status['Track00007'][1]
  assert 'resampled 44100 Hz' in status['Track00011'][1]
  assert 'downmixed 2 ch' in status['Track00011'][1]
  assert 'converted FLAC' in status['Track00011'][1]
  scan = slakh.scan(dst, 'train', small_config(), verbose=False)
  assert scan.dropped == []
  assert [t.name for t in scan.kept] == fixed
  assert {t.name: t.num_frames for t in scan.kept}['Track00011'] == SR
  # The content survives: the downmixed, resampled bass matches a direct conversion.
  got, rate = sf.read(os.path.join(dst, 'train', 'Track00011', 'bass.wav'), dtype='float32')
  ref = soxr.resample(tone(44100, 110, 44100, 2, 0).mean(1), 44100, SR)
  assert rate == SR and np.abs(got - ref).max() < 2e-3
  # Resumable: a second run keeps what is there.
  again = prepare_lib.prepare(src, dst, small_config(), workers=1, verbose=False)
  assert sorted(os.path.basename(s) for s, st, _ in again.results if st == 'existing') == fixed


def test_prepare_original_slakh_layout(tmp_path):
  src, dst = tmp_path / 'slakh', str(tmp_path / 'dst')
  track = src / 'validation' / 'Track01501'
  os.makedirs(track / 'stems')
  rate, n = 44100, 44100
  parts = {'S00': ('Bass', False, 55), 'S01': ('Drums', True, 200),
           'S02': ('Guitar', False, 330), 'S03': ('Strings', False, 500),
           'S04': ('Piano', False, 262), 'S05': ('Guitar', False, 440)}
  lines = ['UUID: x', 'audio_dir: stems', 'stems:']
  for sid, (cls, drum, freq) in parts.items():
    lines += [f'  {sid}:', f'    inst_class: {cls}', f'    is_drum: {str(drum).lower()}',
              '    audio_rendered: true']
    sf.write(str(track / 'stems' / f'{sid}.flac'), tone(n, freq, rate, 2, seed=freq), rate)
  (track / 'metadata.yaml').write_text('\n'.join(lines) + '\n')
  report = prepare_lib.prepare(str(src), dst, small_config(), workers=1, verbose=False)
  assert [st for _, st, _ in report.results] == ['written']
  scan = slakh.scan(dst, 'validation', small_config(), verbose=False)
  assert [t.name for t in scan.kept] == ['Track01501']
  got, _ = sf.read(os.path.join(dst, 'validation', 'Track01501', 'guitar.wav'), dtype='float32')
  both = (tone(n, 330, rate, 2, 330) + tone(n, 440, rate, 2, 440)).mean(1)
  assert np.abs(got - soxr.resample(both, rate, SR)).max() < 2e-3
  # The strings stem (500 Hz) is in no output stem.
  mix = sum(sf.read(os.path.join(dst, 'validation', 'Track01501', f'{s}.wav'))[0]
            for s in STEMS)
  spec = np.abs(np.fft.rfft(mix))
  freqs = np.fft.rfftfreq(mix.size, 1 / SR)
  assert spec[np.argmin(np.abs(freqs - 500))] < 0.01 * spec[np.argmin(np.abs(freqs - 262))]


def test_cli_scan_and_prepare(tmp_path):
  src = str(tmp_path / 'src')
  bad_tree(src)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], capture_output=True,
                                     text=True, cwd=repo, check=False)
  out = run('data.slakh', 'scan', src, '--split', 'train', '--config', 'smoke',
            '--min-seconds', '0.5', '--json')
  assert out.returncode == 0, out.stderr
  assert 'dropped Track00006: guitar.wav truncated' in out.stdout
  listing = json.loads(out.stdout.strip().splitlines()[-1])
  assert [(os.path.basename(t['path']), t['num_frames'], t['sample_rate'])
          for t in listing['train']] == [('Track00001', SR, SR)]
  out = run('data.slakh', 'scan', src, '--split', 'train', '--config', 'smoke')
  assert out.returncode == 1 and 'No usable tracks' in out.stdout  # all shorter than 12 s
  dst = str(tmp_path / 'dst')
  out = run('data.prepare', src, dst, '--config', 'smoke', '--min-seconds', '0.5',
            '--splits', 'train', '--workers', '1')
  assert out.returncode == 0, out.stderr
  assert '5 tracks kept' in out.stdout and '0 dropped' in out.stdout
  out = run('data.prepare', str(tmp_path / 'nothing'), dst, '--config', 'smoke')
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert out.stderr.startswith(f"error: Source folder {tmp_path / 'nothing'} does not exist")


def test_missing_stems_as_silence(tmp_path):
  """MSDM's evaluation reads an absent stem as zeros; scan and prepare can do the same."""
  bad_tree(str(tmp_path / 'src'))
  report = slakh.scan(str(tmp_path / 'src'), 'train', small_config(), verbose=False,
                      missing_stems='zeros')
  kept = {t.name: t for t in report.kept}
  assert sorted(kept) == ['Track00001', 'Track00002']
  assert kept['Track00002'].missing == ('guitar',)
  x = slakh.load_stems(kept['Track00002'], 100, 500, STEMS)
  assert not x[:, 2].any() and x[:, [0, 1, 3]].all()
  assert 'missing stem(s)' in dict(
      (os.path.basename(p), r) for p, r in report.dropped)['Track00008']
  prepared = prepare_lib.prepare(str(tmp_path / 'src'), str(tmp_path / 'dst'), small_config(),
                                 workers=1, fill_missing=True, verbose=False)
  status = {os.path.basename(s): (st, m) for s, st, m in prepared.results}
  assert status['Track00002'] == ('written', 'silent guitar')
  assert status['Track00008'][0] == 'dropped'
  guitar, _ = sf.read(str(tmp_path / 'dst' / 'train' / 'Track00002' / 'guitar.wav'))
  assert guitar.shape == (SR,) and not guitar.any()


def test_prepare_survives_a_corrupt_metadata_yaml_with_workers_and_overwrite(tmp_path):
  """One original-layout track with a broken metadata.yaml is dropped with the reason; the
  others are written by a process pool; --overwrite writes them again."""
  src, dst = tmp_path / 'src', str(tmp_path / 'dst')
  for name in ('Track00001', 'Track00002'):
    write_track(str(src / 'train' / name))
  for name, text in (('Track00003', 'stems: [unclosed\n  - x: {'), ('Track00004', '- a list\n')):
    os.makedirs(src / 'train' / name / 'stems')
    (src / 'train' / name / 'metadata.yaml').write_text(text)
  report = prepare_lib.prepare(str(src), dst, small_config(), workers=2, verbose=False)
  status = {os.path.basename(s): (st, msg) for s, st, msg in report.results}
  assert [status[n][0] for n in sorted(status)] == ['written', 'written', 'dropped', 'dropped']
  assert status['Track00003'][1].startswith('metadata.yaml unreadable')
  assert 'not a Slakh2100 metadata file' in status['Track00004'][1]
  folder = os.path.join(dst, 'train', 'Track00001')
  inode = os.stat(folder).st_ino
  again = prepare_lib.prepare(str(src), dst, small_config(), workers=2, verbose=False)
  assert [st for _, st, _ in again.results][:2] == ['existing', 'existing']
  again = prepare_lib.prepare(str(src), dst, small_config(), workers=2, overwrite=True,
                              verbose=False)
  assert [st for _, st, _ in again.results][:2] == ['written', 'written']
  assert os.stat(folder).st_ino != inode          # a new folder renamed into place
