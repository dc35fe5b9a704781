"""The training stream (tf.data, or a thread pool without TensorFlow): shapes, determinism, resumption, process shards, windows."""
import os

import numpy as np
import pytest
import soundfile as sf

from configs import rqvae
from data import pipeline
from data import slakh

SR = 22050
STEMS = ('bass', 'drums', 'guitar', 'piano')


@pytest.fixture(scope='module')
def tracks(tmp_path_factory):
  """Five tracks whose samples encode (track, stem, frame), one shorter than a segment."""
  root = tmp_path_factory.mktemp('slakh')
  lengths = [30000, 45000, 21000, 7000, 60000]
  for t, n in enumerate(lengths):
    folder = root / 'train' / f'Track{t + 1:05d}'
    os.makedirs(folder)
    for j, s in enumerate(STEMS):
      # PCM_16-exact values: frame index (mod 2^12) plus a track/stem tag.
      x = ((np.arange(n) % 4096) + 4096 * (t + 1) + 512 * j) % 32768 / 32768.0
      sf.write(str(folder / f'{s}.wav'), x.astype(np.float32), SR, subtype='PCM_16')
  d = data_config()
  return slakh.scan(str(root), 'train', d, verbose=False).kept


def data_config():
  d = rqvae.get_config('smoke').data
  d.min_track_seconds = 0.1
  return d


def take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_shape_dtype(tracks):
  d = data_config()
  batches = take(pipeline.train_batches(d, tracks, batch_size=3, seed=0), 2)
  for b in batches:
    assert b.shape == (3, d.segment_samples, 4) and b.dtype == np.float32
    assert np.abs(b).max() > 0
  # The mixture sums the stems (the last axis), nothing else: known values by hand.
  stems = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  np.testing.assert_array_equal(pipeline.mixture(stems), [[6, 22, 38], [54, 70, 86]])


def test_same_seed_and_step_same_batch_resume(tracks):
  d = data_config()
  full = list(pipeline.train_batches(d, tracks, 2, seed=7, num_steps=5))
  again = list(pipeline.train_batches(d, tracks, 2, seed=7, num_steps=5))
  resumed = list(pipeline.train_batches(d, tracks, 2, seed=7, start_step=3, num_steps=2))
  assert len(full) == 5
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a, b)
  other = list(pipeline.train_batches(d, tracks, 2, seed=8, num_steps=5))
  assert any(not np.array_equal(a, b) for a, b in zip(full, other))


def test_processes_are_disjoint_and_compose_the_global_batch(tracks):
  d = data_config()
  one = list(pipeline.train_batches(d, tracks, 4, seed=1, num_steps=3))
  p0 = list(pipeline.train_batches(d, tracks, 2, seed=1, process_index=0, process_count=2,
                                   num_steps=3))
  p1 = list(pipeline.train_batches(d, tracks, 2, seed=1, process_index=1, process_count=2,
                                   num_steps=3))
  for g, a, b in zip(one, p0, p1):
    np.testing.assert_array_equal(g, np.concatenate([a, b]))
    for x in a:
      assert not any(np.array_equal(x, y) for y in b)


def _locate(example, tracks):
  """(track index, start) recovered from the sample tags of the first stem."""
  first = int(round(example[0, 0] * 32768))
  t = first // 4096 - 1
  return t, first % 4096


def test_windows_stay_inside_tracks_and_follow_the_plan(tracks):
  d = data_config()
  seg = d.segment_samples
  frames = [t.num_frames for t in tracks]
  starts = {i: [] for i in range(len(tracks))}
  for step in range(2000):
    t, start = pipeline.example_window(frames, seg, True, 0, step, 0)
    assert 0 <= start <= max(0, frames[t] - seg)
    starts[t].append(start)
  # Tracks are drawn in proportion to their segment count (3, 4, 2, 1, 6 of 16).
  counts = np.array([len(starts[i]) for i in range(len(tracks))]) / 2000
  np.testing.assert_allclose(counts, np.array([3, 4, 2, 1, 6]) / 16, atol=0.03)
  # The shift spreads starts over the track, including both clipped ends.
  assert 0 in starts[4] and frames[4] - seg in starts[4]
  assert len(set(starts[4])) > 20
  assert set(starts[3]) == {0}  # shorter than a segment: start 0, zero-padded
  # Without the shift, starts are multiples of the segment.
  assert all(pipeline.example_window(frames, seg, False, 0, s, 1)[1] % seg == 0
             for s in range(50))
  # The batches hold exactly those windows.
  batch = next(pipeline.train_batches(d, tracks, 3, seed=5))
  for j in range(3):
    t, start = pipeline.example_window(frames, seg, True, 5, 0, j)
    np.testing.assert_array_equal(batch[j], slakh.load_stems(tracks[t], start, seg, STEMS))
    n = min(seg, frames[t] - start)
    assert _locate(batch[j], tracks) == (t, start % 4096)
    assert not batch[j][n:].any()


def test_load_stems_pads_past_the_end(tracks):
  x = slakh.load_stems(tracks[3], 6000, 2000, STEMS)
  assert x.shape == (2000, 4)
  assert x[:1000].all() and not x[1000:].any()
  with pytest.raises(ValueError):
    slakh.load_stems(tracks[3], -1, 10, STEMS)


def test_resolve_root(tmp_path):
  d = data_config()
  d.root = str(tmp_path / 'missing')
  with pytest.raises(ValueError, match='does not exist'):
    pipeline.resolve_root(d)
  d.root = str(tmp_path)
  assert pipeline.resolve_root(d) == str(tmp_path)
  d.root = ''
  d.synthetic.cache_dir = str(tmp_path / 'cache')
  root = pipeline.resolve_root(d)
  assert root.startswith(str(tmp_path / 'cache'))
  assert len(pipeline.load_tracks(d, 'validation', verbose=False)) == 2


def test_a_stem_unreadable_mid_run_is_retried_then_skipped(tracks, tmp_path, caplog):
  """A stem replaced by garbage after the scan: reads are retried, the track is given up
  with one warning, its examples are redrawn from the others, and the counts are kept."""
  import logging
  import shutil
  d = data_config()
  copies = []
  for t in tracks:
    folder = tmp_path / t.name
    shutil.copytree(t.path, folder)
    copies.append(slakh.Track(str(folder), t.num_frames, t.sample_rate))
  faults = pipeline.ReadFaults(retries=1, delay_s=0.0)
  stream = pipeline.train_batches(d, copies, 4, seed=3, num_steps=30, faults=faults)
  first = next(stream)
  (tmp_path / copies[4].name / 'drums.wav').write_bytes(b'garbage' * 100)   # the longest
  with caplog.at_level(logging.WARNING):
    rest = list(stream)
  assert len(rest) == 29 and all(b.shape == first.shape for b in rest)
  assert faults.bad_tracks == [copies[4].path] and faults.skipped_examples > 0
  warnings = [r.getMessage() for r in caplog.records if 'Skipping training track' in r.getMessage()]
  assert len(warnings) == 1 and 'after 2 attempts' in warnings[0]
  # Past the batches read ahead before the damage (tf.data's autotuned read-ahead varies
  # with the load: 5 batches were once not enough under `pytest -n 2`), every example comes
  # from a readable track: bass tags t + 1 in 1..4 (0 is the padding of the short track),
  # never 5.
  tags = np.concatenate(rest[-10:])[:, :, 0] * 32768 // 4096
  assert set(np.unique(tags).astype(int)) <= {0, 1, 2, 3, 4}
  assert faults.scalars() == {'train/skipped_examples_total': float(faults.skipped_examples),
                              'train/unreadable_tracks': 1.0}


def test_without_tensorflow_the_thread_pool_yields_the_same_batches(tracks, monkeypatch,
                                                                    caplog):
  """Where TensorFlow is missing (a GPU image with JAX only), `train_batches` falls back to
  `threaded_batches`: the same batches as tf.data (shards and resume included), one warning."""
  import logging
  d = data_config()
  d.num_parallel_reads, d.prefetch_batches = 3, 1
  want = list(pipeline.train_batches(d, tracks, 2, seed=7, num_steps=6))
  want_p1 = list(pipeline.train_batches(d, tracks, 2, seed=7, process_index=1,
                                        process_count=2, start_step=2, num_steps=3))
  def no_tf():
    raise ImportError("No module named 'tensorflow'")
  monkeypatch.setattr(pipeline, 'import_tf', no_tf)
  with caplog.at_level(logging.WARNING):
    got = list(pipeline.train_batches(d, tracks, 2, seed=7, num_steps=6))
  assert any('TensorFlow cannot be imported' in r.getMessage() for r in caplog.records)
  got_p1 = list(pipeline.train_batches(d, tracks, 2, seed=7, process_index=1,
                                       process_count=2, start_step=2, num_steps=3))
  assert len(got) == 6 and len(got_p1) == 3
  for a, b in zip(want + want_p1, got + got_p1):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  # Endless by default; closing the generator stops its threads.
  stream = pipeline.threaded_batches(d, tracks, 2, seed=7)
  np.testing.assert_array_equal(next(stream), want[0])
  np.testing.assert_array_equal(next(stream), want[1])
  stream.close()
  assert not any(t.name.startswith('rqvae-read') for t in __import__('threading').enumerate())
  with pytest.raises(ValueError, match='at least one track'):
    pipeline.threaded_batches(d, [], 2, seed=0)


def test_the_thread_pool_stream_passes_read_errors_on(tracks, tmp_path):
  """When every track is unreadable, the reader's ValueError reaches the caller at the batch
  that needed it (not a hang, not a dead thread)."""
  import shutil
  d = data_config()
  folder = tmp_path / tracks[0].name
  shutil.copytree(tracks[0].path, folder)
  (folder / 'bass.wav').write_bytes(b'garbage' * 100)
  broken = [slakh.Track(str(folder), tracks[0].num_frames, tracks[0].sample_rate)]
  stream = pipeline.threaded_batches(d, broken, 2, seed=0, num_steps=2,
                                     faults=pipeline.ReadFaults(retries=0, delay_s=0.0))
  with pytest.raises(ValueError, match='Every training track became unreadable'):
    next(stream)
