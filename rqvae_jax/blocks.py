"""Convolutional building blocks of the encoder and decoder, in PyTorch's layer order.

Arrays are channels-last `(B, T, C)` (Flax convention); kernels have PyTorch's sizes, strides
and symmetric padding, and transposed convolutions crop like `ConvTranspose1d(padding=p)`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rqvae_jax import native
from rqvae_jax.dropout import Dropout


def conv_out_length(length: int, kernel: int, stride: int, padding: int) -> int:
  """Output length of a PyTorch-style Conv1d (dilation 1)."""
  return (length + 2 * padding - kernel) // stride + 1


def conv_transpose_out_length(length: int, kernel: int, stride: int, padding: int) -> int:
  """Output length of a PyTorch-style ConvTranspose1d (dilation 1, no output padding)."""
  return (length - 1) * stride - 2 * padding + kernel


def _torch_conv_init(key, shape, dtype=jnp.float32):
  """PyTorch's Conv1d default: U(+-1/sqrt(c_in * k)) for a (k, c_in, c_out) kernel."""
  k, c_in, _ = shape
  bound = 1.0 / np.sqrt(c_in * k)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _torch_linear_init(fan_in: int):
  """PyTorch's nn.Linear default for the weight and the bias alike: U(+-1/sqrt(fan_in)).

  (kaiming_uniform(a=sqrt(5)) on the weight has exactly that bound.) Flax's Dense draws
  lecun-normal weights (std 1/sqrt(fan_in), 1.7x the uniform's 1/sqrt(3 fan_in)) and a zero
  bias; the bias gets no fan-in from its shape, so it is passed here.
  """
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def dense_init(fan_in: int, torch_init: bool) -> dict:
  """`nn.Dense` keyword arguments: PyTorch's nn.Linear init when `torch_init`, else Flax's
  defaults (lecun-normal kernel, zero bias)."""
  if not torch_init:
    return {}
  init = _torch_linear_init(fan_in)
  return {'kernel_init': init, 'bias_init': init}


# model.conv_impl: 'matmul' (the matmul forms below where they won on the CPU), 'xla' (XLA's
# convolution everywhere), or 'auto': per backend, from benchmarks/gpu_check.py's timing
# (its JSON records the measured choice; a backend not listed gets 'matmul').
CONV_IMPLS = ('auto', 'matmul', 'xla')
AUTO_CONV_IMPL = {'cpu': 'matmul'}


def resolve_conv_impl(impl: str) -> str:
  """'matmul' or 'xla' for a model.conv_impl value, 'auto' resolved for the default backend."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'model.conv_impl must be one of {CONV_IMPLS}, got {impl!r} '
                     "(e.g. --config.model.conv_impl=auto).")
  if impl == 'auto':
    return AUTO_CONV_IMPL.get(jax.default_backend(), 'matmul')
  return impl


def _uses_weight_kernel(rows: int, m: int, p: int) -> bool:
  """Whether a (rows, m) x (rows, p) weight gradient goes to the CPU kernel: long row axes
  and small weights (on the 2-core AMX Xeon, the paper's conv shapes 1.1-2.1x faster with
  their producers; a (882, 2048) x (882, 512) one, compute-bound, 2.3x slower)."""
  return rows >= 1024 and m * p <= 1 << 16 and native.usable()


@jax.custom_vjp
def weight_matmul(x, w):
  """x (..., K) @ w (K, O), whose weight gradient x^T dy is computed by the CPU kernel
  (`native.tn_matmul`) where it runs: XLA's dot contracts over a minor axis, so the
  fusions producing x and dy (BatchNorm and PReLU backward) wrote them transposed, a
  strided copy several times slower than the fusion itself. Elsewhere a plain einsum."""
  return jnp.matmul(x, w)


def _weight_matmul_fwd(x, w):
  return jnp.matmul(x, w), (x, w)


def _weight_matmul_bwd(residuals, dy):
  x, w = residuals
  dx = jnp.matmul(dy, w.T.astype(dy.dtype)).astype(x.dtype)
  rows, k = int(np.prod(x.shape[:-1])), x.shape[-1]
  x2, dy2 = x.reshape(rows, k), dy.reshape(rows, -1)
  if (x.dtype == dy.dtype == w.dtype == jnp.float32
      and _uses_weight_kernel(rows, k, w.shape[1])):
    dw = native.tn_matmul(x2, dy2)
  else:
    dw = jnp.einsum('nk,no->ko', x2, dy2,
                    preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


weight_matmul.defvjp(_weight_matmul_fwd, _weight_matmul_bwd)


def _xla_conv(x, kernel, stride: int, padding: int):
  return jax.lax.conv_general_dilated(x, kernel, (stride,), [(padding, padding)],
                                      dimension_numbers=('NWC', 'WIO', 'NWC'))


def _uses_conv_kernel(x, kernel) -> bool:
  """Whether a stride-1, kernel-3 convolution goes to the CPU kernel (`native.conv3`): float32
  (`conv` has cast the kernel to x's dtype) and at most 64 channels in and out. Timed alone on the 2-core Zen 4 EPYC (2026-12-07; XLA's
  convolution -> the kernel, median ms): (2, 88200) frames 1 -> 16 channels 3.3 -> 0.56,
  16 -> 16 3.5 -> 1.6, 16 -> 4 3.3 -> 1.5; (2, 17640) 32 -> 32 1.44 -> 1.13; (2, 3528)
  64 -> 64 1.07 -> 0.97; at 128 channels equal, so XLA keeps the wider layers."""
  return x.dtype == jnp.float32 and max(kernel.shape[1:]) <= 64 and native.usable()


@jax.custom_vjp
def small_conv3(x, kernel):
  """The stride-1, kernel-3, padding-1 convolution by the CPU kernel; its gradient is XLA's
  convolution's (the backward is unchanged, only the forward is faster)."""
  return native.conv3(x, kernel)


def _small_conv3_fwd(x, kernel):
  return native.conv3(x, kernel), (x, kernel)


def _small_conv3_bwd(residuals, dy):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda a, w: _xla_conv(a, w, 1, 1), x, kernel)
  return vjp(dy)


small_conv3.defvjp(_small_conv3_fwd, _small_conv3_bwd)


def conv(x, kernel, stride: int, padding: int, impl: str = 'matmul'):
  """PyTorch Conv1d (no bias, dilation 1) on channels-last x (B, L, C_in), kernel (k, C_in, C_out).

  impl='matmul': kernel-1 convolutions are a plain matmul and strided ones an im2col
  matmul: on the 2-core CPU, forward+backward, 2.7x and ~1.2x faster than XLA's convolution
  for the paper's shapes; stride-1 kernel-3 ones stay XLA convolutions (2.5x faster than
  im2col there), whose forward the CPU kernel computes for up to 64 channels
  (`_uses_conv_kernel`). impl='xla': XLA's convolution for every layer (what a GPU may
  prefer).
  """
  k = kernel.shape[0]
  kernel = kernel.astype(x.dtype)
  if resolve_conv_impl(impl) == 'xla':
    return _xla_conv(x, kernel, stride, padding)
  if k == 1 and stride == 1 and padding == 0:
    return weight_matmul(x, kernel[0])
  if stride > 1:
    xp = jnp.pad(x, ((0, 0), (padding, padding), (0, 0)))
    out_len = (xp.shape[1] - k) // stride + 1
    cols = jnp.stack([xp[:, j:j + (out_len - 1) * stride + 1:stride] for j in range(k)], axis=2)
    b, _, c = x.shape
    return weight_matmul(cols.reshape(b, out_len, k * c), kernel.reshape(k * c, -1))
  if k == 3 and padding == 1 and _uses_conv_kernel(x, kernel):
    return small_conv3(x, kernel)
  return _xla_conv(x, kernel, stride, padding)


class Conv(nn.Module):
  """Conv1d with PyTorch's semantics and init; kernel (k, c_in, c_out) = torch w.transpose(2, 1, 0)."""
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  dtype: Any = jnp.float32
  impl: str = 'matmul'

  @nn.compact
  def __call__(self, x):
    w = self.param('kernel', _torch_conv_init, (self.kernel, x.shape[-1], self.features),
                   jnp.float32)
    return conv(x.astype(self.dtype), w, self.stride, self.padding, self.impl)


class BatchNorm(nn.Module):
  """BatchNorm1d with PyTorch's defaults (momentum 0.1 -> Flax 0.9, eps 1e-5)."""
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                        epsilon=self.epsilon, dtype=self.dtype)(x)


class ResidualBlock(nn.Module):
  """PReLU(x + [Conv1 -> BN -> PReLU -> Conv3 -> BN -> PReLU -> Conv1 -> BN](x))."""
  channels: int
  prelu_init: float = 0.1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  conv_impl: str = 'matmul'

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda: BatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype)
    prelu = lambda: nn.PReLU(negative_slope_init=self.prelu_init, param_dtype=jnp.float32)
    y = Conv(self.channels, 1, dtype=self.dtype, impl=self.conv_impl)(x)
    y = prelu()(bn()(y, train))
    y = Conv(self.channels, 3, padding=1, dtype=self.dtype, impl=self.conv_impl)(y)
    y = prelu()(bn()(y, train))
    y = Conv(self.channels, 1, dtype=self.dtype, impl=self.conv_impl)(y)
    y = bn()(y, train)
    return prelu()(x + y).astype(self.dtype)


def _torch_convt_init(key, shape, dtype=jnp.float32):
  """PyTorch's ConvTranspose1d default: U(+-1/sqrt(c_out * k)) for a (k, c_out, c_in) kernel."""
  k, c_out, _ = shape
  bound = 1.0 / np.sqrt(c_out * k)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def conv_transpose(x, kernel, stride: int, padding: int, impl: str = 'matmul'):
  """PyTorch ConvTranspose1d on channels-last x (B, L, C_in), kernel (k, C_out, C_in).

  One matmul gives every tap's contribution (B, L, k, C_out); taps are grouped by stride
  phase and overlap-added with ceil(k / stride) shifted reshapes. XLA's CPU
  `conv_transpose` dilates the input with stride-1 zeros and convolves, wasting ~stride x
  the work: this form was 4x faster forward+backward on the paper's decoder (2-core CPU).
  Stride 1 (the output layer) is a plain XLA convolution with the taps reversed: 1.4-1.7x
  faster forward+backward than the tap form on (2, 88200, 16) -> 4 channels, k = 3.
  impl='xla': every stride is XLA's convolution of the stride-dilated input (lhs_dilation)
  with the taps reversed.
  """
  k, c_out, _ = kernel.shape
  b, length, _ = x.shape
  if padding <= k - 1 and (stride == 1 or resolve_conv_impl(impl) == 'xla'):
    # No (B, L, k, C) tap tensor: for a long stride-1 kernel (k = 63 at full rate) that
    # tensor and its gradient took gigabytes.
    flipped = jnp.flip(kernel, axis=0).transpose(0, 2, 1).astype(x.dtype)
    return jax.lax.conv_general_dilated(x, flipped, (1,), [(k - 1 - padding, k - 1 - padding)],
                                        lhs_dilation=(stride,),
                                        dimension_numbers=('NWC', 'WIO', 'NWC'))
  groups = -(-k // stride)
  padded = jnp.pad(kernel, ((0, groups * stride - k), (0, 0), (0, 0)))
  # (C_in, k' * C_out): every tap's weights side by side, one matmul for all taps.
  weights = jnp.transpose(padded.astype(x.dtype), (2, 0, 1)).reshape(x.shape[-1], -1)
  taps = weight_matmul(x, weights).reshape(b, length, groups, stride, c_out)
  out = 0
  for g in range(groups):
    phase = taps[:, :, g].reshape(b, length * stride, c_out)
    out = out + jnp.pad(phase, ((0, 0), (g * stride, (groups - 1 - g) * stride), (0, 0)))
  full = (length - 1) * stride + k
  return out[:, padding:full - padding]


class ConvTranspose(nn.Module):
  """ConvTranspose1d with PyTorch's semantics and output length (no bias).

  The kernel is `(k, c_out, c_in)`: a PyTorch `(c_in, c_out, k)` weight imports as
  `w.transpose(2, 1, 0)` (no flip).
  """
  channels: int
  kernel: int
  stride: int
  padding: int = 1
  dtype: Any = jnp.float32
  impl: str = 'matmul'

  @nn.compact
  def __call__(self, x):
    w = self.param('kernel', _torch_convt_init, (self.kernel, self.channels, x.shape[-1]),
                   jnp.float32)
    return conv_transpose(x.astype(self.dtype), w.astype(self.dtype), self.stride, self.padding,
                          self.impl)


class ConvBlock(nn.Module):
  """[BN] -> (strided Conv | ConvTranspose) -> PReLU -> Dropout -> ResidualBlock.

  The encoder's blocks (transposed=False) always start with a BatchNorm of their input (the
  original's order); the decoder's (transposed=True) only on the first block.
  """
  channels: int
  kernel: int
  stride: int
  padding: int = 1
  transposed: bool = False
  leading_norm: bool = True
  dropout: float = 0.1
  prelu_init: float = 0.1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  conv_impl: str = 'matmul'

  @nn.compact
  def __call__(self, x, train: bool):
    if self.leading_norm:
      x = BatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype)(x, train)
    layer = ConvTranspose if self.transposed else Conv
    x = layer(self.channels, self.kernel, self.stride, self.padding, self.dtype,
              self.conv_impl)(x)
    x = nn.PReLU(negative_slope_init=self.prelu_init, param_dtype=jnp.float32)(x)
    x = Dropout(self.dropout, deterministic=not train)(x)
    return ResidualBlock(self.channels, self.prelu_init, self.bn_momentum, self.bn_epsilon,
                         self.dtype, self.conv_impl)(x, train)
