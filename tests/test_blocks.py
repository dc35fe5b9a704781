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
