"""Convolutional building blocks of the encoder and decoder, in PyTorch's layer order.

Arrays are channels-last `(B, T, C)` (Flax convention); kernels have PyTorch's sizes, strides
and symmetric padding, and transposed convolutions crop like `ConvTranspose1d(padding=p)`.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def conv_out_length(length: int, kernel: int, stride: int, padding: int) -> int:
  """Output length of a PyTorch-style Conv1d (dilation 1)."""
  return (length + 2 * padding - kernel) // stride + 1


def conv_transpose_out_length(length: int, kernel: int, stride: int, padding: int) -> int:
  """Output length of a PyTorch-style ConvTranspose1d (dilation 1, no output padding)."""
  return (length - 1) * stride - 2 * padding + kernel


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

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda: BatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype)
    prelu = lambda: nn.PReLU(negative_slope_init=self.prelu_init, param_dtype=jnp.float32)
    y = nn.Conv(self.channels, (1,), use_bias=False, dtype=self.dtype)(x)
    y = prelu()(bn()(y, train))
    y = nn.Conv(self.channels, (3,), padding=((1, 1),), use_bias=False, dtype=self.dtype)(y)
    y = prelu()(bn()(y, train))
    y = nn.Conv(self.channels, (1,), use_bias=False, dtype=self.dtype)(y)
    y = bn()(y, train)
    return prelu()(x + y).astype(self.dtype)


class EncoderBlock(nn.Module):
  """BN(c_in) -> strided Conv -> PReLU -> Dropout -> ResidualBlock (the original's order)."""
  channels: int
  kernel: int
  stride: int
  padding: int = 1
  dropout: float = 0.1
  prelu_init: float = 0.1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = BatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype)(x, train)
    x = nn.Conv(self.channels, (self.kernel,), strides=(self.stride,),
                padding=((self.padding, self.padding),), use_bias=False, dtype=self.dtype)(x)
    x = nn.PReLU(negative_slope_init=self.prelu_init, param_dtype=jnp.float32)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return ResidualBlock(self.channels, self.prelu_init, self.bn_momentum, self.bn_epsilon,
                         self.dtype)(x, train)


class ConvTranspose(nn.Module):
  """ConvTranspose1d with PyTorch's output length: full 'VALID' transpose, crop `padding`.

  With `transpose_kernel` the kernel is stored as `(k, c_out, c_in)` and applied like
  PyTorch's, so a PyTorch `(c_in, c_out, k)` weight imports as `w.transpose(2, 1, 0)`, no flip.
  """
  channels: int
  kernel: int
  stride: int
  padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.ConvTranspose(self.channels, (self.kernel,), strides=(self.stride,), padding='VALID',
                         use_bias=False, transpose_kernel=True, dtype=self.dtype)(x)
    if self.padding:
      y = y[:, self.padding:y.shape[1] - self.padding]
    return y


class DecoderBlock(nn.Module):
  """[BN] -> ConvTranspose -> PReLU -> Dropout -> ResidualBlock; BN only on the first block."""
  channels: int
  kernel: int
  stride: int
  padding: int = 1
  leading_norm: bool = False
  dropout: float = 0.1
  prelu_init: float = 0.1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.leading_norm:
      x = BatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype)(x, train)
    x = ConvTranspose(self.channels, self.kernel, self.stride, self.padding, self.dtype)(x)
    x = nn.PReLU(negative_slope_init=self.prelu_init, param_dtype=jnp.float32)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return ResidualBlock(self.channels, self.prelu_init, self.bn_momentum, self.bn_epsilon,
                         self.dtype)(x, train)
