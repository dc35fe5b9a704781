"""Blocks: the fast transposed convolution equals PyTorch's ConvTranspose1d (NumPy reference)."""
import jax
import numpy as np
import pytest

from rqvae_jax import blocks


def _numpy_conv_transpose(x, w_torch, stride, padding):
  """PyTorch's definition: out[t * stride + j - padding] += x[t] @ w[:, :, j] (w: (C_in, C_out, k))."""
  b, length, _ = x.shape
  _, c_out, k = w_torch.shape
  full = np.zeros((b, (length - 1) * stride + k, c_out))
  for t in range(length):
    for j in range(k):
      full[:, t * stride + j] += x[:, t] @ w_torch[:, :, j]
  return full[:, padding:full.shape[1] - padding]


@pytest.mark.parametrize('k,s,p', [(4, 2, 1), (6, 4, 1), (7, 5, 1), (3, 1, 1), (9, 2, 0),
                                   (15, 1, 1), (2, 1, 3)])
def test_conv_transpose_matches_pytorch_definition(k, s, p):
  rng = np.random.default_rng(k * 10 + s)
  x = rng.normal(size=(2, 9, 3)).astype(np.float32)
  w_torch = rng.normal(size=(3, 5, k)).astype(np.float32)
  got = blocks.conv_transpose(x, w_torch.transpose(2, 1, 0), s, p)
  want = _numpy_conv_transpose(x, w_torch, s, p)
  assert got.shape == want.shape == (2, blocks.conv_transpose_out_length(9, k, s, p), 5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_transpose_module_and_lengths():
  m = blocks.ConvTranspose(channels=4, kernel=7, stride=5, padding=1)
  x = np.zeros((1, 12, 3), np.float32)
  params = m.init(jax.random.PRNGKey(0), x)
  assert params['params']['kernel'].shape == (7, 4, 3)
  assert m.apply(params, x).shape == (1, 60, 4)
  assert blocks.conv_out_length(60, 7, 5, 1) == 12


def _numpy_conv(x, w_torch, stride, padding):
  """PyTorch Conv1d: out[t] = sum_j x[t * stride + j - padding] @ w[:, :, j].T (w: (C_out, C_in, k))."""
  c_out, _, k = w_torch.shape
  xp = np.pad(x, ((0, 0), (padding, padding), (0, 0)))
  length = (xp.shape[1] - k) // stride + 1
  out = np.zeros((x.shape[0], length, c_out))
  for t in range(length):
    for j in range(k):
      out[:, t] += xp[:, t * stride + j] @ w_torch[:, :, j].T
  return out


@pytest.mark.parametrize('k,s,p', [(1, 1, 0), (3, 1, 1), (7, 5, 1), (6, 4, 1), (4, 2, 1)])
def test_conv_matches_pytorch_definition(k, s, p):
  rng = np.random.default_rng(k * 10 + s)
  x = rng.normal(size=(2, 23, 3)).astype(np.float32)
  w_torch = rng.normal(size=(5, 3, k)).astype(np.float32)
  got = blocks.conv(x, w_torch.transpose(2, 1, 0), s, p)
  want = _numpy_conv(x, w_torch, s, p)
  assert got.shape == want.shape == (2, blocks.conv_out_length(23, k, s, p), 5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k,s,p', [(1, 1, 0), (3, 1, 1), (7, 5, 1), (6, 4, 1), (4, 2, 1)])
def test_xla_conv_impl_matches_pytorch_definition(k, s, p):
  rng = np.random.default_rng(k * 10 + s)
  x = rng.normal(size=(2, 23, 3)).astype(np.float32)
  w_torch = rng.normal(size=(5, 3, k)).astype(np.float32)
  got = blocks.conv(x, w_torch.transpose(2, 1, 0), s, p, impl='xla')
  np.testing.assert_allclose(got, _numpy_conv(x, w_torch, s, p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k,s,p', [(4, 2, 1), (6, 4, 1), (7, 5, 1), (3, 1, 1), (9, 2, 0)])
def test_xla_conv_transpose_impl_matches_pytorch_definition(k, s, p):
  rng = np.random.default_rng(k * 10 + s)
  x = rng.normal(size=(2, 9, 3)).astype(np.float32)
  w_torch = rng.normal(size=(3, 5, k)).astype(np.float32)
  got = blocks.conv_transpose(x, w_torch.transpose(2, 1, 0), s, p, impl='xla')
  np.testing.assert_allclose(got, _numpy_conv_transpose(x, w_torch, s, p), rtol=1e-5, atol=1e-5)


def test_conv_impl_auto_and_bad_value():
  assert blocks.resolve_conv_impl('auto') == blocks.AUTO_CONV_IMPL.get(jax.default_backend(),
                                                                       'matmul')
  assert blocks.resolve_conv_impl('xla') == 'xla'
  with pytest.raises(ValueError, match="conv_impl must be one of .*'fft'"):
    blocks.resolve_conv_impl('fft')


# The paper model's layers: (kernel, stride, padding, C_in, C_out, input length) at batch 2.
PAPER_CONVS = [(3, 1, 1, 1, 16, 88200), (7, 5, 1, 16, 32, 88200), (7, 5, 1, 32, 64, 17640),
               (6, 4, 1, 64, 128, 3528), (4, 2, 1, 128, 256, 882), (1, 1, 0, 64, 64, 3528),
               (3, 1, 1, 64, 64, 3528)]
PAPER_CONV_TRANSPOSES = [(4, 2, 1, 256, 128, 441), (6, 4, 1, 128, 64, 882),
                         (7, 5, 1, 64, 32, 3528), (7, 5, 1, 32, 16, 17640),
                         (3, 1, 1, 16, 4, 88200)]


def _device_reference(x, kernel, k, s, p, transposed):
  """lax.conv_general_dilated at full float32 precision: the definition both forms must meet."""
  import jax.numpy as jnp
  if transposed:   # kernel (k, C_out, C_in): a stride-dilated input, taps reversed
    w = jnp.flip(kernel, 0).transpose(0, 2, 1)
    return jax.lax.conv_general_dilated(x, w, (1,), [(k - 1 - p, k - 1 - p)], lhs_dilation=(s,),
                                        dimension_numbers=('NWC', 'WIO', 'NWC'),
                                        precision='highest')
  return jax.lax.conv_general_dilated(x, kernel, (s,), [(p, p)],
                                      dimension_numbers=('NWC', 'WIO', 'NWC'), precision='highest')


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='checks the forms on a GPU device')
@pytest.mark.parametrize('transposed,shape', [(False, c) for c in PAPER_CONVS] +
                         [(True, c) for c in PAPER_CONV_TRANSPOSES])
@pytest.mark.parametrize('impl', ['matmul', 'xla'])
def test_conv_forms_match_lax_conv_on_device(transposed, shape, impl):
  """Every conv form, forward and gradients (input and kernel), against XLA's convolution on
  the device, at the paper's shapes. Both sides at 'highest' precision (no TF32)."""
  k, s, p, c_in, c_out, length = shape
  rng = np.random.default_rng(k * 100 + s * 10 + c_in)
  x = jax.numpy.asarray(rng.normal(size=(2, length, c_in)).astype(np.float32))
  kernel = jax.numpy.asarray(rng.normal(size=(k, c_out, c_in) if transposed else (k, c_in, c_out))
                             .astype(np.float32) / np.sqrt(k * c_in))
  form = (lambda x, w: blocks.conv_transpose(x, w, s, p, impl)) if transposed else (
      lambda x, w: blocks.conv(x, w, s, p, impl))
  ref = lambda x, w: _device_reference(x, w, k, s, p, transposed)
  with jax.default_matmul_precision('highest'):
    got, want = jax.jit(form)(x, kernel), jax.jit(ref)(x, kernel)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    loss = lambda f: lambda x, w: jax.numpy.sum(jax.numpy.sin(f(x, w)))
    g_got = jax.jit(jax.grad(loss(form), argnums=(0, 1)))(x, kernel)
    g_want = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, kernel)
  for a, b, name in zip(g_got, g_want, ('input', 'kernel')):
    scale = float(np.max(np.abs(np.asarray(b))))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4 * scale,
                               err_msg=name)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the weight-gradient kernel is CPU-only')
@pytest.mark.parametrize('transposed,shape', [
    (False, (1, 1, 0, 64, 64, 3528)),     # 1x1: x @ w
    (False, (7, 5, 1, 16, 32, 17640)),    # strided: im2col columns @ w
    (True, (7, 5, 1, 32, 16, 3528)),      # transposed: x @ every tap's weights
    (True, (4, 2, 1, 256, 128, 441)),     # 882 rows: below the kernel's threshold, XLA's dot
])
def test_weight_gradients_on_the_cpu_match_lax_conv(transposed, shape):
  """blocks.weight_matmul's kernel gradient (native.tn_matmul, where the rows are many and the
  weights small) against XLA's convolution, forward and both gradients."""
  from rqvae_jax import native
  if not native.usable():
    pytest.skip('the compiled kernels did not build here (tests/test_native.py says why)')
  k, s, p, c_in, c_out, length = shape
  rng = np.random.default_rng(k * 100 + s * 10 + c_in)
  x = jax.numpy.asarray(rng.normal(size=(2, length, c_in)).astype(np.float32))
  kernel = jax.numpy.asarray(rng.normal(size=(k, c_out, c_in) if transposed else (k, c_in, c_out))
                             .astype(np.float32) / np.sqrt(k * c_in))
  form = (lambda x, w: blocks.conv_transpose(x, w, s, p)) if transposed else (
      lambda x, w: blocks.conv(x, w, s, p))
  ref = lambda x, w: _device_reference(x, w, k, s, p, transposed)
  loss = lambda f: lambda x, w: jax.numpy.sum(jax.numpy.sin(f(x, w)))
  grad = jax.jit(jax.grad(loss(form), argnums=(0, 1)))
  rows = 2 * length
  uses_kernel = rows >= 1024
  assert (native.load().target_prefix + 'tn_matmul' in grad.lower(x, kernel).as_text()) == uses_kernel
  g_got = grad(x, kernel)
  with jax.default_matmul_precision('highest'):
    g_want = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, kernel)
  for a, b, name in zip(g_got, g_want, ('input', 'kernel')):
    scale = float(np.max(np.abs(np.asarray(b))))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4 * scale,
                               err_msg=name)
