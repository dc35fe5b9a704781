"""Tests for rqvae_jax.lstm.BiLSTM against an independent NumPy LSTM."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rqvae_jax import lstm as lstm_lib
from rqvae_jax import native

# The CPU kernel needs a C++ compiler to build; without one 'auto' runs the scan.
IMPLS = ['scan', pytest.param('native', marks=pytest.mark.skipif(
    native.find_compiler() is None or jax.default_backend() != 'cpu',
    reason='the native LSTM kernel needs a C++ compiler and the CPU backend'))]

B, T, IN, H = 3, 17, 5, 7


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _reference(x, params, num_layers):
  """Independent NumPy LSTM (float64): PyTorch's equations, loops over time."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  y = np.asarray(x, np.float64)
  for k in range(num_layers):
    outs = []
    for sfx, reverse in (('', False), ('_reverse', True)):
      w_ii, w_if, w_ig, w_io = np.split(p[f'weight_ih_l{k}{sfx}'], 4, axis=0)
      w_hi, w_hf, w_hg, w_ho = np.split(p[f'weight_hh_l{k}{sfx}'], 4, axis=0)
      b_ii, b_if, b_ig, b_io = np.split(p[f'bias_ih_l{k}{sfx}'], 4)
      b_hi, b_hf, b_hg, b_ho = np.split(p[f'bias_hh_l{k}{sfx}'], 4)
      h = np.zeros((y.shape[0], w_hi.shape[1]))
      c = np.zeros_like(h)
      out = np.zeros(y.shape[:2] + h.shape[1:])
      steps = range(y.shape[1])
      for t in (reversed(steps) if reverse else steps):
        xt = y[:, t]
        i = _sigmoid(xt @ w_ii.T + b_ii + h @ w_hi.T + b_hi)
        f = _sigmoid(xt @ w_if.T + b_if + h @ w_hf.T + b_hf)
        g = np.tanh(xt @ w_ig.T + b_ig + h @ w_hg.T + b_hg)
        o = _sigmoid(xt @ w_io.T + b_io + h @ w_ho.T + b_ho)
        c = f * c + i * g
        h = o * np.tanh(c)
        out[:, t] = h
      outs.append(out)
    y = np.concatenate(outs, axis=-1)
  return y


def _reference_jax(x, params, num_layers):
  """Straightforward JAX LSTM (one lax.scan per direction) for autodiff."""
  y = x
  for k in range(num_layers):
    outs = []
    for sfx, reverse in (('', False), ('_reverse', True)):
      w_ih, w_hh = params[f'weight_ih_l{k}{sfx}'], params[f'weight_hh_l{k}{sfx}']
      bias = params[f'bias_ih_l{k}{sfx}'] + params[f'bias_hh_l{k}{sfx}']

      def cell(carry, xt, w_ih=w_ih, w_hh=w_hh, bias=bias):
        h, c = carry
        i, f, g, o = jnp.split(xt @ w_ih.T + h @ w_hh.T + bias, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

      zeros = jnp.zeros((y.shape[0], w_hh.shape[1]))
      _, hs = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(y, 0, 1),
                           reverse=reverse)
      outs.append(jnp.swapaxes(hs, 0, 1))
    y = jnp.concatenate(outs, axis=-1)
  return y


@pytest.fixture(autouse=True)
def _full_f32_matmuls():
  # On GPU turn TF32 off so 1e-5 comparisons are fair (CPU is already exact).
  if jax.default_backend() == 'gpu':
    with jax.default_matmul_precision('highest'):
      yield
  else:
    yield


# Compiles dominate this file's run time (the 16 threefry initialisers alone
# take seconds), so test weights are drawn with NumPy into the module's own
# parameter structure, and jitted applies are cached per (hashable) module.
def _init(model, x):
  """Variables of `model` with PyTorch-style U(-1/sqrt(H), 1/sqrt(H)) draws."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  bound = 1.0 / np.sqrt(model.hidden_size)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.uniform(-bound, bound, s.shape), s.dtype),
      shapes)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
  return jax.jit(model.apply, static_argnames='train')


def _apply(model, variables, x, **kwargs):
  return _jitted_apply(model)(variables, x, **kwargs)


def _x(seed=1, shape=(B, T, IN)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize('impl', IMPLS)
def test_matches_numpy_reference(impl):
  model = lstm_lib.BiLSTM(hidden_size=H, num_layers=2, impl=impl)
  x = _x()
  variables = _init(model, x)
  y = _apply(model, variables, x)
  assert y.shape == (B, T, 2 * H)
  assert y.dtype == jnp.float32
  expected = _reference(x, variables['params'], 2)
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=0)


def test_inference_and_training_scans_give_the_same_outputs():
  # The scan without residuals (inference) computes the gates in one array, the training
  # scan per gate: the same functions of the same values. Equal bits at XLA's default
  # optimisation level; at level 0 (`make test`) tanh/sigmoid take other code paths and
  # differ in the last bit (9e-8 seen), so the test allows float32 rounding, far below
  # any real difference (a swapped gate activation moves outputs by ~1e-1).
  xs = jax.random.normal(jax.random.key(3), (T, 2, B, 4 * H), jnp.float32)
  w_hh = 0.3 * jax.random.normal(jax.random.key(4), (2, 4 * H, H), jnp.float32)
  inference = jax.jit(lambda a, w: lstm_lib._scan_forward(a, w, 1, save_residuals=False))
  training = jax.jit(lambda a, w: lstm_lib._scan_forward(a, w, 1, save_residuals=True))
  hs = np.asarray(inference(xs, w_hh))
  hs_train, cs, (i, f, g, o) = training(xs, w_hh)
  np.testing.assert_allclose(hs, np.asarray(hs_train), rtol=0, atol=1e-6)
  assert hs.shape == (T, 2, B, H) and cs.shape == (T, 2, B, H)
  assert float(jnp.min(g)) < 0 < float(jnp.max(g))          # tanh on the g block
  assert 0 <= float(jnp.min(jnp.stack([i, f, o]))) and float(jnp.max(jnp.stack([i, f, o]))) <= 1


def test_auto_off_gpu_matches_reference_and_cudnn_refused():
  x = _x()
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match='cudnn'):
      _init(lstm_lib.BiLSTM(hidden_size=H, impl='cudnn'), x)
  with pytest.raises(ValueError, match='impl'):
    _init(lstm_lib.BiLSTM(hidden_size=H, impl='bogus'), x)
  variables = _init(lstm_lib.BiLSTM(hidden_size=H), x)
  y = _apply(lstm_lib.BiLSTM(hidden_size=H, impl='auto'), variables, x)
  np.testing.assert_allclose(
      np.asarray(y), _reference(x, variables['params'], 2), atol=1e-4, rtol=0)


@pytest.mark.parametrize('impl', IMPLS)
def test_jit_gradient_matches_autodiff_of_reference(impl):
  # The recurrence has a hand-written VJP (the scan's, or the CPU kernel's backward);
  # check it against plain autodiff of an independent JAX LSTM (itself checked against
  # the NumPy one).
  x = _x()
  model = lstm_lib.BiLSTM(hidden_size=H, num_layers=2, impl=impl)
  params = _init(model, x)['params']
  cot = jax.random.normal(jax.random.key(5), (B, T, 2 * H))

  def value_and_grad(apply):
    def loss(p, x):
      y = apply(p, x)
      return jnp.sum(jnp.sin(y) * cot), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  (_, y), (g_p, g_x) = value_and_grad(
      lambda p, x: model.apply({'params': p}, x))(params, x)
  (_, y_ref), (r_p, r_x) = value_and_grad(
      lambda p, x: _reference_jax(x, p, 2))(params, x)
  expected = _reference(x, params, 2)
  np.testing.assert_allclose(np.asarray(y_ref), expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(g_x), np.asarray(r_x), atol=1e-5)
  assert set(g_p) == set(r_p)
  for name in r_p:
    assert np.all(np.isfinite(np.asarray(g_p[name]))), name
    assert float(jnp.max(jnp.abs(g_p[name]))) > 0, name
    np.testing.assert_allclose(
        np.asarray(g_p[name]), np.asarray(r_p[name]), atol=1e-5, err_msg=name)


def test_param_layout_matches_pytorch():
  num_layers = 3
  model = lstm_lib.BiLSTM(hidden_size=H, num_layers=num_layers)
  # Shapes only: eval_shape skips compiling the initialisers.
  params = _init(model, _x())['params']
  expected_shapes = {}
  for k in range(num_layers):
    in_k = IN if k == 0 else 2 * H
    for sfx in ('', '_reverse'):
      expected_shapes[f'weight_ih_l{k}{sfx}'] = (4 * H, in_k)
      expected_shapes[f'weight_hh_l{k}{sfx}'] = (4 * H, H)
      expected_shapes[f'bias_ih_l{k}{sfx}'] = (4 * H,)
      expected_shapes[f'bias_hh_l{k}{sfx}'] = (4 * H,)
  assert {k: v.shape for k, v in params.items()} == expected_shapes
  assert all(v.dtype == jnp.float32 for v in params.values())
  # Per layer and direction: 4H*(In_k + H) + 8H.
  expected_count = sum(
      2 * (4 * H * ((IN if k == 0 else 2 * H) + H) + 8 * H)
      for k in range(num_layers))
  count = sum(v.size for v in params.values())
  assert count == expected_count
  assert lstm_lib.lstm_param_count(IN, H, num_layers) == expected_count
  # Known PyTorch figure: nn.LSTM(256, 256, 2, bidirectional=True) has 2629632.
  assert lstm_lib.lstm_param_count(256, 256, 2) == 2629632
  # The module's own init is PyTorch's: every entry in U(-1/sqrt(H), ...).
  bound = 1.0 / np.sqrt(H)
  real = jax.jit(lstm_lib.BiLSTM(hidden_size=H, num_layers=1).init)(
      jax.random.key(0), _x())['params']
  for v in real.values():
    assert bound / 2 < float(jnp.max(jnp.abs(v))) <= bound


def test_dropout_only_between_layers_in_training():
  x = _x()
  model = lstm_lib.BiLSTM(hidden_size=H, num_layers=2, dropout=0.5)
  variables = _init(lstm_lib.BiLSTM(hidden_size=H), x)  # same params
  rngs = {'dropout': jax.random.key(3)}
  y_eval = _apply(model, variables, x, train=False)
  y_train = _apply(model, variables, x, train=True, rngs=rngs)
  assert not np.allclose(np.asarray(y_eval), np.asarray(y_train))
  # Evaluation is deterministic and needs no rng; training needs one.
  np.testing.assert_array_equal(
      np.asarray(y_eval), np.asarray(_apply(model, variables, x)))
  with pytest.raises(flax.errors.InvalidRngError):
    _apply(model, variables, x, train=True)

  single = lstm_lib.BiLSTM(hidden_size=H, num_layers=1, dropout=0.5)
  variables = {'params': {  # layer 0 of the 2-layer parameters
      k: v for k, v in variables['params'].items() if '_l0' in k}}
  np.testing.assert_array_equal(
      np.asarray(_apply(single, variables, x, train=False)),
      np.asarray(_apply(single, variables, x, train=True, rngs=rngs)))


def test_bfloat16_close_to_float32():
  x = _x()
  model32 = lstm_lib.BiLSTM(hidden_size=H, num_layers=2)
  model16 = lstm_lib.BiLSTM(hidden_size=H, num_layers=2, dtype=jnp.bfloat16)
  variables = _init(model32, x)
  shapes16 = jax.eval_shape(model16.init, jax.random.key(0), x)
  assert all(v.dtype == jnp.float32  # params stay float32
             for v in jax.tree_util.tree_leaves(shapes16))
  y32 = _apply(model32, variables, x)
  y16 = _apply(model16, variables, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(y16, np.float32), np.asarray(y32), atol=3e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN needs a GPU')
@pytest.mark.parametrize('dtype,precision,atol', [
    ('float32', 'highest', 1e-5),      # both sides in true float32
    ('float32', None, 1e-2),           # the default: TF32 matmuls on both sides
    ('bfloat16', None, 5e-2)])         # scan in bfloat16, cuDNN in float32 (TF32)
def test_cudnn_matches_scan_on_gpu(dtype, precision, atol):
  """cuDNN vs the scan path on the device: outputs and the gradients of every parameter and
  of the input, in float32 (exact and TF32) and bfloat16."""
  x = _x(shape=(4, 33, 16))
  dtype = jnp.dtype(dtype)
  scan = lstm_lib.BiLSTM(hidden_size=32, num_layers=2, impl='scan', dtype=dtype)
  cudnn = lstm_lib.BiLSTM(hidden_size=32, num_layers=2, impl='cudnn', dtype=dtype)
  auto = lstm_lib.BiLSTM(hidden_size=32, num_layers=2, dtype=dtype)   # picks cuDNN here
  variables = _init(lstm_lib.BiLSTM(hidden_size=32, num_layers=2, impl='scan'), x)

  def loss(model, params, x):
    return jnp.sum(jnp.sin(model.apply({'params': params}, x).astype(jnp.float32)))

  with jax.default_matmul_precision(precision or 'default'):
    y_scan, y_cudnn, y_auto = (np.asarray(jax.jit(m.apply)(variables, x), np.float32)
                               for m in (scan, cudnn, auto))
    g_scan, g_cudnn = (jax.jit(jax.grad(functools.partial(loss, m), argnums=(0, 1)))(
        variables['params'], x) for m in (scan, cudnn))
  assert y_cudnn.shape == y_scan.shape == (4, 33, 64)
  np.testing.assert_allclose(y_cudnn, y_scan, atol=atol, rtol=0)
  np.testing.assert_array_equal(y_auto, y_cudnn)
  for name in g_scan[0]:
    want = np.asarray(g_scan[0][name], np.float32)
    np.testing.assert_allclose(np.asarray(g_cudnn[0][name], np.float32), want,
                               atol=atol * max(1.0, float(np.max(np.abs(want)))), rtol=atol,
                               err_msg=name)
  want = np.asarray(g_scan[1], np.float32)
  np.testing.assert_allclose(np.asarray(g_cudnn[1], np.float32), want,
                             atol=atol * max(1.0, float(np.max(np.abs(want)))), rtol=atol,
                             err_msg='input')
