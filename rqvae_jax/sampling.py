"""Sampling codes from the RQ-Transformer prior with key/value caches, in a jitted lax.scan.

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
per C/2 frames.

Temperature divides the logits (0 = greedy, argmax); top-p keeps the smallest set of codes
whose probability reaches p (at least the most likely one).
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rqvae_jax import prior as prior_lib


def sample_logits(key, logits, temperature: float, top_p: float):
  """Codes (B,) from logits (B, K): argmax when temperature == 0, else nucleus sampling."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of the more likely codes
    kept = before < top_p                                 # always keeps the first
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def code_key(key, frame, depth):
  return jax.random.fold_in(jax.random.fold_in(key, frame), depth)


def _frame(model, cfg, variables, key, prev, is_first, position, frame_index, caches,
           temperature, top_p):
  """One frame: a spatial step, then Q cached depth steps. Returns (codes (B, Q), caches)."""
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


_COMPILED = {}


def _window(model, variables, key, prefix, first_frame, *, num_new: int, temperature: float,
            top_p: float):
  """`_window_impl` jitted once per (model, length, settings): a Flax module holding a
  ConfigDict is not hashable, so it cannot be a static argument."""
  sig = (id(model), prefix.shape, num_new, float(temperature), float(top_p))
  if sig not in _COMPILED:
    _COMPILED[sig] = (model, jax.jit(functools.partial(
        _window_impl, model, num_new=num_new, temperature=temperature, top_p=top_p)))
  return _COMPILED[sig][1](variables, key, prefix, first_frame)


def _window_impl(model, variables, key, prefix, first_frame, *, num_new: int,
                 temperature: float, top_p: float):
  """Generates `num_new` frames after `prefix` (B, P, Q) (P may be 0); the prefix fills the
  spatial cache at positions 0..P-1; `first_frame` is the absolute index of the first new
  frame (for the keys). Returns (B, num_new, Q)."""
  cfg = model.config
  batch, p, q = prefix.shape
  length = p + num_new
  caches = prior_lib.empty_caches(cfg, cfg.spatial_layers, batch, length)
  if p:         # positions 0..P-1: inputs start, frames 0..P-2 of the prefix, at once
    _, kv = model.apply(variables, prefix, method=model.spatial_prefill)
    caches = [(jax.lax.dynamic_update_slice(ck, k, (0, 0, 0, 0)),
               jax.lax.dynamic_update_slice(cv, v, (0, 0, 0, 0)))
              for (ck, cv), (k, v) in zip(caches, kv)]
  prev0 = prefix[:, -1] if p else jnp.zeros((batch, q), jnp.int32)

  def step(carry, position):
    caches, prev = carry
    codes, caches = _frame(model, cfg, variables, key, prev, position == 0, position,
                           first_frame + position - p, caches, temperature, top_p)
    return (caches, codes), codes

  _, out = jax.lax.scan(step, (caches, prev0), jnp.arange(p, length))
  return jnp.moveaxis(out, 0, 1)


def sample(model, variables, key, batch: int, num_frames: int, *, temperature: float = 1.0,
           top_p: float = 1.0, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
  """Codes (batch, num_frames, Q) from the prior, any length (sliding window past the
  context). `progress(n)` is called with the number of frames done after each window."""
  context = int(model.config.context_frames)
  keep = context // 2
  out = np.asarray(_window(model, variables, key, jnp.zeros((batch, 0, model.num_quantizers),
                                                            jnp.int32), 0,
                           num_new=min(context, num_frames), temperature=temperature,
                           top_p=top_p))
  if progress:
    progress(out.shape[1])
  while out.shape[1] < num_frames:
    new = min(context - keep, num_frames - out.shape[1])
    part = _window(model, variables, key, jnp.asarray(out[:, -keep:]), out.shape[1],
                   num_new=new, temperature=temperature, top_p=top_p)
    out = np.concatenate([out, np.asarray(part)], axis=1)
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
