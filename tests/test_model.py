"""RQVAE: shapes, the published parameter count, collections, encode/decode, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.rqvae import get_config
from rqvae_jax import model as model_lib
from rqvae_jax.lstm import lstm_param_count
from rqvae_jax.model import RQVAE

SMOKE_N = 10000


def _count(tree):
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


@pytest.fixture(scope='module')
def smoke():
  cfg = get_config('smoke').model
  model = RQVAE(cfg)
  x = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (2, SMOKE_N))
  variables = jax.jit(lambda x: model.init({'params': jax.random.PRNGKey(1)}, x))(x)
  return cfg, model, variables, x


def test_paper_config_parameter_count_and_shapes():
  cfg = get_config('paper').model
  model = RQVAE(cfg)
  x = jax.ShapeDtypeStruct((2, 88200), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init({'params': jax.random.PRNGKey(0)}, x), x)
  # PyTorch's count of the original model, both LSTM bias vectors included.
  assert _count(variables['params']) == 19_052_086
  assert _count(variables['params']['encoder']['lstm']) == lstm_param_count(256, 256, 2)
  assert variables['params']['quantizer']['codebooks'].shape == (12, 4096, 256)
  assert variables['codebook_stats']['quantizer']['usage'].shape == (12, 4096)
  (stems, aux), _ = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)},
                               mutable=['batch_stats', 'codebook_stats']), variables, x)
  assert stems.shape == (2, 88200, 4)
  assert aux['codes'].shape == (2, 441, 12) and aux['codes'].dtype == jnp.int32
  assert model_lib.latent_length(88200, cfg) == 441


def test_smoke_apply_updates_collections_under_jit(smoke):
  cfg, model, variables, x = smoke

  @jax.jit
  def step(variables, x, rng):
    return model.apply(variables, x, train=True, rngs={'dropout': rng},
                       mutable=['batch_stats', 'codebook_stats'])

  (stems, aux), updated = step(variables, x, jax.random.PRNGKey(2))
  assert stems.shape == (2, SMOKE_N, cfg.num_stems) and np.all(np.isfinite(stems))
  assert set(updated) == {'batch_stats', 'codebook_stats'}
  old_mean = variables['batch_stats']['encoder']['block1']['BatchNorm_0']['BatchNorm_0']['mean']
  new_mean = updated['batch_stats']['encoder']['block1']['BatchNorm_0']['BatchNorm_0']['mean']
  assert not np.allclose(old_mean, new_mean)
  usage = updated['codebook_stats']['quantizer']['usage']
  frames = 2 * model_lib.latent_length(SMOKE_N, cfg)
  # usage <- decay * (0 + counts): each stage assigned every frame once.
  np.testing.assert_allclose(np.sum(usage, axis=1), cfg.quantizer.usage_decay * frames, rtol=1e-5)
  # Eval mode is deterministic (no dropout, running statistics) and leaves the statistics
  # alone, even when the collections are mutable; (B, N, 1) input is the same as (B, N).
  eval_fn = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                             mutable=['batch_stats', 'codebook_stats'])[::-1])
  unchanged, (a, _) = eval_fn(variables, x)
  _, (again, _) = eval_fn(variables, x)
  np.testing.assert_array_equal(a, again)
  for name in ('batch_stats', 'codebook_stats'):
    for u, v in zip(jax.tree_util.tree_leaves(unchanged[name]),
                    jax.tree_util.tree_leaves(variables[name])):
      np.testing.assert_array_equal(u, v)
  b = eval_fn(variables, x[..., None])[1][0]
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_encode_decode_round_trip(smoke):
  cfg, model, variables, x = smoke
  codes = model.apply(variables, x, method=RQVAE.encode)
  assert codes.shape == (2, model_lib.latent_length(SMOKE_N, cfg), cfg.quantizer.num_quantizers)
  full = model.apply(variables, x, train=False)[0]
  _, skips = model.apply(variables, x, method=RQVAE.encode_frames)
  np.testing.assert_allclose(model.apply(variables, codes, skips, method=RQVAE.decode), full,
                             rtol=1e-4, atol=1e-5)
  zero_skip = model.apply(variables, codes, method=RQVAE.decode)
  assert zero_skip.shape == full.shape and not np.allclose(zero_skip, full)
  # Without skips, the codes alone reproduce the separation.
  cfg_ns = get_config('smoke').model
  cfg_ns.skip_connections = False
  model_ns = RQVAE(cfg_ns)
  v = model_ns.init({'params': jax.random.PRNGKey(1)}, x)
  np.testing.assert_allclose(
      model_ns.apply(v, model_ns.apply(v, x, method=RQVAE.encode), method=RQVAE.decode),
      model_ns.apply(v, x)[0], rtol=1e-4, atol=1e-5)


def test_normalisation_round_trip_and_scale():
  cfg = get_config().model
  x = np.linspace(-1, 1, 7)
  np.testing.assert_allclose(model_lib.denormalize(model_lib.normalize(x, cfg), cfg), x, atol=1e-12)
  # The original's z-score of int16-scale samples: (32768 x - 122.759) / 2359.9309.
  np.testing.assert_allclose(model_lib.normalize(x, cfg), (32768 * x - 122.759) / 2359.9309,
                             rtol=1e-9)


def test_valid_lengths():
  cfg = get_config().model
  assert model_lib.is_valid_length(88200, cfg)
  assert not model_lib.is_valid_length(88199, cfg)
  assert model_lib.next_valid_length(88001, cfg) == 88200
  assert model_lib.next_valid_length(1, cfg) == 200


def test_bad_inputs_raise_clear_errors(smoke):
  _, model, variables, x = smoke
  with pytest.raises(ValueError, match=r'rank 1'):
    model.apply(variables, x[0])
  with pytest.raises(ValueError, match=r'2 channels.*Downmix'):
    model.apply(variables, jnp.stack([x, x], -1))
  with pytest.raises(ValueError, match=r'pad the input to 10200'):
    model.apply(variables, jnp.pad(x, ((0, 0), (0, 1))))
  with pytest.raises(ValueError, match='NaN'):
    model.apply(variables, x.at[0, 5].set(jnp.nan))


@pytest.mark.parametrize('torch_init', [True, False])
def test_fc_layers_initialise_like_pytorch_linear(torch_init):
  """model.torch_init: nn.Linear's U(+-1/sqrt(fan_in)) for the fc weight and bias; off: Flax's
  lecun-normal weight (std 1/sqrt(fan_in)) and zero bias, as before the field existed."""
  cfg = get_config('paper').model
  assert cfg.torch_init                           # the default, in paper and original
  cfg.torch_init = torch_init
  x = jnp.zeros((1, 200))                         # one latent frame: the init is cheap
  params = jax.jit(lambda x: RQVAE(cfg).init({'params': jax.random.PRNGKey(0)}, x))(x)['params']
  fan_in = 2 * cfg.channels[-1]                   # the BiLSTM's output
  bound = 1.0 / np.sqrt(fan_in)
  for part in ('encoder', 'decoder'):
    kernel = np.asarray(params[part]['fc']['kernel'])
    bias = np.asarray(params[part]['fc']['bias'])
    assert kernel.shape == (fan_in, cfg.channels[-1]) and bias.shape == (cfg.channels[-1],)
    if torch_init:
      for w, rtol in ((kernel, 0.02), (bias, 0.15)):    # 131072 and 256 samples
        assert np.all(np.abs(w) <= bound) and np.abs(w).max() > 0.95 * bound
        np.testing.assert_allclose(np.std(w), bound / np.sqrt(3), rtol=rtol)
    else:
      assert np.all(bias == 0)
      np.testing.assert_allclose(np.std(kernel), 1.0 / np.sqrt(fan_in), rtol=0.02)
      assert np.abs(kernel).max() > 1.5 * bound         # normal tails, beyond the uniform's


def test_forward_paths_cut_what_they_name(smoke):
  """forward_path: 'full' is the eval forward, 'codes_only' is decode(codes) with zero skips,
  'unquantized' decodes z_e itself, 'skips_only' a zero latent; an unknown path is an error."""
  cfg, model, variables, x = smoke
  paths = {p: jax.jit(lambda v, x, p=p: model.apply(v, x, p, method=RQVAE.forward_path))
           for p in ('full', 'unquantized', 'skips_only', 'codes_only')}
  path = lambda p: np.asarray(paths[p](variables, x)) if p in paths else model.apply(
      variables, x, p, method=RQVAE.forward_path)
  np.testing.assert_allclose(path('full'), model.apply(variables, x, train=False)[0],
                             rtol=1e-5, atol=1e-6)
  codes = model.apply(variables, x, method=RQVAE.encode)
  np.testing.assert_allclose(path('codes_only'),
                             model.apply(variables, codes, method=RQVAE.decode),
                             rtol=1e-5, atol=1e-6)
  z_e, skips = model.apply(variables, x, method=RQVAE.encode_frames)

  @jax.jit
  def decode_latent(z):
    return model_lib.denormalize(model.apply(
        variables, z, skips, False, method=lambda m, z, s, t: m.decoder(z, s, t)), cfg)

  np.testing.assert_allclose(path('unquantized'), decode_latent(z_e), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(path('skips_only'), decode_latent(jnp.zeros_like(z_e)),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(path('skips_only'), path('full'))
  with pytest.raises(ValueError, match="'full', 'unquantized'"):
    path('latent')


def test_gated_skips_are_scaled_by_the_decoder_state():
  """skip_mode='gated': one gate per skip (5 blocks -> 5 gates) whose sigmoid scales the skip;
  a gate pushed to 0 removes its skip, so the output equals the skips-off path there."""
  cfg = get_config('smoke').model
  cfg.skip_mode = 'gated'
  model = RQVAE(cfg)
  x = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (2, SMOKE_N))
  variables = jax.jit(lambda x: model.init({'params': jax.random.PRNGKey(1)}, x))(x)
  decoder = variables['params']['decoder']
  gates = sorted(k for k in decoder if k.startswith('gate'))
  assert gates == [f'gate{i}' for i in range(1, 6)]
  assert decoder['gate5']['kernel'].shape == (cfg.channels[0], cfg.channels[0])
  closed = jax.tree_util.tree_map(lambda a: a, variables)
  for g in gates:                                   # sigmoid(-1e4) = 0: every skip is cut
    closed['params']['decoder'][g] = {'kernel': jnp.zeros_like(decoder[g]['kernel']),
                                      'bias': jnp.full_like(decoder[g]['bias'], -1e4)}
  no_skip_cfg = get_config('smoke').model
  no_skip_cfg.skip_connections = False
  forward = jax.jit(lambda v, x: model.apply(v, x)[0])
  out_closed = forward(closed, x)
  params_ns = {k: v for k, v in closed['params'].items()}
  params_ns['decoder'] = {k: v for k, v in decoder.items() if not k.startswith('gate')}
  out_ns = jax.jit(lambda v, x: RQVAE(no_skip_cfg).apply(v, x)[0])(
      {**closed, 'params': params_ns}, x)
  np.testing.assert_allclose(out_closed, out_ns, rtol=1e-5, atol=1e-6)
  assert not np.allclose(forward(variables, x), out_closed)
  bad = get_config('smoke').model
  bad.skip_mode = 'concat'
  with pytest.raises(ValueError, match="skip_mode must be 'add' or 'gated'"):
    RQVAE(bad).init({'params': jax.random.PRNGKey(1)}, x)


@pytest.mark.parametrize('taps', [31, 30])
def test_output_kernel_keeps_the_length_or_names_the_fix(taps):
  """model.output_kernel: an odd tap count keeps the input length; an even one (which would
  lengthen the output by a sample) is an error that names the odd count to use."""
  cfg = get_config('smoke').model
  cfg.output_kernel = taps
  x = jax.ShapeDtypeStruct((1, SMOKE_N), jnp.float32)
  init = lambda x: RQVAE(cfg).init({'params': jax.random.PRNGKey(0)}, x)
  if taps % 2:
    variables = jax.eval_shape(init, x)
    assert variables['params']['decoder']['out']['kernel'].shape[0] == taps
    stems = jax.eval_shape(lambda v, x: RQVAE(cfg).apply(v, x)[0], variables, x)
    assert stems.shape == (1, SMOKE_N, cfg.num_stems)
  else:
    with pytest.raises(ValueError, match='output_kernel must be odd.*use 31'):
      jax.eval_shape(init, x)
