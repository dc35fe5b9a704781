"""The bottleneck as a config choice: 'rvq', 'vq' (one codebook), 'gaussian' (the VAE latent)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.rqvae import get_config, set_bottleneck
from rqvae_jax import bottleneck, checkpoints as ckpt_lib, losses, original_layout
from rqvae_jax import train_state, training
from rqvae_jax.model import RQVAE


def _config(kind: str, **quantizer):
  c = get_config('smoke')
  c.loss.mel_weight = 0.0                  # the mel loss is not what these tests are about
  c.model.lstm_layers = 1                  # a smaller graph: these tests compile the model
  set_bottleneck(c, kind)
  for k, v in quantizer.items():
    c.model.quantizer[k] = v
  return c


def _mixture(batch=2, n=10000, seed=0):
  return jnp.asarray(0.1 * np.random.default_rng(seed).standard_normal((batch, n)), jnp.float32)


def test_variants_and_bad_bottlenecks():
  vq, vae = get_config('vqvae'), get_config('vae')
  assert (vq.model.bottleneck, vq.model.quantizer.num_quantizers,
          vq.model.quantizer.codebook_size, vq.loss.cumulative_term) == ('vq', 1, 8092, 0.0)
  assert vae.model.bottleneck == 'gaussian' and vae.loss.kl_form == 'standard'
  assert tuple(vq.model.channels) == tuple(get_config('paper').model.channels)
  assert get_config('paper').model.bottleneck == 'rvq'
  c = get_config('smoke')
  c.model.bottleneck = 'vq'                # three stages: not one codebook
  with pytest.raises(ValueError, match='num_quantizers is 3; set it to 1'):
    bottleneck.kind(c.model)
  c.model.bottleneck = 'vae'
  with pytest.raises(ValueError, match="one of \\('rvq', 'vq', 'gaussian'\\)"):
    bottleneck.kind(c.model)
  with pytest.raises(ValueError, match="bottleneck must be 'rvq', 'vq' or 'gaussian'"):
    set_bottleneck(get_config('smoke'), 'vqvae')


def test_workdir_saved_before_the_field_loads_as_rvq(tmp_path):
  ckpt_lib.save_config(str(tmp_path), get_config('smoke'))
  path = tmp_path / ckpt_lib.CONFIG_FILE
  saved = json.loads(path.read_text())
  del saved['model']['bottleneck']
  saved['variant'] = 'an-old-variant'      # no variant defaults to fill in: ABSENT_MEANS does it
  path.write_text(json.dumps(saved))
  assert ckpt_lib.load_config(str(tmp_path)).model.bottleneck == 'rvq'


def test_vq_is_the_residual_vq_with_one_stage():
  """'vq' and 'rvq' with Q = 1 are one model: the same variables and the same computation
  (identical jaxprs of the forward pass), and its codes are the nearest codebook rows (NumPy)."""
  from rqvae_jax.quantizer import ResidualVQ
  vq, rvq = _config('vq', codebook_size=16), _config('rvq', num_quantizers=1, codebook_size=16)
  x = _mixture()
  shapes = lambda c: jax.tree_util.tree_map(np.shape, jax.eval_shape(
      RQVAE(c.model).init, {'params': jax.random.PRNGKey(0)}, x))
  assert shapes(vq) == shapes(rvq)
  variables = jax.eval_shape(RQVAE(rvq.model).init, {'params': jax.random.PRNGKey(0)}, x)
  jaxpr = lambda c, train: str(jax.make_jaxpr(lambda v, x: RQVAE(c.model).apply(
      v, x, train=train, rngs={'dropout': jax.random.PRNGKey(1)}, mutable=training.MUTABLE))(
          variables, x))
  assert jaxpr(vq, False) == jaxpr(rvq, False) and jaxpr(vq, True) == jaxpr(rvq, True)
  frames = jnp.asarray(np.random.default_rng(2).standard_normal((2, 30, 16)), jnp.float32)
  q = ResidualVQ(1, 16, 16)
  qvars = q.init(jax.random.PRNGKey(3), frames)
  quantized, aux = jax.jit(q.apply)(qvars, frames)
  book = np.asarray(qvars['params']['codebooks'][0], np.float64)
  flat = np.asarray(frames, np.float64).reshape(-1, 16)
  nearest = np.argmin(((flat[:, None] - book[None]) ** 2).sum(-1), axis=-1)
  np.testing.assert_array_equal(np.asarray(aux['codes']).reshape(-1), nearest)
  np.testing.assert_allclose(np.asarray(quantized).reshape(-1, 16), book[nearest], rtol=1e-6)


def test_gaussian_kl_matches_numpy():
  rng = np.random.default_rng(3)
  mean, logvar = rng.standard_normal((2, 3, 5)), 0.5 * rng.standard_normal((2, 3, 5))
  per_frame = [[sum(0.5 * (m * m + np.exp(v) - 1 - v) for m, v in zip(mean[b, t], logvar[b, t]))
                for t in range(3)] for b in range(2)]
  np.testing.assert_allclose(losses.gaussian_kl(mean, logvar), np.mean(per_frame), rtol=1e-5)
  flat_m, flat_v = mean.reshape(2, -1), logvar.reshape(2, -1)   # the original's formula
  original = np.sqrt(-0.5 * np.mean(np.sum(1 + flat_v - flat_m ** 2 - np.exp(flat_v), axis=1)))
  np.testing.assert_allclose(losses.gaussian_kl(mean, logvar, 'sqrt'), original, rtol=1e-5)
  assert float(losses.gaussian_kl(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)))) == 0.0
  with pytest.raises(ValueError, match="kl_form must be 'standard' or 'sqrt'"):
    losses.gaussian_kl(mean, logvar, 'beta')


def test_gaussian_bottleneck_samples_in_training_and_is_deterministic_in_evaluation():
  c = _config('gaussian')
  x = _mixture()
  variables = jax.eval_shape(RQVAE(c.model).init, {'params': jax.random.PRNGKey(0)}, x)
  assert 'quantizer' not in variables['params'] and 'codebook_stats' not in variables
  assert set(variables['params']['gaussian']) == {'mean', 'logvar'}
  # Evaluation = the dense mean (no rng at all), training = mean + exp(logvar / 2) * N(0, 1).
  z_e = jnp.asarray(np.random.default_rng(1).standard_normal((4, 300, 16)), jnp.float32)
  g = bottleneck.GaussianBottleneck(16)
  gvars = g.init(jax.random.PRNGKey(2), z_e)
  k = gvars['params']['mean']
  z, gaux = g.apply(gvars, z_e)
  np.testing.assert_array_equal(z, g.apply(gvars, z_e)[0])
  np.testing.assert_allclose(z, np.asarray(z_e) @ np.asarray(k['kernel']) + np.asarray(k['bias']),
                             rtol=1e-4, atol=1e-5)
  z_train, _ = g.apply(gvars, z_e, True, rngs={'dropout': jax.random.PRNGKey(5)})
  eps = (np.asarray(z_train) - np.asarray(gaux['mean'])) / np.exp(0.5 * np.asarray(gaux['logvar']))
  assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1.0) < 0.02
  z_other, _ = g.apply(gvars, z_e, True, rngs={'dropout': jax.random.PRNGKey(6)})
  assert not np.allclose(z_train, z_other)
  # The loss adds kl_weight * KL of the aux, and has no commitment.
  rng = np.random.default_rng(7)
  target, estimate = rng.standard_normal((2, 400, 4)), rng.standard_normal((2, 400, 4))
  aux = {'mean': rng.standard_normal((2, 2, 16)), 'logvar': rng.standard_normal((2, 2, 16))}
  total, parts = losses.total_loss(target, estimate, aux, c.loss, c.data.sample_rate)
  kl = losses.gaussian_kl(aux['mean'], aux['logvar'])
  np.testing.assert_allclose(parts['kl'], kl, rtol=1e-6)
  np.testing.assert_allclose(total, np.mean((target - estimate) ** 2) + c.loss.kl_weight * kl,
                             rtol=1e-5)
  assert float(parts['commitment']) == 0.0


def test_gaussian_model_says_it_has_no_codes():
  c = _config('gaussian')
  c.model.output_head = 'waveform'
  model, x = RQVAE(c.model), _mixture()
  variables = jax.eval_shape(model.init, {'params': jax.random.PRNGKey(0)}, x)   # shapes only
  with pytest.raises(ValueError, match='Gaussian bottleneck'):
    jax.eval_shape(lambda v: model.apply(v, x, method=RQVAE.encode), variables)
  with pytest.raises(ValueError, match='Gaussian bottleneck'):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 50, 1), jnp.int32),
                                         method=RQVAE.decode), variables)
  with pytest.raises(ValueError, match="'unquantized' bypasses a quantizer"):
    jax.eval_shape(lambda v: model.apply(v, x, 'unquantized', method=RQVAE.forward_path),
                   variables)
  assert jax.eval_shape(lambda v: model.apply(v, x, 'codes_only', method=RQVAE.forward_path),
                        variables).shape == (2, 10000, 4)
  with pytest.raises(original_layout.LayoutError, match="bottleneck must be 'rvq' or 'vq'"):
    original_layout.check_architecture(c.model)
  original_layout.check_architecture(get_config('vqvae').model)   # one codebook: it fits


@pytest.mark.parametrize('kind', ['vq', 'gaussian'])   # 'rvq': tests/test_training.py and others
def test_each_bottleneck_trains_a_step_and_its_checkpoint_evaluates(tmp_path, monkeypatch, kind):
  """A training step and the evaluation protocol on its checkpoint, per bottleneck; for the
  VQ, k-means first with more codes (256) than encoder frames (2 mixtures x 50): no NaN, and
  every frame becomes a code (k-means++ picks each frame before it repeats one)."""
  import functools
  from rqvae_jax import evaluation
  c = _config(kind, codebook_size=256)
  c.eval.num_example_wavs = 0
  c.eval.max_tracks = 1
  state = train_state.create_train_state(c, jax.random.PRNGKey(0))
  batch = jnp.asarray(0.05 * np.random.default_rng(4).standard_normal((2, 10000, 4)), jnp.float32)
  seen = []
  kmeans_frames = training.kmeans_frames
  monkeypatch.setattr(training, 'kmeans_frames',
                      lambda *a: seen.append(kmeans_frames(*a)) or seen[-1])
  state = training.kmeans_initialize(state, np.asarray(batch.sum(-1)), c)
  if kind == 'vq':
    book = np.asarray(state.params['quantizer']['codebooks'][0])
    assert book.shape == (256, c.model.channels[-1]) and np.all(np.isfinite(book))
    np.testing.assert_array_equal(np.asarray(state.codebook_ema), book[None])
    frames = seen[0]
    assert frames.shape[0] == 100 < 256
    dist = ((frames[:, None] - book[None]) ** 2).sum(-1).min(-1)
    assert dist.max() < 1e-6 * (frames ** 2).sum(-1).mean()
  else:
    assert not seen and float(state.codebook_ema) == 0.0      # no codes, no k-means
  state, out = jax.jit(functools.partial(training.train_step, config=c))(state, batch)
  assert int(state.step) == 1 and np.isfinite(float(out['loss/total']))
  assert float(out['skipped']) == 0.0
  assert ('perplexity' in out) == (kind != 'gaussian') and ('loss/kl' in out) == (kind == 'gaussian')
  workdir = str(tmp_path / kind)
  ckpt_lib.save_config(workdir, c)
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  checkpointer.save(1, state, training._meta(1, c))
  checkpointer.close()
  result = evaluation.evaluate(c, workdir, 'test', 'latest', verbose=False)
  assert result['bottleneck'] == kind and result['checkpoint_step'] == 1
  assert np.isfinite(result['model']['nonsilent']['mean'])
  if kind == 'gaussian':
    assert result['codebook'] is None
  else:
    assert len(result['codebook']['used_codes']) == 1


def test_comparison_table_rows_merge_and_readme_block(tmp_path):
  """benchmarks.compare_bottlenecks without training: rows of concurrent runs of one budget
  merge in OUT/comparison.json, the table has one row per bottleneck and baseline, and the
  README's marked block is replaced (a README without markers is refused)."""
  from benchmarks import compare_bottlenecks as cb
  fig = lambda v: {'mean': v, 'per_stem': {'bass': v, 'drums': None}}
  row = lambda v: {'nonsilent': fig(v), 'msdm': fig(v - 1), 'quantizer': None}
  base = {'budget': {'steps': 5, 'batch_size': 6, 'segment_seconds': 2.0}, 'split': 'test',
          'checkpoint': 'latest', 'variant': 'demo', 'cpu': 'cpu', 'date': 'today',
          'baselines': {'all_zero': row(5.0), 'mixture_over_4': row(0.0)}}
  cb._write(str(tmp_path), {**base, 'bottlenecks': {'gaussian': row(-3.0)}})
  cb._write(str(tmp_path), {**base, 'bottlenecks': {'rvq': {**row(6.0), 'quantizer': {
      'num_quantizers': 4, 'codebook_size': 256}}}})
  merged = json.loads((tmp_path / 'comparison.json').read_text())
  assert list(merged['bottlenecks']) == ['rvq', 'gaussian']
  table = cb.markdown_table(merged)
  assert '| RQ-VAE (rvq, 4 x 256 codes) | 6.00 | 6.00 | - | 5.00 | 5.00 | - |' in table
  assert '| VAE (gaussian) | -3.00 |' in table and '| all-zero | 5.00 |' in table
  assert '5 steps x batch 6 x 2.00 s windows' in table
  readme = tmp_path / 'README.md'
  readme.write_text(f'intro\n{cb.BEGIN}\nold\n{cb.END}\nrest\n')
  cb.update_readme(str(readme), table)
  assert readme.read_text() == f'intro\n{cb.BEGIN}\n{table}\n{cb.END}\nrest\n'
  (tmp_path / 'plain.md').write_text('no markers')
  with pytest.raises(ValueError, match='no <!-- compare_bottlenecks:begin -->'):
    cb.update_readme(str(tmp_path / 'plain.md'), table)
