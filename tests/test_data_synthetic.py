"""The synthetic mini-Slakh: determinism, plausibility, cache behaviour."""
import hashlib
import json
import os

import numpy as np
import pytest
import soundfile as sf

from benchmarks import synthetic_timbre
from configs import rqvae
from data import slakh
from data import synthetic

STEMS = ('bass', 'drums', 'guitar', 'piano')


def config(cache_dir, seed=0):
  d = rqvae.get_config('smoke').data
  d.synthetic.cache_dir = str(cache_dir)
  d.synthetic.seed = seed
  return d


def centroid(x, rate=22050):
  power = np.abs(np.fft.rfft(x)) ** 2
  return float((power * np.fft.rfftfreq(x.size, 1 / rate)).sum() / power.sum())


def test_generate_track_is_deterministic():
  d = rqvae.get_config('smoke').data
  a = synthetic.generate_track(3, 1, 'train', d)
  b = synthetic.generate_track(3, 1, 'train', d)
  assert list(a) == list(STEMS)
  for s in STEMS:
    assert a[s].dtype == np.float32 and a[s].ndim == 1
    np.testing.assert_array_equal(a[s], b[s])
  c = synthetic.generate_track(4, 1, 'train', d)
  other_split = synthetic.generate_track(3, 1, 'test', d)
  assert not np.array_equal(a['piano'], c['piano']) or a['piano'].size != c['piano'].size
  assert a['bass'].size != other_split['bass'].size or not np.array_equal(
      a['bass'], other_split['bass'])


# RMS per stem of smoke tracks 0..2 of the train split, seed 0, per generator version.
GOLDEN = {2: ([0.06106, 0.07284, 0.04834, 0.0, 58145], [0.11999, 0.05706, 0.0667, 0.0, 54006],
              [0.04475, 0.06072, 0.07964, 0.07749, 57827])}


def test_generator_version_matches_output():
  """Cached sets are keyed by GENERATOR_VERSION: changing the output must bump it.

  If this fails after a deliberate change of the generator, bump
  synthetic.GENERATOR_VERSION and record the new values here (tolerance covers BLAS
  rounding differences between machines).
  """
  d = rqvae.get_config('smoke').data
  golden = GOLDEN[synthetic.GENERATOR_VERSION]
  for index, expected in enumerate(golden):
    stems = synthetic.generate_track(0, index, 'train', d)
    got = [float(np.sqrt(np.mean(stems[s].astype(np.float64) ** 2))) for s in STEMS]
    np.testing.assert_allclose(got, expected[:4], rtol=2e-3, atol=1e-5)
    assert stems['bass'].size == expected[4]


def test_stems_are_plausible():
  """Each stem non-trivial with a plausible level and spectral centroid; bass below piano."""
  d = rqvae.get_config('paper').data
  d.synthetic.min_seconds, d.synthetic.max_seconds = 12.0, 14.0
  for index in range(4):
    stems = synthetic.generate_track(0, index, 'validation', d)
    n = stems['bass'].size
    assert 12.0 * 22050 <= n <= 14.0 * 22050
    assert all(x.size == n for x in stems.values())
    rms = {s: float(np.sqrt(np.mean(x ** 2))) for s, x in stems.items()}
    cen = {s: centroid(x) for s, x in stems.items()}
    for s in STEMS:
      assert 0.005 < rms[s] < 0.3, (index, s, rms[s])
      assert np.isfinite(stems[s]).all()
    assert 40 < cen['bass'] < 700, cen
    assert 300 < cen['drums'] < 6000, cen
    assert 150 < cen['guitar'] < 3000, cen
    assert 200 < cen['piano'] < 3000, cen
    assert cen['bass'] < cen['piano'], cen
    # No stem and no mixture clips.
    mix = sum(stems.values())
    assert max(np.abs(x).max() for x in stems.values()) < 1.0
    assert np.abs(mix).max() < 1.0


# Spectral flatness (librosa: geometric / arithmetic mean of the power spectrum, median
# over active frames) that a pitched stem must exceed. Most bins of a pitched stem's frame
# lie between or above its partials, so its flatness is about 0.56 x the power there over
# the total: a white floor 45 dB below the stem alone gives ~0.56 * 10^-4.5 = 1.8e-5 (the
# guitar and piano threshold); the bass's floor is rolled off above 2.5-5 kHz like a
# cabinet's, which lowers its flatness ~5x here, hence a lower bass threshold. Generator
# v1 (pure partials) gave 2e-9 (bass), 3e-6 (guitar) and 9e-6 (piano) on these tracks,
# v2 (pick/finger/hammer noise, fret buzz, detuned copies, a recording's noise floor)
# 4e-6, 2e-3 and 6e-5.
MIN_FLATNESS = {'bass': 5e-7, 'guitar': 2e-5, 'piano': 2e-5}


def test_timbre_is_realistic():
  """Guitar brighter than piano, drums mostly percussive, pitched stems not spectrally pure.

  Medians over six short tracks of the per-stem measures that
  `python -m benchmarks.synthetic_timbre` reports (there over 12 default-length tracks).
  Real General-MIDI renderings have guitars brighter than pianos (~2.1 vs 0.7-1.2 kHz)
  and drums with an HPSS harmonic share of 0.18-0.27; generator v1 had the guitar at
  0.97 kHz against the piano's 1.36 kHz and drums at 0.48 on these tracks.
  """
  d = rqvae.get_config('demo').data
  d.synthetic.min_seconds, d.synthetic.max_seconds = 4.0, 6.0
  stats = {s: [] for s in STEMS}
  for index in range(6):
    for s, x in synthetic.generate_track(0, index, 'train', d).items():
      r = synthetic_timbre.stem_stats(x, 22050, harmonic=s == 'drums')  # HPSS is slow
      if r is not None:  # a stem may be silent in so short a track
        stats[s].append(r)
  assert all(len(v) >= 4 for v in stats.values()), {s: len(v) for s, v in stats.items()}
  median = {s: {k: float(np.median([r[k] for r in v])) for k in v[0]}
            for s, v in stats.items()}
  assert median['guitar']['centroid_hz'] > median['piano']['centroid_hz'], median
  assert 1200 < median['guitar']['centroid_hz'] < 3000, median
  assert 600 < median['piano']['centroid_hz'] < 1500, median
  assert median['drums']['harmonic_share'] < 0.45, median
  for s, least in MIN_FLATNESS.items():
    assert median[s]['flatness'] > least, (s, median[s])


def test_stems_drop_out():
  """Stems fall silent for whole bars in some tracks (so the two-active-stems rule matters)."""
  d = rqvae.get_config('paper').data
  d.synthetic.min_seconds, d.synthetic.max_seconds = 20.0, 22.0
  silent_bars = 0
  for index in range(6):
    stems, info = synthetic.generate_track_with_info(0, index, 'train', d)
    bar = int(round(240.0 / info['tempo'] * 22050))
    for s in STEMS:
      bars = info['active_bars'][s]
      silent_bars += bars.count(0)
      for b, on in enumerate(bars[:-1]):
        # Skip the release of the bar before and the humanised early onsets of the next.
        seg = stems[s][b * bar + bar // 4:(b + 1) * bar - 1000]
        if not on and seg.size and (b == 0 or not bars[b - 1]):
          assert np.abs(seg).max() < 1e-3, (index, s, b)
  assert silent_bars > 0


def _digest(root):
  h = hashlib.sha1()
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      h.update(os.path.relpath(os.path.join(dirpath, f), root).encode())
      with open(os.path.join(dirpath, f), 'rb') as fh:
        h.update(fh.read())
  return h.hexdigest()


def test_ensure_synthetic_layout_bytes_and_reuse(tmp_path, monkeypatch):
  d = config(tmp_path / 'a')
  root = synthetic.ensure_synthetic(d)
  assert root.startswith(str(tmp_path / 'a'))
  for split, count in (('train', 4), ('validation', 2), ('test', 2)):
    report = slakh.scan(root, split, d, verbose=False)
    assert len(report.kept) == count and not report.dropped
  info = sf.info(os.path.join(root, 'train', 'Track00001', 'bass.wav'))
  assert (info.samplerate, info.channels, info.subtype) == (22050, 1, 'PCM_16')
  assert json.load(open(os.path.join(root, 'synthetic.json')))['seed'] == 0
  # The mixture of the written stems does not clip either.
  track = slakh.scan(root, 'test', d, verbose=False).kept[0]
  assert np.abs(slakh.load_track(track, STEMS).sum(1)).max() < 1.0
  # Same seed, same bytes (in another cache folder); another seed, another folder.
  assert _digest(synthetic.ensure_synthetic(config(tmp_path / 'b'))) == _digest(root)
  other = synthetic.ensure_synthetic(config(tmp_path / 'a', seed=1))
  assert other != root and _digest(other) != _digest(root)
  # Reused, not regenerated.
  monkeypatch.setattr(synthetic, 'write_synthetic', lambda *a, **k: pytest.fail('regenerated'))
  assert synthetic.ensure_synthetic(d) == root


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
  d = config(tmp_path)
  calls = []

  def flaky(job):
    calls.append(job)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(job)

  real = synthetic._write_track
  monkeypatch.setattr(synthetic, '_write_track', flaky)
  with pytest.raises(KeyboardInterrupt):
    synthetic.ensure_synthetic(d)
  assert os.listdir(tmp_path) == []
  monkeypatch.setattr(synthetic, '_write_track', real)
  root = synthetic.ensure_synthetic(d)
  assert len(slakh.scan(root, 'train', d, verbose=False).kept) == 4


def test_cli_generates_prints_the_root_and_reuses_it(tmp_path, capsys):
  """`python -m data.synthetic`: the flags reach the generator, the printed root holds the
  requested tracks, and a second call returns the same root without writing anything."""
  argv = ['--config', 'smoke', '--num-train', '2', '--num-validation', '1', '--num-test', '1',
          '--min-seconds', '2', '--max-seconds', '2.5', '--seed', '3', '--workers', '1',
          '--cache-dir', str(tmp_path)]
  synthetic.main(argv)
  root = capsys.readouterr().out.strip().splitlines()[-1]
  assert root.startswith(str(tmp_path)) and os.path.isdir(root)
  d = config(tmp_path, seed=3)
  for split, count in (('train', 2), ('validation', 1), ('test', 1)):
    kept = slakh.scan(root, split, d, verbose=False).kept
    assert len(kept) == count
  meta = json.load(open(os.path.join(root, 'synthetic.json')))
  assert meta['seed'] == 3
  seconds = sf.info(os.path.join(root, 'train', 'Track00001', 'piano.wav')).duration
  assert 2.0 <= seconds <= 2.5 + 1e-3
  before = _digest(root)
  synthetic.main(argv)
  assert capsys.readouterr().out.strip().splitlines()[-1] == root and _digest(root) == before


def test_an_unguarded_script_gets_a_clear_error_not_a_broken_pool(tmp_path):
  """The generator's workers are spawned and import the calling script; a script without a
  main guard kills them. The error says what to do instead of 'BrokenProcessPool'."""
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = tmp_path / 'unguarded.py'
  script.write_text(
      'import sys\n'
      f'sys.path.insert(0, {repo!r})\n'
      'from configs.rqvae import get_config\n'
      'from data import synthetic\n'
      "cfg = get_config('smoke')\n"
      f'cfg.data.synthetic.cache_dir = {str(tmp_path / "cache")!r}\n'
      'cfg.data.synthetic.num_train = 8\n'
      'synthetic.ensure_synthetic(cfg.data, workers=2)\n')
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=300, cwd=str(tmp_path))
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('RuntimeError: Generating the synthetic set in worker processes '
                         'failed'), proc.stderr[-2000:]
  assert "if __name__ == '__main__':" in last and 'python -m data.synthetic' in last
  assert not [p for p in os.listdir(tmp_path / 'cache') if not p.startswith('.')]  # no half set
