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
