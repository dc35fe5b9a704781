"""Residual vector quantizer: nearest-code lookup, straight-through, usage stats, restart, k-means.

Codebooks are one parameter `codebooks` of shape (Q, K, D). Per-code usage lives in the
mutable collection `codebook_stats` (variable `usage`, shape (Q, K)) and is updated on every
training call as `usage <- decay * (usage + counts)`, where counts are the number of frames
assigned to each code in the batch (duplicates accumulate, unlike the original's indexed `+=`).
Dead-code restart and k-means initialisation are pure functions over these arrays, so the
training step can call them under `jit`.

What `dead_threshold` means in uses per batch: a code used c times in every batch settles at
usage = decay / (1 - decay) * c, so `usage < dead_threshold` at steady state means fewer than
dead_threshold * (1 - decay) / decay uses per batch on average: paper (decay 0.97, threshold
2) 0.0619 uses per batch (usage = 32.3 c); original (0.93, 1) 0.0753 (usage = 13.3 c). For
scale, a paper batch (16 x 441 frames) gives each of 4096 codes 1.72 uses on average. A
restarted code starts at usage 0 and is checked again `restart_every` = 10 steps later, when
its usage is decay (1 - decay^10) / (1 - decay) * c: it survives with c >= 0.236 uses per batch
(paper) or 0.146 (original). The original's counts add 1 per batch to every code used however
often, so its threshold counts batches, not uses. Only training calls update the usage: the
original also updates it on validation batches; here validation runs with train=False.
"""
import functools
import time
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rqvae_jax import native

STATS = 'codebook_stats'
# A derived, read-only collection an inference caller may add (`stage_tables`, variable
# `stages`): each stage's codebook as the CPU search wants it. Never trained, never saved.
SEARCH = 'vq_search'


def _dtype(name_or_dtype) -> Any:
  return jnp.dtype(name_or_dtype)


def squared_distances(x: jax.Array, codebook: jax.Array, dtype=jnp.float32) -> jax.Array:
  """||x||^2 - 2 x.c + ||c||^2 as one matmul, (N, D) x (K, D) -> (N, K), float32.

  `dtype` is the matmul's input dtype (bfloat16 halves the bandwidth); accumulation and the
  norms stay in float32, so only near-ties between codes can change.
  """
  cross = jnp.dot(x.astype(dtype), codebook.astype(dtype).T, preferred_element_type=jnp.float32)
  x2 = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
  c2 = jnp.sum(jnp.square(codebook.astype(jnp.float32)), axis=-1)
  return x2 - 2.0 * cross + c2


def first_argmin(values: jax.Array, group: int = 64) -> jax.Array:
  """`jnp.argmin(values, axis=-1)` for (N, K) finite values, exactly (the first index of the
  minimum; a row with NaN gets some index in [0, K), as XLA's CPU min skips NaN), in cheap
  passes: the minimum of each group of `group` columns (a plain min reduction), the argmin
  over those N x K/group minima, then the argmin inside the one group each row chose.

  Why: XLA's CPU argmin is a (value, index) reduction that runs ~2x slower than a min over
  the same (882, 4096) distances (README: Performance); here the full-size pass is the fast
  min and only 1/group of the columns go through an index-returning reduction.
  """
  n, k = values.shape
  if k % group or k < 2 * group:
    return jnp.argmin(values, axis=-1)
  groups = values.reshape(n, k // group, group)
  chosen = jnp.argmin(jnp.min(groups, axis=-1), axis=-1)           # first group with the min
  inside = jnp.take_along_axis(groups, chosen[:, None, None], axis=1)[:, 0]
  return chosen * group + jnp.argmin(inside, axis=-1)              # first index inside it


def nearest_code(x: jax.Array, codebook: jax.Array, dtype=jnp.float32, table=None) -> jax.Array:
  """Index of the nearest code for each row of x (the ||x||^2 term does not change argmin).

  On the CPU, when the compiled kernels build (`rqvae_jax.native`), the matmul is a plain
  dot and one kernel pass per row finds the minimum of ||c||^2 - 2 x.c and its first index:
  one stage of the paper's VQ (882 x 256 against 4096 codes) 5.8-6.4 -> 4.3 ms on the 2-core
  AMD EPYC with AVX-512, the 12 stages 70-73 -> 50-52 ms, the same indices (README:
  Performance). Elsewhere the distances and `first_argmin` in XLA.

  With a search `table` (one stage's `codebook_t`, the bfloat16 codebook (bfloat16, or its
  bits as uint16) laid out (D, K), and `norms`, its float32 ||c||^2, from `search_table` or
  `stage_tables`) on the CPU, the dot runs in bfloat16 (twice the float32
  rate on a CPU with AVX-512-BF16, but only from that layout) and the kernel screens its
  result with a proven error bound, scoring the few codes it cannot rule out exactly: the
  nearest code of the exact distances (`native.nearest_code_screened`).
  """
  if table is not None and 'codebook_t' in table and native.usable():
    codebook_t = table['codebook_t']
    if codebook_t.dtype != jnp.bfloat16:
      codebook_t = jax.lax.bitcast_convert_type(codebook_t, jnp.bfloat16)
    cross = jnp.dot(x.astype(jnp.bfloat16), codebook_t, preferred_element_type=jnp.float32)
    return native.nearest_code_screened(cross, table['norms'], x, codebook)
  cross = jnp.dot(x.astype(dtype), codebook.astype(dtype).T, preferred_element_type=jnp.float32)
  c2 = (table['norms'] if table is not None and 'norms' in table
        else jnp.sum(jnp.square(codebook.astype(jnp.float32)), axis=-1))
  if native.usable():
    return native.nearest_code_from_cross(cross, c2)
  return first_argmin(c2 - 2.0 * cross).astype(jnp.int32)


def search_table(codebooks: jax.Array) -> Dict[str, jax.Array]:
  """The screened search's view of fixed codebooks (Q, K, D): `codebooks_t` (Q, D, K), the
  bfloat16 codes' bits as uint16 (stored as bfloat16, the scan's input was converted by XLA
  to float32 as a whole and back per stage, 18 ms a call), and `norms` (Q, K) float32.
  Inference builds it once per set of codebooks; a training step (`train_search`) builds it
  every step, with the CPU kernel (`native.search_table`: one pass, where XLA's transposing
  convert, layout copy and norm reduction cost as much as the bfloat16 dots save)."""
  codebooks = jnp.asarray(codebooks, jnp.float32)
  if native.usable():
    bits_t, norms = native.search_table(codebooks)
    return {'codebooks_t': bits_t, 'norms': norms}
  bits = jax.lax.bitcast_convert_type(codebooks.astype(jnp.bfloat16), jnp.uint16)
  return {'codebooks_t': jnp.swapaxes(bits, 1, 2),
          'norms': jnp.sum(jnp.square(codebooks), axis=-1)}


def stage_tables(codebooks: jax.Array, screened: bool) -> Tuple[Dict[str, jax.Array], ...]:
  """Fixed codebooks (Q, K, D) -> one dict per stage, each stage's arrays its own buffers:
  `codebook` (K, D) float32, `norms` (K,) and, when `screened`, `codebook_t` (D, K) bfloat16
  (`search_table`'s, converted once). What `ResidualVQ` runs its stages from, one after the
  other without a loop, when an inference caller adds them (collection `vq_search`, variable
  `stages`): every stage's slice of the stacked codebooks, table and norms was a copy per
  call, 12 of each (~9 ms of a ~165 ms batch-2 separation call on the AMX Xeon, 2026-12-07)."""
  codebooks = jnp.asarray(codebooks, jnp.float32)
  if screened:
    table = search_table(codebooks)
    codebook_t = jax.lax.bitcast_convert_type(table['codebooks_t'], jnp.bfloat16)
    norms = table['norms']
  else:
    norms = jnp.sum(jnp.square(codebooks), axis=-1)
  stages = []
  for q in range(codebooks.shape[0]):
    stage = {'codebook': jnp.array(codebooks[q]), 'norms': jnp.array(norms[q])}
    if screened:
      stage['codebook_t'] = jnp.array(codebook_t[q])
    stages.append(stage)
  return tuple(stages)


SEARCH_MODES = ('auto', 'screened', 'float32')


def use_screened_search(mode: str, field: str = 'inference.vq_search') -> bool:
  """Whether to search with a `search_table` (configs `inference.vq_search` and
  `model.quantizer.train_search`): 'float32' never, 'screened' wherever the CPU kernels
  run, 'auto' where they run and this CPU's bfloat16 dot is measurably faster than its
  float32 one (`bf16_dot_pays`). Either way the codes are the nearest of the exact
  distances; only the speed differs."""
  if mode not in SEARCH_MODES:
    raise ValueError(f'{field} must be one of {SEARCH_MODES}, got {mode!r}.')
  if mode == 'float32' or not native.usable():
    return False
  return mode == 'screened' or bf16_dot_pays()


@functools.lru_cache(maxsize=None)
def bf16_dot_pays(rows: int = 882, dim: int = 256, codes: int = 4096, margin: float = 0.85
                  ) -> bool:
  """One VQ stage's dot (a batch-2 chunk's frames against 4096 codes) timed both ways on this
  CPU, once per process (~0.2 s): True when the bfloat16 one from the (D, K) layout takes
  under `margin` of the float32 one. Measured (2026-12-07): 2.0-2.6 vs 4.0-4.8 ms on a
  2-core Zen 5 EPYC, 5.4-5.6 vs 10.7-10.8 ms on a Zen 4 EPYC (both AVX-512-BF16), 1.2-1.3 vs
  7.0-7.4 ms on an AMX Xeon; a CPU without bfloat16 dot instructions emulates them, slower
  than float32, and takes the float32 search."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(rows, dim)).astype(np.float32)
  c = rng.normal(size=(codes, dim)).astype(np.float32)
  f32 = jax.jit(lambda x, c: jnp.dot(x, c.T))
  bf16 = jax.jit(lambda x, c_t: jnp.dot(x.astype(jnp.bfloat16), c_t,
                                         preferred_element_type=jnp.float32))

  def best_of(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    return min(times)

  # Called while a training step is traced (the model decides there): run it for real.
  with jax.ensure_compile_time_eval():
    c_t = jnp.asarray(c.T, jnp.bfloat16)
    return best_of(bf16, jnp.asarray(x), c_t) < margin * best_of(f32, jnp.asarray(x),
                                                                 jnp.asarray(c))


def xavier_normal(key, shape, dtype=jnp.float32):
  """Xavier-normal per stage, like `init.xavier_normal_` on each (K, D) nn.Embedding."""
  _, k, d = shape
  return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / (k + d)).astype(dtype)


class ResidualVQ(nn.Module):
  """Q-stage residual VQ over (B, T, D) frames with straight-through gradients.

  Returns the sum of the stage quantizations and an aux dict: `codes` (B, T, Q) int32,
  `residuals` (B, T, Q, D) (the input of each stage, for dead-code restart), `counts` (Q, K)
  and the three commitment parts summed over stages: `codebook_loss` mse(sg(r), q),
  `encoder_loss` mse(r, sg(q)), `cumulative_loss` mse(z_e, sg(sum of q so far)).
  """
  num_quantizers: int
  codebook_size: int
  dim: int
  usage_decay: float = 0.97
  distance_dtype: Any = 'float32'
  train_search: str = 'float32'     # config model.quantizer.train_search (use_screened_search)

  def setup(self):
    self.codebooks = self.param('codebooks', xavier_normal,
                                (self.num_quantizers, self.codebook_size, self.dim))
    self.usage = self.variable(STATS, 'usage', jnp.zeros,
                               (self.num_quantizers, self.codebook_size), jnp.float32)

  def __call__(self, z_e: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    z_e = z_e.astype(jnp.float32)
    batch, length, dim = z_e.shape
    if dim != self.dim:
      raise ValueError(f'ResidualVQ expects frames of dimension {self.dim}, got {z_e.shape}.')
    flat = z_e.reshape(-1, dim)
    dist_dtype = _dtype(self.distance_dtype)

    stages = (self.get_variable(SEARCH, 'stages') if self.has_variable(SEARCH, 'stages')
              else None)
    if stages is not None and (train or len(stages) != self.num_quantizers):
      raise ValueError(f'{SEARCH} stages are for inference with {self.num_quantizers} stages '
                       f'(model.with_inference_tables); got {len(stages)} with train={train}.')
    table = None
    if (stages is None and train and dist_dtype == jnp.float32
        and use_screened_search(self.train_search, 'model.quantizer.train_search')):
      # The codebooks change every step, so the table is built in the step: the kernel does
      # it in one pass (~4.5 ms alone, and XLA runs it beside the encoder), where the
      # bfloat16 dots save ~28 of the float32 ones' ~53 ms (README: Performance).
      table = search_table(jax.lax.stop_gradient(self.codebooks))

    def stage(carry, xs):
      codebook, stage_table = xs       # stage_table: None, or what `nearest_code` reads
      residual, cumulative, quantized = carry
      idx = nearest_code(jax.lax.stop_gradient(residual), codebook, dist_dtype, stage_table)
      q = jnp.take(codebook, idx, axis=0)
      cumulative = cumulative + jax.lax.stop_gradient(q)
      losses = (jnp.mean(jnp.square(jax.lax.stop_gradient(residual) - q)),
                jnp.mean(jnp.square(residual - jax.lax.stop_gradient(q))),
                jnp.mean(jnp.square(flat - cumulative)))
      z_q = residual + jax.lax.stop_gradient(q - residual) if train else q
      counts = jnp.zeros((self.codebook_size,), jnp.float32).at[idx].add(1.0)
      return (residual - z_q, cumulative, quantized + z_q), (idx, residual, counts, losses)

    # The quantized sum is carried, not stacked per stage and summed afterwards: that sum
    # was a separate reduction of 12 x (B*T, D), ~5 % of the eval forward on the CPU.
    init = (flat, jnp.zeros_like(flat), jnp.zeros_like(flat))
    if stages is not None:                  # inference: each stage from its own arrays
      carry, outs = init, []
      for stage_arrays in stages:
        carry, out = stage(carry, (stage_arrays['codebook'], stage_arrays))
        outs.append(out)
      quantized = carry[2]
      idx, residuals, counts, losses = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
    else:
      if table is not None:
        table = {'codebook_t': table['codebooks_t'], 'norms': table['norms']}
      (_, _, quantized), (idx, residuals, counts, losses) = jax.lax.scan(
          stage, init, (self.codebooks, table))
    quantized = quantized.reshape(batch, length, dim)
    if train and not self.is_initializing():
      self.usage.value = self.usage_decay * (self.usage.value + counts)
    aux = {
        'codes': jnp.moveaxis(idx, 0, -1).reshape(batch, length, self.num_quantizers),
        'residuals': jnp.moveaxis(residuals, 0, 1).reshape(batch, length, self.num_quantizers, dim),
        'counts': counts,
        'codebook_loss': jnp.sum(losses[0]),
        'encoder_loss': jnp.sum(losses[1]),
        'cumulative_loss': jnp.sum(losses[2]),
    }
    return quantized, aux

  def lookup(self, codes: jax.Array) -> jax.Array:
    """Sum of the codes' vectors: (B, T, Q) int -> (B, T, D)."""
    gathered = jax.vmap(lambda cb, c: jnp.take(cb, c, axis=0), in_axes=(0, -1), out_axes=0)(
        self.codebooks, codes)
    return jnp.sum(gathered, axis=0)


def restart_dead_codes(codebooks: jax.Array, usage: jax.Array, residuals: jax.Array,
                       rng: jax.Array, threshold: float):
  """Replaces codes whose usage is below `threshold` by random residual frames of their stage.

  codebooks (Q, K, D), usage (Q, K), residuals (..., Q, D): the inputs of each stage in the
  last batch. Live codes are untouched; restarted codes get usage 0. Returns
  (codebooks, usage, dead mask (Q, K)). Pure and jittable for any batch size.
  """
  num_q, k, d = codebooks.shape
  frames = residuals.reshape(-1, num_q, d).astype(codebooks.dtype)
  pick = jax.random.randint(rng, (num_q, k), 0, frames.shape[0])
  candidates = frames[pick, jnp.arange(num_q)[:, None]]
  dead = usage < threshold
  codebooks = jnp.where(dead[..., None], candidates, codebooks)
  usage = jnp.where(dead, 0.0, usage)
  return codebooks, usage, dead


def _assign(frames: jax.Array, centroids: jax.Array, chunk: int = 4096):
  """Nearest centroid and squared distance per frame, in chunks to bound (chunk, K) memory."""
  n, d = frames.shape
  pad = (-n) % chunk
  padded = jnp.pad(frames, ((0, pad), (0, 0))).reshape(-1, chunk, d)

  def one(block):
    dist = squared_distances(block, centroids)
    idx = first_argmin(dist)
    return idx.astype(jnp.int32), jnp.maximum(jnp.take_along_axis(dist, idx[:, None], 1)[:, 0], 0)

  idx, dist = jax.lax.map(one, padded)
  return idx.reshape(-1)[:n], dist.reshape(-1)[:n]


def _seed_kmeans_plus_plus(frames, k, rng):
  """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
  n = frames.shape[0]
  rng, first = jax.random.split(rng)
  c0 = frames[jax.random.randint(first, (), 0, n)]
  centroids = jnp.zeros((k, frames.shape[1]), frames.dtype).at[0].set(c0)
  d2 = jnp.sum(jnp.square(frames - c0), axis=-1)

  def body(i, state):
    centroids, d2, rng = state
    rng, key = jax.random.split(rng)
    total = jnp.sum(d2)
    logits = jnp.where(total > 0, jnp.log(jnp.maximum(d2, 1e-30)), jnp.zeros_like(d2))
    c = frames[jax.random.categorical(key, logits)]
    return centroids.at[i].set(c), jnp.minimum(d2, jnp.sum(jnp.square(frames - c), -1)), rng

  centroids, _, _ = jax.lax.fori_loop(1, k, body, (centroids, d2, rng))
  return centroids


def kmeans(frames: jax.Array, k: int, num_iters: int, rng: jax.Array, seeding: str = 'kmeans++'):
  """Lloyd's k-means in JAX; returns (centroids (k, D), mean squared error per frame).

  Fewer frames than k is allowed: the spare centroids repeat frames (they are then restarted
  as dead codes during training). Empty clusters keep their previous centre.
  """
  frames = jnp.asarray(frames, jnp.float32)
  if frames.ndim != 2 or frames.shape[0] == 0:
    raise ValueError(f'kmeans needs frames shaped (N, D) with N > 0, got {frames.shape}.')
  if seeding not in ('kmeans++', 'random'):
    raise ValueError(f"kmeans seeding must be 'kmeans++' or 'random', got {seeding!r}.")
  return _kmeans(frames, rng, k, num_iters, seeding)


@jax.jit
def _lloyd_step(frames, centroids):
  idx, _ = _assign(frames, centroids)
  k = centroids.shape[0]
  sums = jax.ops.segment_sum(frames, idx, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones_like(idx, jnp.float32), idx, num_segments=k)
  return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centroids)


def _kmeans(frames, rng, k, num_iters, seeding):
  if seeding == 'kmeans++':
    centroids = jax.jit(_seed_kmeans_plus_plus, static_argnums=1)(frames, k, rng)
  else:
    pick = jax.random.choice(rng, frames.shape[0], (k,), replace=frames.shape[0] < k)
    centroids = frames[pick]
  for _ in range(num_iters):
    centroids = _lloyd_step(frames, centroids)
  _, dist = jax.jit(_assign)(frames, centroids)
  return centroids, jnp.mean(dist) / frames.shape[1]


def kmeans_init_codebooks(codebooks: jax.Array, frames: jax.Array, rng: jax.Array, *,
                          stages: str = 'first', num_iters: int = 20,
                          seeding: str = 'kmeans++') -> jax.Array:
  """Fits codebook stages to encoder frames (N, D): stage s on the residuals of stages < s.

  stages: 'first' (the original: only the first codebook), 'all', or 'none'.
  """
  if stages == 'none':
    return codebooks
  if stages not in ('first', 'all'):
    raise ValueError(f"kmeans stages must be 'first', 'all' or 'none', got {stages!r}.")
  num_q, k, _ = codebooks.shape
  residual = jnp.asarray(frames, jnp.float32)
  for s in range(num_q if stages == 'all' else 1):
    rng, key = jax.random.split(rng)
    centroids, _ = kmeans(residual, k, num_iters, key, seeding)
    codebooks = codebooks.at[s].set(centroids.astype(codebooks.dtype))
    idx, _ = jax.jit(_assign)(residual, centroids)
    residual = residual - centroids[idx]
  return codebooks
