"""Evaluation windows (MSDM protocol) and the TFDS builders that store them."""
import os

import numpy as np
import soundfile as sf
import tensorflow_datasets as tfds

from configs import rqvae
from data import slakh
from data import windows
import data.tfds as data_tfds

SR = 22050
STEMS = ('bass', 'drums', 'guitar', 'piano')
N = 52300  # smoke windows: 10000 samples, hop 5000 -> ceil((52300 - 5000) / 5000) = 10


def data_config():
  d = rqvae.get_config('smoke').data
  d.min_track_seconds = 0.5
  return d


def constructed_track(folder):
  """bass everywhere, drums in [0, 15000), guitar far below the threshold, piano from 40000.

  Windows start at 0, 5000, ..., 45000 (the last one is 7300 samples long):
    0, 5000, 10000 -> bass + drums; 15000..30000 -> bass only (skipped);
    35000, 40000, 45000 -> bass + piano. Hence 6 kept, 4 skipped.
  """
  os.makedirs(folder, exist_ok=True)
  t = np.arange(N) / SR
  sine = 0.1 * np.sin(2 * np.pi * 220 * t)
  stems = {
      'bass': sine,
      'drums': np.where(np.arange(N) < 15000, sine, 0.0),
      'guitar': 0.01 * sine,  # ||s||/N = 7.1e-4 / sqrt(N) < 1.5e-5 for N >= 7300
      'piano': np.where(np.arange(N) >= 40000, sine, 0.0),
  }
  for s, x in stems.items():
    sf.write(os.path.join(folder, f'{s}.wav'), x.astype(np.float32), SR, subtype='PCM_16')


def test_hand_computed_window_count(tmp_path):
  constructed_track(str(tmp_path / 'test' / 'Track00001'))
  constructed_track(str(tmp_path / 'test' / 'Track00002'))
  d = data_config()
  tracks = slakh.scan(str(tmp_path), 'test', d, verbose=False).kept
  result = windows.eval_windows(tracks, d)
  starts = [0, 5000, 10000, 35000, 40000, 45000]
  assert result.windows == [(0, s) for s in starts] + [(1, s) for s in starts]
  assert (result.num_kept, result.num_skipped) == (12, 8)
  assert '12 kept, 8 skipped' in result.summary()
  np.testing.assert_array_equal(result.active[:6], [[1, 1, 0, 0]] * 3 + [[1, 0, 0, 1]] * 3)
  assert windows.eval_windows(tracks, d).windows == result.windows  # deterministic


def test_window_count_formula_and_short_last_window():
  assert windows.num_windows(52300, 5000) == 10
  assert windows.num_windows(50000, 5000) == 9
  assert windows.num_windows(5000, 5000) == 0
  # A stem with energy only in [20000, 24000), i.e. only in the last window [15000, 24000)
  # of 9000 real samples: its norm is divided by 9000, as MSDM slices that window short.
  x = np.zeros((24000, 1))
  x[-4000:] = 0.0022
  starts, active = windows.window_activity(x, 10000, 5000, 1.5e-5)
  assert list(starts) == [0, 5000, 10000, 15000]
  norm = np.sqrt(4000 * 0.0022 ** 2)
  assert norm / 10000 < 1.5e-5 <= norm / 9000
  assert list(active[:, 0]) == [False, False, False, True]


def test_tfds_builders(tmp_path):
  d = data_config()
  d.synthetic.cache_dir = str(tmp_path / 'cache')
  builder = data_tfds.eval_builder(d, data_dir=str(tmp_path / 'tfds'))
  assert builder.name == 'synthetic_slakh'
  tracks = slakh.scan(builder.info.metadata['test']['root'], 'test', d, verbose=False).kept
  expected = windows.eval_windows(tracks, d)
  assert builder.info.metadata['test']['kept'] == expected.num_kept
  assert builder.info.metadata['test']['skipped'] == expected.num_skipped
  examples = list(tfds.as_numpy(builder.as_dataset(split='test')))
  assert len(examples) == expected.num_kept
  for ex, (t, start) in zip(examples, expected.windows):
    assert ex['stems'].shape == (d.eval_window_samples, 4) and ex['stems'].dtype == np.float32
    assert (ex['track_id'].decode(), int(ex['start'])) == (tracks[t].name, start)
    np.testing.assert_array_equal(
        ex['stems'], slakh.load_stems(tracks[t], start, d.eval_window_samples, STEMS))
  # Reloaded through the registry by name, from the same data_dir.
  again = tfds.builder('synthetic_slakh', config=builder.builder_config,
                       data_dir=str(tmp_path / 'tfds'))
  assert again.info.splits['validation'].num_examples == builder.info.metadata[
      'validation']['kept']

  # The manual builder on a prepared folder.
  root = tmp_path / 'slakh'
  for split in ('validation', 'test'):
    constructed_track(str(root / split / 'Track00001'))
  d.root = str(root)
  manual = data_tfds.eval_builder(d, data_dir=str(tmp_path / 'tfds'))
  assert manual.name == 'slakh2100'
  assert manual.info.metadata['test']['kept'] == 6
  assert manual.info.metadata['test']['skipped'] == 4
  starts = [int(ex['start']) for ex in tfds.as_numpy(manual.as_dataset(split='validation'))]
  assert starts == [0, 5000, 10000, 35000, 40000, 45000]
