"""Sampling codes from the RQ-Transformer prior with key/value caches, in one jitted loop.

Per frame: one spatial step (the new frame's input attends to the cached keys/values of the
earlier frames), then Q depth steps with a per-frame depth cache; nothing is re-run. Each
code is drawn with its own key, fold_in(fold_in(key, frame), depth), so a run is a function
of (key, settings) and the uncached reference (`sample_uncached`, for the tests) draws the
same codes.

Lengths beyond the trained context C (`transformer.context_frames`) use a sliding window:
the first window generates C frames from the start vector; each next window keeps the last
C/2 frames as its prefix (re-encoded once at positions 0..C/2-1, one parallel prefill of
the spatial cache) and generates C - C/2 new frames. So every frame sees between C/2 and
C - 1 earlier frames, never positions the model was not trained on; the cost is one prefill
per C/2 frames. Every window is the same program (a C-frame buffer, the prefix length, the
frames to fill and the settings traced): it is compiled once per model and batch size, its
frame loop (a fori_loop) and depth loop (a lax.scan) each traced once, nothing unrolled.

Temperature divides the logits (0 = greedy, argmax); top-p keeps the smallest set of codes
whose probability reaches p (at least the most likely one).
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rqvae_jax import prior as prior_lib


def sample_logits(key, logits, temperature, top_p):
  """Codes (B,) from logits (B, K): argmax when temperature == 0, else nucleus sampling.

  `temperature` and `top_p` may be traced, so one compiled sampler serves every setting; a
  Python 0 skips the sampling ops (the uncached reference)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if isinstance(temperature, (int, float)) and temperature == 0:
    return greedy
  temperature = jnp.asarray(temperature, jnp.float32)
  scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
  sorted_logits = jnp.sort(scaled, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs            # mass of the more likely codes
  kept = (before < top_p) | (top_p >= 1.0)                # always keeps the first
  threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
  drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


def code_key(key, frame, depth):
  return jax.random.fold_in(jax.random.fold_in(key, frame), depth)


def _frame(model, cfg, variables, key, prev, is_first, position, frame_index, caches,
           temperature, top_p):
  """One frame: a spatial step, then Q cached depth steps (a lax.scan over the depths, its
  body traced once). Returns (codes (B, Q), caches)."""
  apply = functools.partial(model.apply, variables)
  h, caches = apply(prev, is_first, position, caches, method=model.spatial_step)
  batch = h.shape[0]
  depth_caches = prior_lib.empty_caches(cfg, cfg.depth_layers, batch, model.num_quantizers)

  def depth(carry, d):
    x, partial, depth_caches = carry
    logits, depth_caches = apply(x, d, depth_caches, method=model.depth_step)
    code = sample_logits(code_key(key, frame_index, d), logits, temperature, top_p)
    partial = partial + apply(code, d, method=model.code_embedding)
    x = apply(partial, method=model.depth_input)
    return (x, partial, depth_caches), code

  init = (h, jnp.zeros((batch, model.code_dim)), depth_caches)
  _, codes = jax.lax.scan(depth, init, jnp.arange(model.num_quantizers))
  return codes.T, caches


def _window_impl(model, variables, key, codes, start, end, offset, temperature, top_p):
  """Fills frames start..end-1 of the window `codes` (B, C, Q), frames < start being the
  given prefix; frame i of the window is frame offset + i of the sample (for the keys).

  Every argument but the model is traced and the shape is always the context's, so one
  program serves every window, length and setting (`sampling.compiled_windows` counts
  them). The spatial cache is seeded by one parallel pass over the whole window: keys and
  values at positions < start see only the prefix (causality); those from the padding are
  overwritten by the step at their position before any step attends to them."""
  cfg = model.config
  _, caches = model.apply(variables, codes, method=model.spatial_prefill)

  def body(t, carry):
    codes, caches = carry
    prev = jax.lax.dynamic_index_in_dim(codes, jnp.maximum(t - 1, 0), axis=1, keepdims=False)
    frame, caches = _frame(model, cfg, variables, key, prev, t == 0, t, offset + t, caches,
                           temperature, top_p)
    return jax.lax.dynamic_update_index_in_dim(codes, frame, t, axis=1), caches

  codes, _ = jax.lax.fori_loop(start, end, body, (codes, list(caches)))
  return codes


_COMPILED = {}


def _window_fn(model):
  """`_window_impl` jitted once per model architecture: keyed by value (a Flax module holding
  a ConfigDict is not hashable, so it cannot be a static argument), so a model restored again
  (generate after training, the tests) reuses the traced and compiled program."""
  key = (model.config.to_json_best_effort(sort_keys=True), model.num_quantizers,
         model.codebook_size, model.code_dim)
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(functools.partial(_window_impl, model))
  return _COMPILED[key]


def compiled_windows(model) -> int:
  """How many programs the sampler holds for `model`'s architecture: one per batch size,
  whatever the lengths, windows and settings sampled."""
  return _window_fn(model)._cache_size()  # pylint: disable=protected-access


def sample(model, variables, key, batch: int, num_frames: int, *, temperature: float = 1.0,
           top_p: float = 1.0, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
  """Codes (batch, num_frames, Q) from the prior, any length (sliding window past the
  context). `progress(n)` is called with the number of frames done after each window."""
  if num_frames < 1 or batch < 1:
    raise ValueError(f'Need batch >= 1 and num_frames >= 1, got {batch} and {num_frames}.')
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f'Need temperature >= 0 (0 = greedy) and 0 < top_p <= 1, got '
                     f'{temperature} and {top_p}.')
  context = int(model.config.context_frames)
  keep = context // 2
  window = _window_fn(model)
  settings = (jnp.float32(temperature), jnp.float32(top_p))
  buf = np.zeros((batch, context, model.num_quantizers), np.int32)
  out = np.zeros((batch, 0, model.num_quantizers), np.int32)
  while out.shape[1] < num_frames:
    prefix = min(keep, out.shape[1])
    new = min(context - prefix, num_frames - out.shape[1])
    buf[:] = 0
    buf[:, :prefix] = out[:, out.shape[1] - prefix:]
    codes = window(variables, key, jnp.asarray(buf), jnp.int32(prefix), jnp.int32(prefix + new),
                   jnp.int32(out.shape[1] - prefix), *settings)
    out = np.concatenate([out, np.asarray(codes)[:, prefix:prefix + new]], axis=1)
    if progress:
      progress(out.shape[1])
  return out


def sample_uncached(model, variables, key, batch: int, num_frames: int, *,
                    temperature: float = 1.0, top_p: float = 1.0) -> np.ndarray:
  """The reference: the whole model re-run for every code (within one context), the same
  keys as `sample`. Slow by design; for tests."""
  q = model.num_quantizers
  codes = jnp.zeros((batch, num_frames, q), jnp.int32)
  forward = jax.jit(lambda c: model.apply(variables, c))
  for t in range(num_frames):
    for d in range(q):
      logits = forward(codes)[:, t, d]   # later codes are zeros: causality ignores them
      codes = codes.at[:, t, d].set(sample_logits(code_key(key, t, d), logits, temperature,
                                                  top_p))
  return np.asarray(codes)
