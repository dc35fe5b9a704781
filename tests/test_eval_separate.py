"""eval.py's protocol and the separate command on a checkpoint written by train (the
installed rqvae-separate on a 44.1 kHz stereo song: tests/test_packaging.py)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from rqvae_jax import evaluation
from rqvae_jax import separate
from rqvae_jax.model import latent_length

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overlap_add_reconstructs_an_identity_separator():
  rng = np.random.default_rng(0)
  x = rng.normal(size=1234).astype(np.float32)
  # An "identity" separator: each stem a fixed fraction of its chunk.
  fn = lambda b: np.stack([b * 0.1, b * 0.2, b * 0.3, b * 0.4], -1)
  for overlap in (0.0, 0.25, 0.5):
    out = separate.overlap_add(fn, x, chunk=200, overlap=overlap, batch_size=3)
    assert out.shape == (1234, 4)
    np.testing.assert_allclose(out.sum(-1), x, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='overlap'):
    separate.overlap_add(fn, x, 200, 1.0, 2)


def test_overlap_add_in_flight_matches_sequential_and_bounds_concurrency():
  import threading
  import time
  rng = np.random.default_rng(1)
  x = rng.normal(size=3001).astype(np.float32)
  lock, state = threading.Lock(), {'now': 0, 'max': 0, 'calls': 0}

  def fn(b):
    with lock:
      state['now'] += 1
      state['calls'] += 1
      state['max'] = max(state['max'], state['now'])
    time.sleep(0.01)
    with lock:
      state['now'] -= 1
    # Depends on the batch values, so a mixed-up order would show.
    return np.stack([np.sin(b), np.cos(b) * b, b ** 2, b], -1)

  reference = separate.overlap_add(fn, x, chunk=200, overlap=0.5, batch_size=2)
  calls = state['calls']
  for in_flight in (2, 3):
    state['max'] = 0
    out = separate.overlap_add(fn, x, chunk=200, overlap=0.5, batch_size=2, in_flight=in_flight)
    np.testing.assert_array_equal(out, reference)
    assert 2 <= state['max'] <= in_flight
  assert state['calls'] == 3 * calls
  with pytest.raises(ValueError, match='in_flight'):
    separate.overlap_add(fn, x, 200, 0.5, 2, in_flight=0)


def test_eval_writes_metrics_with_documented_fields(smoke_run):
  cfg, workdir = smoke_run
  result = evaluation.evaluate(cfg, workdir, 'test', 'best', verbose=False)
  path = os.path.join(workdir, 'eval', 'test', 'metrics.json')
  saved = json.load(open(path))
  assert saved == json.loads(json.dumps(result))
  for key in ('split', 'checkpoint_step', 'config_hash', 'windows_kept', 'windows_skipped',
              'model', 'baselines', 'codebook', 'leakage'):
    assert key in saved
  assert saved['windows_kept'] > 0
  for figure in ('msdm', 'nonsilent'):
    block = saved['model'][figure]
    assert math.isfinite(block['mean']) and math.isfinite(block['median'])
    assert all(v is None or math.isfinite(v) for v in block['per_stem_mean'].values())
  assert set(saved['baselines']) == {'all_zero', 'mixture_over_4'}
  stems = tuple(cfg.data.stems)
  assert tuple(saved['leakage']) == stems
  for row in saved['leakage'].values():
    assert tuple(row) == stems and all(v is None or 0.0 <= v <= 1.0 + 1e-6 for v in row.values())
  # MSDM's formula gives an all-zero estimate SI-SDR 0 dB: its SI-SDRi is -SI-SDR(mix), and
  # on a silent reference it is about +100 dB, hence the two figures. By hand, in float64:
  from data import pipeline, slakh, windows as windows_lib
  tracks = slakh.scan(pipeline.resolve_root(cfg.data), 'test', cfg.data, verbose=False).kept
  ev = windows_lib.eval_windows(tracks, cfg.data, verbose=False)
  size, eps = cfg.data.eval_window_samples, 1e-8
  by_hand = []
  for t, start in ev.windows:
    ref = slakh.load_stems(tracks[t], start, size, stems).astype(np.float64)
    mix = ref.sum(-1, keepdims=True)
    target = (np.sum(mix * ref, 0) + eps) / (np.sum(ref * ref, 0) + eps) * ref
    by_hand.append(-10 * np.log10((np.sum(target ** 2, 0) + eps)
                                  / (np.sum((target - mix) ** 2, 0) + eps)))
  by_hand = np.array(by_hand)
  zero = saved['baselines']['all_zero']
  assert zero['msdm']['count'] == by_hand.size == saved['windows_kept'] * len(stems)
  assert zero['nonsilent']['count'] == int(ev.active.sum())
  assert zero['msdm']['mean'] == pytest.approx(by_hand.mean(), rel=1e-3)
  assert zero['nonsilent']['mean'] == pytest.approx(by_hand[ev.active].mean(), rel=1e-3)
  q = cfg.model.quantizer
  assert len(saved['codebook']['perplexity']) == q.num_quantizers
  # Perplexity (exp of the code entropy) is at most the number of codes used.
  for p, used in zip(saved['codebook']['perplexity'], saved['codebook']['used_codes']):
    assert 1 <= p <= used + 1e-3 and used <= q.codebook_size
  examples = os.listdir(os.path.join(workdir, 'eval', 'test', 'examples'))
  assert len(examples) == cfg.eval.num_example_wavs
  table = evaluation.format_table(result, cfg.data.stems)
  assert 'all-zero' in table and 'mixture/4' in table


def test_separator_is_its_chunk_function_cross_faded(smoke_run):
  """Separator(x) = the model on chunks every hop (zero-padded at the end), cross-faded with
  the Hann-shaped window and normalised by the summed window: recomputed here chunk by chunk."""
  _, workdir = smoke_run
  sep = separate.Separator.from_workdir(workdir, 'latest')
  n = 23456
  x = (0.1 * np.random.default_rng(1).normal(size=n)).astype(np.float32)
  stems = sep(x)
  assert stems.shape == (n, 4) and np.all(np.isfinite(stems))
  chunk, inf = sep.chunk, sep.config.inference
  hop = int(round(chunk * (1 - inf.overlap)))
  starts = list(range(0, n - chunk + hop, hop))               # the last one runs past n
  assert starts[-1] + chunk >= n > starts[-1] - hop + chunk
  padded = np.zeros(starts[-1] + chunk, np.float32)
  padded[:n] = x
  ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(chunk - hop) + 0.5) / (chunk - hop))
  window = np.concatenate([ramp, np.ones(2 * hop - chunk), ramp[::-1]])
  total, weight = np.zeros((len(padded), 4)), np.zeros(len(padded))
  for s in starts:
    batch = np.zeros((inf.batch_size, chunk), np.float32)   # the shape compiled already
    batch[0] = padded[s:s + chunk]
    total[s:s + chunk] += sep.separate_stems(batch)[0] * window[:, None]
    weight[s:s + chunk] += window
  np.testing.assert_allclose(stems, (total / weight[:, None])[:n], atol=1e-5)
  with pytest.raises(ValueError, match='NaN'):
    sep(np.full(300, np.nan, np.float32))


def test_eval_shifts_average_passes_over_delayed_tracks(smoke_run, tmp_path):
  """inference.shifts = 3 in track mode: each track's estimate is the mean of the separation
  of the track delayed by 0 and two seeded delays (zeros in front), each advanced back;
  recomputed here pass by pass with one-pass separations and scored by hand."""
  import shutil
  from data import pipeline, slakh, windows as windows_lib
  from rqvae_jax import metrics
  cfg, workdir = smoke_run
  workdir = str(shutil.copytree(workdir, tmp_path / 'w'))
  cfg = cfg.copy_and_resolve_references()
  cfg.inference.shifts = 3
  result = evaluation.evaluate(cfg, workdir, 'test', 'best', verbose=False)
  assert result['shifts'] == 3
  one_pass = cfg.copy_and_resolve_references()
  one_pass.inference.shifts = 1
  sep = separate.Separator.from_workdir(workdir, 'best', one_pass)
  delays = separate.shift_delays(3, cfg.data.sample_rate)
  assert delays[0] == 0 and len(set(delays)) == 3
  tracks = slakh.scan(pipeline.resolve_root(cfg.data), 'test', cfg.data).kept
  ev = windows_lib.eval_windows(tracks, cfg.data)
  size = cfg.data.eval_window_samples
  by_hand, single = [], []
  for t, start in ev.windows:
    track = slakh.load_track(tracks[t], cfg.data.stems)
    mixture = track.sum(-1)
    passes = [sep(np.concatenate([np.zeros(d, np.float32), mixture]))[d:d + len(mixture)]
              for d in delays]
    pad = lambda x: np.pad(x, [(0, max(0, start + size - len(x)))] + [(0, 0)] * (x.ndim - 1))
    ref, mix = pad(track)[start:start + size], pad(mixture)[start:start + size]
    for out, est in ((by_hand, np.mean(passes, axis=0)), (single, passes[0])):
      out.append(np.asarray(metrics.si_sdr_improvement(ref[None], pad(est)[None, start:start + size],
                                                       mix[None]))[0])
  by_hand, single = np.array(by_hand), np.array(single)
  assert result['model']['msdm']['mean'] == pytest.approx(by_hand.mean(), abs=1e-3)
  assert result['model']['nonsilent']['mean'] == pytest.approx(by_hand[ev.active].mean(), abs=1e-3)
  assert abs(by_hand.mean() - single.mean()) > 1e-3          # the passes did differ


def test_eval_errors_for_empty_and_foreign_workdirs(tmp_path, smoke_run):
  cfg, workdir = smoke_run
  with pytest.raises(FileNotFoundError, match='config.json is missing'):
    evaluation.evaluate(cfg, str(tmp_path / 'nothing'), 'test')
  (tmp_path / 'foreign').mkdir()
  (tmp_path / 'foreign' / 'notes.txt').write_text('not a run')
  with pytest.raises(FileNotFoundError, match='holds no rqvae-jax run'):
    evaluation.evaluate(cfg, str(tmp_path / 'foreign'), 'test')
  with pytest.raises(FileNotFoundError, match='No checkpoint at step 999'):
    evaluation.evaluate(cfg, workdir, 'test', 999)


def test_missing_data_folder_is_a_clear_error(tmp_path, smoke_run):
  from tests.conftest import smoke_config
  from rqvae_jax import training
  cfg = smoke_config(tmp_path, **{'data.root': str(tmp_path / 'no_such_folder')})
  with pytest.raises(ValueError, match='does not exist'):
    training.train_and_evaluate(cfg, str(tmp_path / 'w'))


def test_eval_cli_uses_the_saved_config(smoke_run):
  _, workdir = smoke_run
  out = subprocess.run([sys.executable, 'eval.py', '--workdir', workdir, '--split', 'validation',
                        '--checkpoint', 'latest', '--shifts', '2'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'SI-SDRi (dB), split validation' in out.stdout
  saved = json.load(open(os.path.join(workdir, 'eval', 'validation', 'metrics.json')))
  assert saved['split'] == 'validation' and saved['checkpoint_step'] == 4
  assert saved['shifts'] == 2                 # --shifts without --config reaches the protocol
  bad = subprocess.run([sys.executable, 'eval.py', '--workdir', workdir, '--shifts', '0'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and '--shifts must be at least 1' in bad.stderr


def test_eval_reports_absolute_sisdr_beside_the_improvement(smoke_run):
  cfg, workdir = smoke_run
  result = evaluation.evaluate(cfg, workdir, 'test', 'best', verbose=False)
  stems = tuple(cfg.data.stems)
  model, zero = result['model'], result['baselines']['all_zero']
  mix4 = result['baselines']['mixture_over_4']
  for block in (model, zero, mix4):
    assert set(block['sisdr_abs']) == {'msdm', 'nonsilent'}
    assert block['sisdr_abs']['nonsilent']['count'] == block['nonsilent']['count']
  # SI-SDRi = SI-SDR(estimate) - SI-SDR(mixture), and mixture/4 has the mixture's SI-SDR
  # (scale invariance; the eps matter only on silent references, hence 'nonsilent').
  for s in stems:
    got = model['nonsilent']['per_stem_mean'][s]
    if got is None:
      continue
    expected = (model['sisdr_abs']['nonsilent']['per_stem_mean'][s]
                - mix4['sisdr_abs']['nonsilent']['per_stem_mean'][s])
    assert got == pytest.approx(expected, abs=1e-3)
    assert zero['sisdr_abs']['nonsilent']['per_stem_mean'][s] == pytest.approx(0.0, abs=1e-3)
  assert model['sisdr_abs']['msdm']['mean'] != model['msdm']['mean']
  table = evaluation.format_table(result, stems)
  assert 'SI-SDR (dB, absolute' in table
  assert f"{model['sisdr_abs']['nonsilent']['mean']:8.2f}" in table


def test_separate_chunks_counts_only_the_real_rows(smoke_run):
  _, workdir = smoke_run
  sep = separate.Separator.from_workdir(workdir, 'latest')
  rng = np.random.default_rng(2)
  real = (0.1 * rng.normal(size=(3, sep.chunk))).astype(np.float32)
  frames = latent_length(sep.chunk, sep.config.model)
  counts = {}
  for name, filler in (('zeros', np.zeros((2, sep.chunk), np.float32)),
                       ('noise', rng.normal(size=(2, sep.chunk)).astype(np.float32))):
    _, counts[name] = sep.separate_chunks(np.concatenate([real, filler]), num_rows=3)
    assert np.all(counts[name].sum(axis=1) == 3 * frames)
  np.testing.assert_array_equal(counts['zeros'], counts['noise'])
  _, all_rows = sep.separate_chunks(np.concatenate([real, real[:2]]))
  assert np.all(all_rows.sum(axis=1) == 5 * frames)


def test_inference_tables_separate_as_the_plain_variables(smoke_run):
  # The Separator adds the VQ's stage tables (with the screened search's bfloat16 table)
  # and the BiLSTMs' prepared weights (model.with_inference_tables); the codes are exact, so
  # the stems and code counts are those of the model applied to the plain variables.
  import jax
  from rqvae_jax import metrics
  from rqvae_jax.model import RQVAE
  _, workdir = smoke_run
  restored = separate.Separator.from_workdir(workdir, 'latest')
  plain = {k: v for k, v in restored.variables.items()
           if k not in ('vq_search', 'lstm_prepared')}
  sep = separate.Separator.from_variables(
      _with(restored.config, 'inference.vq_search', 'screened'), plain)
  assert {'vq_search', 'lstm_prepared'} <= set(sep.variables)
  assert all('codebook_t' in stage for stage in sep.variables['vq_search']['quantizer']['stages'])
  chunks = (0.1 * np.random.default_rng(3).normal(size=(3, sep.chunk))).astype(np.float32)
  stems, counts = sep.separate_chunks(chunks)
  want_stems, aux = jax.jit(lambda v, x: RQVAE(sep.config.model).apply(v, x, train=False))(
      plain, chunks)
  np.testing.assert_array_equal(stems, np.asarray(want_stems))
  want_counts = metrics.code_histogram(aux['codes'], sep.config.model.quantizer.codebook_size)
  np.testing.assert_array_equal(counts, np.asarray(want_counts))
  float32 = separate.Separator.from_variables(
      _with(restored.config, 'inference.vq_search', 'float32'), plain)
  assert 'lstm_prepared' in float32.variables          # float32 search: no bfloat16 table
  assert not any('codebook_t' in stage
                 for stage in float32.variables['vq_search']['quantizer']['stages'])
  np.testing.assert_array_equal(float32.separate_chunks(chunks)[0], stems)


def _with(config, key, value):
  config = config.copy_and_resolve_references()
  section, field = key.split('.')
  config[section][field] = value
  return config


@pytest.mark.parametrize('mode', ['track', 'window'])
def test_eval_codebook_statistics_leave_filler_rows_out(smoke_run, tmp_path, mode):
  """Perplexity and used codes are those of the split's chunks: computed here by hand from
  the codes of the real rows, in batches of the same shape as the evaluation's."""
  import shutil
  import jax
  from rqvae_jax.model import RQVAE
  from data import pipeline, slakh, windows as windows_lib
  from rqvae_jax import metrics
  cfg, workdir = smoke_run
  workdir = shutil.copytree(workdir, tmp_path / 'w')
  cfg = cfg.copy_and_resolve_references()
  cfg.eval.mode = mode
  cfg.inference.batch_size = 3                    # batches with filler rows
  result = evaluation.evaluate(cfg, str(workdir), 'test', 'best', verbose=False)
  sep = separate.Separator.from_workdir(str(workdir), 'best', cfg)
  tracks = slakh.scan(pipeline.resolve_root(cfg.data), 'test', cfg.data).kept
  ev = windows_lib.eval_windows(tracks, cfg.data)
  chunk, bs = sep.chunk, cfg.inference.batch_size
  rows = []
  for t in sorted({t for t, _ in ev.windows}):
    mixture = slakh.load_track(tracks[t], cfg.data.stems).sum(-1)
    if mode == 'track':
      hop = max(1, int(round(chunk * (1 - cfg.inference.overlap))))
      starts = separate.chunk_starts(len(mixture), chunk, hop)
    else:
      starts = [s for tt, s in ev.windows if tt == t]
    padded = np.zeros(max(starts) + chunk, np.float32)
    padded[:len(mixture)] = mixture[:len(padded)]
    rows.append(np.stack([padded[s:s + chunk] for s in starts]))
  counts = np.zeros((cfg.model.quantizer.num_quantizers, cfg.model.quantizer.codebook_size))
  codes_of = jax.jit(lambda v, x: RQVAE(cfg.model).apply(v, x, train=False)[1]['codes'])
  filler_rows = 0
  for track_rows in rows:
    for b in range(0, len(track_rows), bs):
      real = track_rows[b:b + bs]
      batch = np.zeros((bs, chunk), np.float32)
      batch[:len(real)] = real
      filler_rows += bs - len(real)
      codes = np.asarray(codes_of(sep.variables, batch))[:len(real)]
      for q in range(codes.shape[-1]):
        counts[q] += np.bincount(codes[..., q].ravel(), minlength=counts.shape[1])
  assert filler_rows > 0
  np.testing.assert_allclose(result['codebook']['perplexity'],
                             np.asarray(metrics.perplexity(counts)), rtol=1e-5)
  assert result['codebook']['used_codes'] == [int(x) for x in metrics.used_codes(counts)]


def test_path_breakdown_full_path_matches_window_mode_evaluation(smoke_run):
  """benchmarks.path_breakdown on every window: its 'full' path and all-zero figures equal
  the evaluation protocol's window mode (each window separated alone), computed by another
  code path; the other paths are finite and the codes alone are not the full model."""
  from benchmarks import path_breakdown
  cfg, workdir = smoke_run
  out = path_breakdown.breakdown(workdir, 'test', every=1)
  window_cfg = cfg.copy_and_resolve_references()
  window_cfg.eval.mode = 'window'
  reference = evaluation.evaluate(window_cfg, workdir, 'test', 'best', verbose=False)
  assert out['windows'] == reference['windows_kept'] and out['cpu'] and 'cpu_flags' in out
  got = out['nonsilent']
  assert got['full']['mean'] == pytest.approx(reference['model']['nonsilent']['mean'], abs=1e-3)
  assert got['all_zero']['mean'] == pytest.approx(
      reference['baselines']['all_zero']['nonsilent']['mean'], abs=1e-4)
  assert set(got) == set(path_breakdown.PATHS) | {'all_zero'}
  assert all(math.isfinite(v) for path in got.values() for v in path.values())
  assert got['codes_only']['mean'] != pytest.approx(got['full']['mean'], abs=0.1)


def test_metrics_json_is_replaced_atomically(smoke_run, tmp_path, monkeypatch):
  """A disk that fills up while metrics.json is written leaves the previous file whole."""
  import builtins
  import errno
  import shutil
  cfg, workdir = smoke_run
  workdir = shutil.copytree(workdir, tmp_path / 'w')
  path = workdir / 'eval' / 'test' / 'metrics.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('{"previous": true}')
  real_open = builtins.open

  class FullDisk:
    def __init__(self, f):
      self.f = f

    def write(self, text):
      raise OSError(errno.ENOSPC, 'No space left on device')

    def __getattr__(self, name):
      return getattr(self.f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

  def fake_open(file, mode='r', *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return FullDisk(f) if 'metrics.json' in str(file) and 'w' in mode else f

  with monkeypatch.context() as patch, pytest.raises(OSError, match='No space left'):
    patch.setattr(builtins, 'open', fake_open)
    evaluation.evaluate(cfg, str(workdir), 'test', 'best', verbose=False)
  assert json.loads(path.read_text()) == {'previous': True}
  assert sorted(os.listdir(path.parent)) == ['examples', 'metrics.json']


def test_separate_cli_skips_bad_files_and_keeps_same_named_songs_apart(smoke_run, tmp_path):
  """One call with good, same-named, truncated, missing and folder inputs (and the --overlap,
  --batch_size, --in_flight flags): the good ones are separated into distinct folders, each
  bad one costs one line (no traceback), and the command ends with a summary and exit 1."""
  _, workdir = smoke_run
  rate = 32000
  t = np.arange(int(1.5 * rate)) / rate
  song = np.stack([0.3 * np.sin(2 * np.pi * 110 * t), 0.2 * np.sin(2 * np.pi * 440 * t)], -1)
  sf.write(tmp_path / 'song.wav', song, rate, subtype='PCM_16')
  sf.write(tmp_path / 'song.flac', song[:, :1], rate)
  raw = (tmp_path / 'song.wav').read_bytes()
  (tmp_path / 'cut.wav').write_bytes(raw[:len(raw) // 2])
  (tmp_path / 'folder').mkdir()
  inputs = ['cut.wav', 'song.wav', 'missing.ogg', 'folder', 'song.flac']
  out = subprocess.run([sys.executable, '-m', 'rqvae_jax.separate', '--workdir', workdir,
                        '--checkpoint', 'latest', '--out', str(tmp_path / 'sep'),
                        '--overlap', '0.25', '--batch_size', '3', '--in_flight', '1',
                        *[str(tmp_path / f) for f in inputs]],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  # --overlap 0.25: 33 075 frames at the model's rate in chunks of 10 000 every 7 500 are 5
  # chunks per channel (6 with the config's 0.5).
  assert '| 10/10 [' in out.stderr and '| 5/5 [' in out.stderr
  errors = [line for line in out.stderr.splitlines() if line.startswith('error: ')]
  assert [e.split(':')[1].strip() for e in errors] == [
      str(tmp_path / f) for f in ('cut.wav', 'missing.ogg', 'folder')]
  assert 'truncated' in errors[0] and 'not found' in errors[1] and 'is a folder' in errors[2]
  sep = tmp_path / 'sep' / os.path.basename(workdir)          # OUT/<model>/<song>/
  assert f"Separated 2 of 5 files into {sep}; 3 failed:" in out.stderr
  for folder, channels in (('song_wav', 2), ('song_flac', 1)):
    for stem in ('bass', 'drums', 'guitar', 'piano'):
      info = sf.info(str(sep / folder / f'{stem}.wav'))
      assert (info.samplerate, info.channels, info.frames) == (rate, channels, len(t))
  assert sorted(os.listdir(sep)) == ['song_flac', 'song_wav']
