"""The RQ-Transformer prior over RQ-VAE codes (Lee et al. 2022; the paper's section 3.2).

Codes (B, T, Q): T frames of Q residual codes. Two causal transformers:
  spatial, over frames: input at frame t is the sum of frame t-1's Q code embeddings (a
    learned start vector at t = 0) plus a sinusoidal frame position; output h_t sees frames
    < t only.
  depth, within a frame, over the Q depths: input at depth 0 is h_t, at depth d the partial
    sum of frame t's first d code embeddings, plus a learned depth embedding; the output at
    depth d gives the logits of code (t, d) (one output layer per depth: each depth indexes
    its own codebook).
So p(codes) = prod_t prod_d p(c_{t,d} | frames < t, c_{t,<d}); the loss is the NLL over all
Q x T codes. The code embeddings (Q, K, D_code) start as the RQ-VAE's codebooks (the sum over
a frame is then the decoder's latent) and are projected to d_model.

What the released code got wrong and this does not (reference/original-implementation.md):
attention mixes positions (softmax(q k^T / sqrt(head dim)) v), each sub-layer has its own
LayerNorm (pre-LN), temperature divides the logits.

Every transformer call returns its keys and values per layer, and takes a cache (keys and
values of length L_max per layer) plus the position of a single new step: `rqvae_jax.sampling`
decodes with these caches, one spatial step per frame and Q depth steps per frame.
"""
from typing import Any, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rqvae_jax.dropout import Dropout

Cache = Tuple[jax.Array, jax.Array]      # keys, values: (B, L_max, H, head_dim)


def sinusoid(positions: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embeddings (Vaswani et al.) of integer positions (...,) -> (..., dim)."""
  half = dim // 2
  freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(LN1(x)), then x + mlp(LN2(x)) (two LayerNorms)."""
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool, cache: Optional[Cache] = None,
               index: Optional[jax.Array] = None):
    """x (B, L, D). Without a cache: causal attention over the L positions; returns (y, (k, v))
    with k, v (B, L, H, hd). With a cache and `index`: x is one step (L = 1) at position
    `index`, attending to the cache's positions <= index; returns (y, updated cache)."""
    batch, length, dim = x.shape
    heads = self.num_heads
    if dim % heads:
      raise ValueError(f'd_model {dim} is not divisible by num_heads {heads}.')
    hd = dim // heads
    h = nn.LayerNorm(name='ln_attn')(x)
    qkv = nn.Dense(3 * dim, name='qkv')(h).reshape(batch, length, 3, heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if cache is None:
      keys, values = k, v
      mask = jnp.tril(jnp.ones((length, length), bool))
      new_cache = (k, v)
    else:
      if length != 1:
        raise ValueError('A cached call takes one step (L = 1).')
      keys = jax.lax.dynamic_update_slice(cache[0], k, (0, index, 0, 0))
      values = jax.lax.dynamic_update_slice(cache[1], v, (0, index, 0, 0))
      mask = (jnp.arange(keys.shape[1]) <= index)[None, :]
      new_cache = (keys, values)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, keys) / np.sqrt(hd).astype(np.float32)
    scores = jnp.where(mask[None, None], scores, jnp.finfo(scores.dtype).min)
    att = jax.nn.softmax(scores, axis=-1)
    att = Dropout(self.dropout)(att, deterministic=deterministic)
    out = jnp.einsum('bhqk,bkhd->bqhd', att, values).reshape(batch, length, dim)
    x = x + Dropout(self.dropout)(nn.Dense(dim, name='proj')(out), deterministic=deterministic)
    h = nn.LayerNorm(name='ln_mlp')(x)
    h = nn.Dense(self.mlp_ratio * dim, name='fc1')(h)
    h = nn.Dense(dim, name='fc2')(nn.gelu(h))
    return x + Dropout(self.dropout)(h, deterministic=deterministic), new_cache


class Transformer(nn.Module):
  """A stack of Blocks and a final LayerNorm; caches are a list, one per block."""
  num_layers: int
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool, caches: Optional[List[Cache]] = None,
               index: Optional[jax.Array] = None):
    new = []
    for i in range(self.num_layers):
      x, c = Block(self.num_heads, self.mlp_ratio, self.dropout, name=f'block{i}')(
          x, deterministic, None if caches is None else caches[i], index)
      new.append(c)
    return nn.LayerNorm(name='ln_out')(x), new


class RQTransformer(nn.Module):
  """codes (B, T, Q) -> logits (B, T, Q, K); `spatial_step` / `depth_step` for sampling."""
  config: Any                 # the prior config's `transformer` section
  num_quantizers: int
  codebook_size: int
  code_dim: int

  def setup(self):
    c = self.config
    self.code_embed = self.param('code_embed', nn.initializers.normal(0.02),
                                 (self.num_quantizers, self.codebook_size, self.code_dim))
    self.spatial_in = nn.Dense(c.d_model, name='spatial_in')
    self.depth_in = nn.Dense(c.d_model, name='depth_in')
    self.start = self.param('start', nn.initializers.normal(0.02), (c.d_model,))
    self.depth_pos = self.param('depth_pos', nn.initializers.normal(0.02),
                                (self.num_quantizers, c.d_model))
    self.spatial = Transformer(c.spatial_layers, c.num_heads, c.mlp_ratio, c.dropout,
                               name='spatial')
    self.depth = Transformer(c.depth_layers, c.num_heads, c.mlp_ratio, c.dropout, name='depth')
    self.head_w = self.param('head_w', nn.initializers.normal(0.02),
                             (self.num_quantizers, c.d_model, self.codebook_size))
    self.head_b = self.param('head_b', nn.initializers.zeros,
                             (self.num_quantizers, self.codebook_size))
    self.drop = Dropout(c.dropout)

  def embed(self, codes) -> jax.Array:
    """(..., Q) codes -> (..., Q, D_code) embeddings, depth q from table q."""
    return self.code_embed[jnp.arange(self.num_quantizers), codes]

  def spatial_inputs(self, codes, first_position: int = 0) -> jax.Array:
    """(B, T, Q) -> (B, T, d): start, then the frame sums of frames 0..T-2, plus positions."""
    sums = self.spatial_in(self.embed(codes).sum(axis=-2))[:, :-1]
    start = jnp.broadcast_to(self.start, (codes.shape[0], 1, self.start.shape[0]))
    x = jnp.concatenate([start, sums], axis=1)
    return x + sinusoid(first_position + jnp.arange(codes.shape[1]), x.shape[-1])

  def depth_inputs(self, h, codes) -> jax.Array:
    """h (B, T, d) and codes (B, T, Q) -> (B, T, Q, d): h, then partial sums of embeddings."""
    partial = jnp.cumsum(self.embed(codes), axis=-2)[..., :-1, :]
    x = jnp.concatenate([h[..., None, :], self.depth_in(partial)], axis=-2)
    return x + self.depth_pos

  def logits(self, y, depth=None) -> jax.Array:
    """Depth outputs (..., Q, d) -> (..., Q, K); or (..., d) at one `depth` -> (..., K)."""
    if depth is None:
      return jnp.einsum('...qd,qdk->...qk', y, self.head_w) + self.head_b
    return y @ self.head_w[depth] + self.head_b[depth]

  def __call__(self, codes, deterministic: bool = True) -> jax.Array:
    batch, length, q = codes.shape
    if q != self.num_quantizers:
      raise ValueError(f'The prior models {self.num_quantizers} codes per frame, got {q}.')
    x = self.drop(self.spatial_inputs(codes), deterministic=deterministic)
    h, _ = self.spatial(x, deterministic)
    d = self.drop(self.depth_inputs(h, codes), deterministic=deterministic)
    y, _ = self.depth(d.reshape(batch * length, q, -1), deterministic)
    return self.logits(y.reshape(batch, length, q, -1))

  # ----- single steps with caches (sampling) -----

  def spatial_prefill(self, codes, first_position: int = 0):
    """Runs the spatial transformer on the frames of `codes` at once; returns the output
    (B, P, d) and each layer's keys and values (B, P, H, hd), to seed a cache."""
    h, kv = self.spatial(self.spatial_inputs(codes, first_position), True)
    return h, kv

  def spatial_step(self, prev_codes, is_first, position, caches):
    """One frame: input = start (is_first) or the sum of prev_codes' (B, Q) embeddings, at
    `position`; returns h (B, d) and the caches."""
    sums = self.spatial_in(self.embed(prev_codes).sum(axis=-2))
    x = jnp.where(is_first, jnp.broadcast_to(self.start, sums.shape), sums)
    x = (x + sinusoid(position, x.shape[-1]))[:, None]
    h, caches = self.spatial(x, True, caches, position)
    return h[:, 0], caches

  def depth_step(self, x, depth, caches):
    """One depth: x (B, d) is h_t (depth 0) or `depth_input`; returns logits (B, K), caches."""
    y, caches = self.depth((x + self.depth_pos[depth])[:, None], True, caches, depth)
    return self.logits(y[:, 0], depth), caches

  def depth_input(self, partial_sum):
    """Depth d > 0's input from the sum (B, D_code) of the frame's first d embeddings."""
    return self.depth_in(partial_sum)

  def code_embedding(self, codes_at_depth, depth):
    """(B,) codes of one depth -> (B, D_code)."""
    return self.code_embed[depth][codes_at_depth]


def empty_caches(config, num_layers: int, batch: int, length: int) -> List[Cache]:
  hd = config.d_model // config.num_heads
  shape = (batch, length, config.num_heads, hd)
  return [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(num_layers)]


def nll(logits, codes) -> Tuple[jax.Array, jax.Array]:
  """Mean NLL in nats over all codes, and per depth (Q,): logits (B, T, Q, K), codes (B, T, Q)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_code = -jnp.take_along_axis(logp, codes[..., None], axis=-1)[..., 0]
  per_depth = per_code.reshape(-1, per_code.shape[-1]).mean(axis=0)
  return per_depth.mean(), per_depth


def init_params(model: RQTransformer, rng, codebooks=None, context: int = 8):
  """The model's params; `code_embed` set to the RQ-VAE's codebooks when given."""
  codes = jnp.zeros((1, context, model.num_quantizers), jnp.int32)
  params = model.init({'params': rng}, codes)['params']
  if codebooks is not None:
    codebooks = jnp.asarray(codebooks, jnp.float32)
    if codebooks.shape != params['code_embed'].shape:
      raise ValueError(f'codebooks {codebooks.shape} do not match the prior\'s embeddings '
                       f'{params["code_embed"].shape}.')
    params = {**params, 'code_embed': codebooks}
  return params
