"""The BiLSTM recurrence as a compiled CPU kernel (rqvae_jax/native/lstm_cpu.cc).

Why: on the CPU, XLA runs the BiLSTM's 441 sequential steps as several small thunks each,
with both directions' 2 MB of recurrent weights in one matmul; the kernel runs each
direction's whole sequence on its own thread (README: Performance has the measurements).
It is what `BiLSTM(impl='auto')` uses on the CPU when it builds (rqvae_jax/native.py);
`impl='scan'` is the portable path it is tested against (tests/test_native_lstm.py).
"""

import functools

import jax
import jax.numpy as jnp

from rqvae_jax import native

# Per kernel, its Shardy rule: t time, d direction, b batch, h hidden, g = 4h gates; the
# weights' panel axes p (panels) and c (PANEL columns).
_RULES = {
    'lstm_inference': 't d b g, d p h c -> t d b h',
    'lstm_forward': 't d b g, d p h c -> t d b h, t d b h, t d b g',
    'lstm_backward': 't d b h, t d b h, t d b g, d p g c -> t d b g',
}

# Columns per weight panel: lstm_cpu.cc's kPanel.
PANEL = 32


def panels(m: jax.Array) -> jax.Array:
  """(D, K, N) -> (D, ceil(N / PANEL), K, PANEL), zero-padded: each matrix in the panels the
  kernel's products read (lstm_cpu.cc `accumulate_panels`), a panel's K rows of PANEL columns
  contiguous, so a step streams its weights in order (twice as fast as the (K, N) rows at
  batch 2, README: Performance). One fused copy in XLA, as the transpose it replaces."""
  d, k, n = m.shape
  count = -(-n // PANEL)
  m = jnp.pad(m, ((0, 0), (0, 0), (0, count * PANEL - n)))
  return jnp.transpose(m.reshape(d, k, count, PANEL), (0, 2, 1, 3))


def recurrent_panels(w_hh: jax.Array) -> jax.Array:
  """(D, 4H, H) PyTorch-layout recurrent weights -> the panels of their transposes (h @ W^T),
  as the forward and inference kernels read them."""
  return panels(jnp.swapaxes(w_hh, 1, 2))


def _result_shapes(kind, args):
  if kind == 'lstm_backward':
    return jax.ShapeDtypeStruct(args[2].shape, jnp.float32)
  t, d, b, g4 = args[0].shape
  state = jax.ShapeDtypeStruct((t, d, b, g4 // 4), jnp.float32)
  if kind == 'lstm_inference':
    return state
  return state, state, jax.ShapeDtypeStruct((t, d, b, g4), jnp.float32)


@functools.lru_cache(maxsize=None)
def _call_of(kind: str):
  return native.partitioned(kind, _RULES[kind], 'b', functools.partial(_result_shapes, kind))


def _call(kind: str, *args):
  return _call_of(kind)(*args)


def _check(xs, w_hh):
  t, d, b, g4 = xs.shape
  if xs.dtype != jnp.float32 or w_hh.dtype != jnp.float32:
    raise ValueError(f'The CPU LSTM kernel computes in float32, got xs {xs.dtype} and '
                     f'w_hh {w_hh.dtype}; use BiLSTM(impl="scan") for other dtypes.')
  if w_hh.shape != (d, g4, g4 // 4):
    raise ValueError(f'w_hh must be (D, 4H, H) = {(d, g4, g4 // 4)} for xs {xs.shape}, '
                     f'got {w_hh.shape}.')
  return t, d, b, g4 // 4


@jax.custom_vjp
def recurrence(xs: jax.Array, w_hh: jax.Array) -> jax.Array:
  """The kernel's counterpart of `lstm._recurrence`: (T, D, B, 4H), (D, 4H, H) -> (T, D, B, H).

  Same contract (input projections with both biases, direction 1 time-reversed, zero
  initial state, PyTorch gate order); float32 only; reverse-mode differentiable.
  """
  _check(xs, w_hh)
  return _call('lstm_inference', xs, recurrent_panels(w_hh))


def inference_prepared(xs: jax.Array, w_hh_panels: jax.Array) -> jax.Array:
  """`recurrence` for inference with the recurrent weights already in the kernel's layout:
  (T, D, B, 4H), `recurrent_panels(w_hh)` -> (T, D, B, H) (`lstm.prepared_layers` builds
  them once). Not differentiable: the weights are a derived copy."""
  t, d, b, g4 = xs.shape
  want = (d, -(-g4 // PANEL), g4 // 4, PANEL)
  if w_hh_panels.shape != want:
    raise ValueError(f'w_hh_panels must be recurrent_panels(w_hh), (D, ceil(4H / {PANEL}), H, '
                     f'{PANEL}) = {want} for xs {xs.shape}, got {w_hh_panels.shape}.')
  if xs.dtype != jnp.float32 or w_hh_panels.dtype != jnp.float32:
    raise ValueError(f'The CPU LSTM kernel computes in float32, got xs {xs.dtype} and '
                     f'w_hh_panels {w_hh_panels.dtype}.')
  return _call('lstm_inference', xs, jax.lax.stop_gradient(w_hh_panels))


def _recurrence_fwd(xs, w_hh):
  _check(xs, w_hh)
  hs, cs, acts = _call('lstm_forward', xs, recurrent_panels(w_hh))
  return hs, (hs, cs, acts, w_hh)


def _recurrence_bwd(residuals, dhs):
  hs, cs, acts, w_hh = residuals
  from rqvae_jax import lstm  # pylint: disable=g-import-not-at-top  (lstm imports this module)
  dgates = _call('lstm_backward', dhs.astype(jnp.float32), cs, acts, panels(w_hh))
  return dgates, lstm.recurrent_weight_grad(dgates, hs)   # the kernel only walks the steps


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
