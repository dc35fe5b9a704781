"""Prior training on a codec's codes: a run interrupted after a checkpoint and resumed ends
with the uninterrupted run's parameters, the codes are cached once, TensorBoard and
metrics.json are written; then generation from the trained prior, end to end."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import soundfile as sf

from configs.prior import get_config
from rqvae_jax import prior_training
from tests import codec_fixture


@pytest.fixture(scope='module')
def prior_run(tmp_path_factory):
  """(codec config, codec workdir, prior config, prior workdir, result) of a 4-step smoke
  prior (checkpoints at steps 2 and 4) over an untrained smoke codec's codes."""
  root = tmp_path_factory.mktemp('prior')
  codec_cfg = codec_fixture.codec_config(root)
  codec_dir = str(root / 'codec')
  codec_fixture.write_codec_workdir(codec_cfg, codec_dir)
  cfg = get_config('smoke')
  cfg.autoencoder_workdir = codec_dir
  cfg.autoencoder_checkpoint = 'latest'
  workdir = str(root / 'straight')
  result = prior_training.train_prior(cfg, workdir)
  return codec_cfg, codec_dir, cfg, workdir, result


def test_train_resume_and_metrics(prior_run, tmp_path):
  _, _, cfg, straight, result = prior_run
  assert result['windows'] > 0 and len(result['bits_per_code_per_depth']) == 3
  assert 0 < result['bits_per_code'] < 2 * result['uniform_bits_per_code']
  saved = json.load(open(os.path.join(straight, 'metrics.json')))
  assert saved == json.loads(json.dumps(result))
  assert abs(saved['bits_per_frame'] - sum(saved['bits_per_code_per_depth'])) < 1e-9
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(straight))
  cached = np.load(os.path.join(straight, 'codes', 'train.npz'))
  assert cached['codes'].shape[1] == 3 and cached['offsets'][-1] == len(cached['codes'])

  # A run interrupted after its step-2 checkpoint: the same workdir without the later one.
  # Resuming it restores step 2 in a new call and reads the cached codes (not re-encoded).
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  os.remove(os.path.join(resumed, 'metrics.json'))
  codes_mtime = os.path.getmtime(os.path.join(resumed, 'codes', 'train.npz'))
  again = prior_training.train_prior(cfg, resumed)
  assert os.path.getmtime(os.path.join(resumed, 'codes', 'train.npz')) == codes_mtime
  _, _, a, _ = prior_training.restore(straight)
  _, _, b, _ = prior_training.restore(resumed)
  assert int(a.step) == int(b.step) == 4
  for x, y in zip(jax.tree_util.tree_leaves((a.params, a.ema, a.opt_state)),
                  jax.tree_util.tree_leaves((b.params, b.ema, b.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert again['bits_per_code'] == result['bits_per_code']


def test_generate_end_to_end(prior_run, tmp_path):
  """Past the 16-frame context (32 frames = 2 codec chunks): stems, mix, codes, stats."""
  from rqvae_jax import codec as codec_lib, generate
  codec_cfg, codec_dir, _, straight, _ = prior_run
  out = str(tmp_path / 'generated')
  assert generate.main(['--workdir', straight, '--seconds', '0.03', '--num', '2', '--out', out,
                        '--top-p', '0.9']) == 0
  stats = json.load(open(os.path.join(out, 'stats.json')))
  assert stats['frames'] == 32 and len(stats['generated']) == 2
  codec = codec_lib.Codec.from_workdir(codec_dir, 'latest')
  _, codes = codec.read(os.path.join(out, 'sample_1', 'codes.rqc'))
  assert codes.shape == (32, 3)
  # The WAVs are the codec's decoding of the codes file, and the mix their sum.
  read = lambda n: sf.read(os.path.join(out, 'sample_1', f'{n}.wav'), dtype='float32')[0]
  stems = np.stack([read(n) for n in codec_cfg.data.stems], -1)
  decoded = codec.decode(codes)
  assert stems.shape == decoded.shape
  tol = 2.0 / 32768 + 1e-6
  np.testing.assert_allclose(stems, np.clip(decoded, -1, 1), atol=tol)
  np.testing.assert_allclose(read('mix'), np.clip(decoded.sum(-1), -1, 1), atol=tol)
  assert set(stats['generated_mean']['consistency_sisdr_db']) == set(codec_cfg.data.stems)
  assert stats['real_test_decoded_mean'] is not None


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
