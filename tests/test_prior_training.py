"""Prior training on a codec's codes: resume gives the uninterrupted run's parameters, the
codes are cached once, TensorBoard and metrics.json are written."""
import json
import os

import jax
import numpy as np

from configs.prior import get_config
from rqvae_jax import prior_training
from tests import codec_fixture


def test_train_resume_and_metrics(tmp_path):
  codec_cfg = codec_fixture.codec_config(tmp_path)
  codec_dir = str(tmp_path / 'codec')
  codec_fixture.write_codec_workdir(codec_cfg, codec_dir)
  cfg = get_config('smoke')
  cfg.autoencoder_workdir = codec_dir
  cfg.autoencoder_checkpoint = 'latest'

  straight = str(tmp_path / 'straight')
  result = prior_training.train_prior(cfg, straight)
  assert result['windows'] > 0 and len(result['bits_per_code_per_depth']) == 3
  assert 0 < result['bits_per_code'] < 2 * result['uniform_bits_per_code']
  saved = json.load(open(os.path.join(straight, 'metrics.json')))
  assert saved['bits_per_frame'] == np.float64(sum(saved['bits_per_code_per_depth'])).item() or (
      abs(saved['bits_per_frame'] - sum(saved['bits_per_code_per_depth'])) < 1e-9)
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(straight))
  cached = np.load(os.path.join(straight, 'codes', 'train.npz'))
  assert cached['codes'].shape[1] == 3 and cached['offsets'][-1] == len(cached['codes'])

  resumed = str(tmp_path / 'resumed')
  cfg.num_train_steps = 2
  prior_training.train_prior(cfg, resumed)
  cfg.num_train_steps = 4
  prior_training.train_prior(cfg, resumed)
  _, _, a, _ = prior_training.restore(straight)
  _, _, b, _ = prior_training.restore(resumed)
  assert int(a.step) == int(b.step) == 4
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # generate: past the 16-frame context (32 frames = 2 codec chunks), stems, mix, codes, stats
  from rqvae_jax import codec as codec_lib, generate
  out = str(tmp_path / 'generated')
  assert generate.main(['--workdir', straight, '--seconds', '0.03', '--num', '2', '--out', out,
                        '--top-p', '0.9']) == 0
  stats = json.load(open(os.path.join(out, 'stats.json')))
  assert stats['frames'] == 32 and len(stats['generated']) == 2
  codec = codec_lib.Codec.from_workdir(codec_dir, 'latest')
  header, codes = codec.read(os.path.join(out, 'sample_1', 'codes.rqc'))
  assert codes.shape == (32, 3)
  for name in ('bass', 'drums', 'guitar', 'piano', 'mix'):
    assert os.path.exists(os.path.join(out, 'sample_1', f'{name}.wav'))
  assert set(stats['generated_mean']['consistency_sisdr_db']) == set(codec_cfg.data.stems)


def test_stem_statistics_against_numpy():
  from rqvae_jax import generate
  rate = 22050
  t = np.arange(rate) / rate
  stems = np.stack([np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 3000 * t),
                    0.5 * np.sin(2 * np.pi * 200 * t + 0.3), np.zeros_like(t)], -1)
  s = generate.stem_statistics(stems, rate, ['a', 'b', 'c', 'd'], separated=stems)
  assert abs(s['centroid_hz']['a'] - 200) < 15 and abs(s['centroid_hz']['b'] - 3000) < 30
  assert s['centroid_hz']['d'] == 0.0
  assert abs(s['rms_dbfs']['a'] - 20 * np.log10(np.sqrt(0.5))) < 0.01
  assert abs(s['waveform_correlation']['a']['c'] - np.corrcoef(stems[:, 0], stems[:, 2])[0, 1]) < 1e-9
  assert s['spectrum_cosine']['a']['c'] > 0.99 and s['spectrum_cosine']['a']['b'] < 0.05
  assert s['consistency_sisdr_db']['a'] > 60
