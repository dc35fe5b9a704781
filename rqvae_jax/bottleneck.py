"""The latent bottleneck between encoder and decoder: a config choice, one model family.

`model.bottleneck` picks it (README: Baselines):
  'rvq'       the paper's residual VQ (rqvae_jax.quantizer.ResidualVQ, Q stages);
  'vq'        the VQ-VAE baseline: the same ResidualVQ with one stage (Q must be 1), so the
              k-means init, usage EMA, dead-code restart and codebook EMA are the RQ-VAE's;
  'gaussian'  the VAE baseline: per latent frame, a mean and a log-variance (two dense layers
              over the encoder's frame), a reparameterised sample in training and the mean at
              evaluation, and a KL term in the loss (`losses.gaussian_kl`).

A Gaussian model has no codes: code counts, k-means, restarts, `encode`/`decode` of codes, the
'unquantized' path and the original checkpoint layout do not apply to it, and each of those
either skips it (training, evaluation) or says so (`require_codes`).
"""
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rqvae_jax import blocks

BOTTLENECKS = ('rvq', 'vq', 'gaussian')


def kind(model_config) -> str:
  """The config's bottleneck, checked ('rvq' when the field is absent: the model before it)."""
  name = model_config.get('bottleneck', 'rvq')
  if name not in BOTTLENECKS:
    raise ValueError(f'model.bottleneck must be one of {BOTTLENECKS}, got {name!r}.')
  if name == 'vq' and model_config.quantizer.num_quantizers != 1:
    raise ValueError(
        f"model.bottleneck='vq' is one codebook, but model.quantizer.num_quantizers is "
        f"{model_config.quantizer.num_quantizers}; set it to 1 (configs/rqvae.py:vqvae does), "
        "or use model.bottleneck='rvq' for a residual quantizer.")
  return name


def has_codes(model_config) -> bool:
  """True for the quantized bottlenecks ('rvq', 'vq'), False for 'gaussian'."""
  return kind(model_config) != 'gaussian'


def require_codes(model_config, what: str) -> None:
  """Raises a ValueError saying that `what` needs codes when the model has none."""
  if not has_codes(model_config):
    raise ValueError(
        f"{what} needs discrete codes, and this model has a Gaussian bottleneck "
        "(model.bottleneck='gaussian', the VAE baseline): its latent is continuous. Separate "
        "with the model itself (it decodes the posterior mean), or use an 'rvq'/'vq' model.")


class GaussianBottleneck(nn.Module):
  """Frames (B, T, D) -> latent (B, T, D) and {'mean', 'logvar'} (B, T, D) each.

  Training samples z = mean + exp(logvar / 2) * eps with eps ~ N(0, 1) from the apply call's
  'dropout' rng stream (the one per-step stream every training call already passes); evaluation
  returns the mean, so it is deterministic. The original VAE maps the whole flattened sequence
  (L * D values) to 2 * L * D with one dense layer; here each frame has its own Gaussian from
  shared dense layers, so any length works (README: Baselines).
  """
  dim: int
  torch_init: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_e: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    if z_e.shape[-1] != self.dim:
      raise ValueError(f'GaussianBottleneck expects frames of dimension {self.dim}, got '
                       f'{z_e.shape}.')
    init = blocks.dense_init(self.dim, self.torch_init)
    mean = nn.Dense(self.dim, dtype=self.dtype, name='mean', **init)(z_e).astype(jnp.float32)
    logvar = nn.Dense(self.dim, dtype=self.dtype, name='logvar', **init)(z_e).astype(jnp.float32)
    if train:
      eps = jax.random.normal(self.make_rng('dropout'), mean.shape, jnp.float32)
      z = mean + jnp.exp(0.5 * logvar) * eps
    else:
      z = mean
    return z, {'mean': mean, 'logvar': logvar}
