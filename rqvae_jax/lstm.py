"""Bidirectional multi-layer LSTM with PyTorch `nn.LSTM` semantics.

The parameters use PyTorch's names, shapes and gate order (i, f, g, o) so a
`torch.nn.LSTM(batch_first=True, bidirectional=True)` state dict can be copied
in array by array (`weight_ih_l0` -> `params['weight_ih_l0']`, etc.).
"""

import functools
import math
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from rqvae_jax import native
from rqvae_jax import native_lstm
from rqvae_jax.dropout import Dropout

# `unroll` of the time scans (forward and backward) in the 'scan' path.
# benchmarks/lstm_speed.py --threads 1 on the 2-vCPU AMD EPYC dev machine
# (busy, shared), jit forward+backward, T=441, In=H=256, 2 layers, median CPU
# seconds of 7:
#   unroll   1     2     4     8
#   B=2    0.33  0.49  0.60  1.16
#   B=16   2.12  2.51  3.78  5.18
# (torch.nn.LSTM, 1 thread: B=2 0.30, B=16 1.85). Unrolling only grows the
# loop body; XLA gains nothing from it here.
SCAN_UNROLL = 1

_IMPLS = ('auto', 'scan', 'native', 'cudnn')


def lstm_param_count(input_size: int, hidden_size: int, num_layers: int) -> int:
  """Parameter count of a bidirectional `torch.nn.LSTM` (two bias vectors)."""
  h = hidden_size
  total = 0
  for k in range(num_layers):
    in_k = input_size if k == 0 else 2 * h
    total += 2 * (4 * h * (in_k + h) + 8 * h)
  return total


def _uniform(bound: float):
  """PyTorch's LSTM init: U(-1/sqrt(H), 1/sqrt(H)) for weights and biases."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _scan_forward(xs, w_hh, unroll, save_residuals):
  """The recurrence, both directions at once: one (2, B, H) x (2, H, 4H) matmul per step.

  One matmul for the four gates, then a split: on the 2-core AMD EPYC (AVX2) with jax
  0.10.2, forward+backward of the paper's 2-layer BiLSTM (T 441) took 0.24 s against
  0.30 s with four per-gate (2, H, H) matmuls at B=2, and 1.43 s against 1.66 s at B=16
  (`benchmarks.lstm_speed`, two runs each; README: Performance). Per-gate matmuls had
  been 10-30 % faster on the machines and jax of 2026-11. W is contracted over its leading
  axis ((2, H, 4H), h @ W), which was ~2x faster at small batch than PyTorch's (4H, H).

  Without residuals (inference) the gates are one `where(g block, tanh, sigmoid)` over the
  (2, B, 4H) pre-activations: on the 2-core AMD EPYC with AVX-512, 13.1-16.1 -> 10.3-10.4 ms
  per layer (T 441, B 2) and the paper model's separation call 188-200 -> 173-188 ms
  (interleaved runs). The training scan keeps per-gate activations: the one-array form made
  forward+backward 2-8 % slower (`benchmarks.lstm_speed`, three interleaved pairs).
  """
  _, d, b, h4 = xs.shape
  hid = h4 // 4
  w_t = jnp.swapaxes(w_hh, 1, 2)                               # (2, H, 4H)
  is_g = (jnp.arange(h4) // hid) == 2                          # the cell-input gate's block

  def step(carry, xt):
    h, c = carry
    z = xt.astype(jnp.float32) + jnp.einsum('dbh,dhg->dbg', h, w_t,
                                            preferred_element_type=jnp.float32)
    if save_residuals:
      i, f, g, o = jnp.split(z, 4, axis=-1)
      i, f, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jax.nn.sigmoid(o)
      g = jnp.tanh(g)
    else:
      i, f, g, o = jnp.split(jnp.where(is_g, jnp.tanh(z), jax.nn.sigmoid(z)), 4, axis=-1)
    c = f * c + i * g  # cell state and gates stay float32
    h = (o * jnp.tanh(c)).astype(h.dtype)
    return (h, c), ((h, c, (i, f, g, o)) if save_residuals else h)

  init = (jnp.zeros((d, b, hid), xs.dtype), jnp.zeros((d, b, hid), jnp.float32))
  return jax.lax.scan(step, init, xs, unroll=unroll)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _recurrence(xs, w_hh, unroll):
  """LSTM recurrence of both directions given the input projections.

  A custom VJP because autodiff of the scan accumulates dW_hh (2*4H*H floats)
  inside the reverse loop at every step; here the loop only emits the gate
  gradients and dW_hh is one large matmul afterwards (as in cuDNN/PyTorch).
  Forward-mode (jax.jvp) is therefore not supported.

  Args:
    xs: (T, 2, B, 4H) input projections incl. both biases, direction 1
      already time-reversed; compute dtype.
    w_hh: (2, 4H, H) recurrent weights, PyTorch layout; compute dtype.
    unroll: `jax.lax.scan` unroll.

  Returns:
    (T, 2, B, H) hidden states, in the same (per-direction) time order as xs.
  """
  return _scan_forward(xs, w_hh, unroll, save_residuals=False)


def _recurrence_fwd(xs, w_hh, unroll):
  hs, cs, acts = _scan_forward(xs, w_hh, unroll, save_residuals=True)
  return hs, (hs, cs, acts, w_hh)


def _recurrence_bwd(unroll, residuals, dhs):
  hs, cs, acts, w_hh = residuals
  d, b, hid = hs.shape[1:]
  c_prev = jnp.concatenate([jnp.zeros_like(cs[:1]), cs[:-1]], axis=0)

  def step(carry, inputs):
    dh, dc = carry
    dh_t, c, cp, act = inputs
    i, f, g, o = act
    dh = dh + dh_t.astype(jnp.float32)
    tc = jnp.tanh(c)
    dc = dc + dh * o * (1.0 - tc * tc)
    dgates = jnp.concatenate([  # w.r.t. the pre-activations of i, f, g, o
        dc * g * i * (1.0 - i),
        dc * cp * f * (1.0 - f),
        dc * i * (1.0 - g * g),
        dh * tc * o * (1.0 - o)], axis=-1).astype(w_hh.dtype)
    dh = jnp.einsum('dbg,dgh->dbh', dgates, w_hh, preferred_element_type=jnp.float32)
    return (dh, dc * f), dgates

  init = (jnp.zeros((d, b, hid), jnp.float32),
          jnp.zeros((d, b, hid), jnp.float32))
  _, dgates = jax.lax.scan(
      step, init, (dhs, cs, c_prev, acts), reverse=True, unroll=unroll)
  return dgates.astype(dhs.dtype), recurrent_weight_grad(dgates, hs).astype(w_hh.dtype)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def recurrent_weight_grad(dgates, hs):
  """dW_hh (D, 4H, H) float32 from the gate gradients and hidden states (T, D, B, .) of
  both directions: one matmul over all steps after the backward walk (the scan's and the
  CPU kernel's backward both leave it out of their per-step loop)."""
  h_prev = jnp.concatenate([jnp.zeros_like(hs[:1]), hs[:-1]], axis=0)
  return jnp.einsum('tdbg,tdbh->dgh', dgates, h_prev, preferred_element_type=jnp.float32)


# A derived, read-only collection an inference caller may add (`prepared_layers`): each
# layer's weights already in the CPU kernel's layout. Never trained, never saved.
PREPARED = 'lstm_prepared'


def prepared_layers(params: Dict[str, jax.Array], num_layers: int) -> Dict[str, Dict]:
  """A BiLSTM's params -> per layer `w_ih` (8H, In) = [W_ih_fwd; W_ih_bwd], `w_hh_panels`
  (both directions' W_hh as the kernel reads them, `native_lstm.recurrent_panels`) and `b` (8H,) (both
  biases summed): what every forward pass otherwise rebuilds from the PyTorch-layout weights
  (concatenations and transposes, ~10 ms of a ~120 ms batch-2 separation call on the 2-core
  EPYC, 2026-12-07). For inference, where the weights do not change."""
  out = {}
  for k in range(num_layers):
    p = lambda name: jnp.asarray(params[name], jnp.float32)
    out[f'layer{k}'] = {
        'w_ih': jnp.concatenate([p(f'weight_ih_l{k}'), p(f'weight_ih_l{k}_reverse')], axis=0),
        'w_hh_panels': native_lstm.recurrent_panels(jnp.stack([p(f'weight_hh_l{k}'),
                                                               p(f'weight_hh_l{k}_reverse')])),
        'b': jnp.concatenate([p(f'bias_ih_l{k}') + p(f'bias_hh_l{k}'),
                              p(f'bias_ih_l{k}_reverse') + p(f'bias_hh_l{k}_reverse')]),
    }
  return out


def _bilstm_layer_scan(x, w_ih, w_hh, b, unroll, native=False, w_hh_panels=None):
  """One bidirectional layer, both directions in a single scan (or the CPU kernel).

  Args:
    x: (T, B, In) time-major input, compute dtype.
    w_ih: (8H, In) = [W_ih_fwd; W_ih_bwd].
    w_hh: (2, 4H, H) = stack(W_hh_fwd, W_hh_bwd).
    b: (8H,) = [b_ih_fwd + b_hh_fwd; b_ih_bwd + b_hh_bwd].
    unroll: `jax.lax.scan` unroll.
    native: run the recurrence with the CPU kernel (`native_lstm.recurrence`).
    w_hh_panels: w_hh already in the kernel's layout (`prepared_layers`), instead of w_hh:
      the kernel's inference pass, whatever `native` says (not differentiable).

  Returns:
    (T, B, 2H) time-major [forward, backward] hidden states.
  """
  t, bsz, _ = x.shape
  h4 = w_ih.shape[0] // 2
  # The input projection has no time dependence: one big matmul instead of T
  # small ones inside the loop.
  proj = (jnp.einsum('tbi,gi->tbg', x, w_ih) + b).reshape(t, bsz, 2, h4)
  # The backward direction walks the reversed sequence, so it can share the
  # forward direction's loop index.
  xs = jnp.stack([proj[:, :, 0], proj[::-1, :, 1]], axis=1)  # (T, 2, B, 4H)
  if w_hh_panels is not None:
    hs = native_lstm.inference_prepared(xs, w_hh_panels)
  else:
    hs = native_lstm.recurrence(xs, w_hh) if native else _recurrence(xs, w_hh, unroll)
  return jnp.concatenate([hs[:, 0], hs[::-1, 1]], axis=-1)


def _bilstm_layer_cudnn(x, w_ih, w_hh, b_ih, b_hh):
  """One bidirectional layer through cuDNN (`jax.experimental.rnn`).

  Args:
    x: (B, T, In) float32, batch-major.
    w_ih, w_hh, b_ih, b_hh: pairs (forward, backward) in PyTorch layout.

  Returns:
    (B, T, 2H) float32.
  """
  from jax.experimental import rnn  # pylint: disable=g-import-not-at-top

  bsz, t, in_size = x.shape
  hid = w_hh[0].shape[1]
  # Layout from jax.experimental.rnn (`_get_params_shapes_in_lstm`): all
  # matrices of the pseudo-layers (fwd, bwd) then all biases, each pseudo-layer
  # W_ih before W_hh; gate order i, f, g, o like PyTorch.
  flat = jnp.concatenate([
      w_ih[0].ravel(), w_hh[0].ravel(), w_ih[1].ravel(), w_hh[1].ravel(),
      b_ih[0], b_hh[0], b_ih[1], b_hh[1]])
  zeros = jnp.zeros((2, bsz, hid), jnp.float32)
  seq_lengths = jnp.full((bsz,), t, jnp.int32)
  y, _, _ = rnn.lstm(
      x, zeros, zeros, flat, seq_lengths,
      input_size=in_size, hidden_size=hid, num_layers=1, dropout=0.0,
      bidirectional=True)
  return y


def _on_cuda() -> bool:
  # ROCm is also backend 'gpu' but its MIOpen RNN weight layout differs
  # (see jax.experimental.rnn.swap_lstm_gates); jax itself tells them apart
  # by platform_version.
  if jax.default_backend() != 'gpu':
    return False
  return 'cuda' in jax.devices()[0].client.platform_version.lower()


class BiLSTM(nn.Module):
  """Multi-layer bidirectional LSTM, equivalent to PyTorch's `nn.LSTM`.

  Same as `torch.nn.LSTM(In, hidden_size, num_layers, batch_first=True,
  bidirectional=True, dropout=dropout)` with zero initial state; the output is
  [forward, backward] concatenated on the last axis.

  impl:
    'scan': portable `lax.scan`; per layer one input-projection matmul for both
      directions, then both directions in one time-major scan with a
      hand-written VJP (reverse-mode only: `jax.jvp` through it fails).
    'native': the same layer with the recurrence in a compiled CPU kernel
      (`rqvae_jax.native_lstm`, built on first use with the machine's C++
      compiler, `rqvae_jax.native`): each direction on its own thread, no per-step dispatch. CPU and
      float32 only, reverse-mode only; raises when the kernel cannot be built.
    'cudnn': `jax.experimental.rnn.lstm` (cuDNN), one call per layer so the
      inter-layer dropout is flax's. CUDA only; computes in float32 (jax's
      cuDNN RNN supports only float32) and casts the output to `dtype`. It
      uses TF32 unless `jax.default_matmul_precision('highest')` is active
      and raises under a 'bfloat16' default matmul precision.
      UNTESTED: written on a CPU-only machine, it needs a numerical check
      against 'scan' on a GPU (`test_cudnn_matches_scan_on_gpu` in
      tests/test_lstm.py, which runs only where a GPU backend is present).
    'auto': 'cudnn' on a CUDA GPU; on the CPU 'native' for float32 when the
      kernel builds (else 'scan', with one warning saying why); else 'scan'.
  """
  hidden_size: int
  num_layers: int = 2
  dropout: float = 0.0
  impl: str = 'auto'
  dtype: Any = jnp.float32

  def _resolved_impl(self) -> str:
    if self.impl not in _IMPLS:
      raise ValueError(f'impl must be one of {_IMPLS}, got {self.impl!r}')
    if self.impl == 'auto':
      if _on_cuda():
        return 'cudnn'
      # native.usable(): the CPU backend and a built kernel.
      return 'native' if jnp.dtype(self.dtype) == jnp.float32 and native.usable() else 'scan'
    if self.impl == 'cudnn' and not _on_cuda():
      raise ValueError(
          "BiLSTM impl='cudnn' needs a CUDA GPU backend, but jax's default "
          f"backend is {jax.default_backend()!r}; use impl='scan' or 'auto'.")
    if self.impl == 'native':
      if jax.default_backend() != 'cpu' or jnp.dtype(self.dtype) != jnp.float32:
        raise ValueError(
            "BiLSTM impl='native' is a float32 CPU kernel, but the backend is "
            f"{jax.default_backend()!r} and dtype {jnp.dtype(self.dtype).name}; use "
            "impl='scan' or 'auto'.")
      status = native.load()
      if not status.available:
        raise RuntimeError(f"BiLSTM impl='native': the CPU kernel is not available "
                           f"({status.reason}); use impl='scan' or 'auto'.")
    return self.impl

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (B, T, In) -> (B, T, 2 * hidden_size) in `self.dtype`."""
    impl = self._resolved_impl()
    hid = self.hidden_size
    init = _uniform(1.0 / math.sqrt(hid))
    params = []
    for k in range(self.num_layers):
      in_k = x.shape[-1] if k == 0 else 2 * hid
      layer = {}
      for sfx in ('', '_reverse'):
        layer[sfx] = (
            self.param(f'weight_ih_l{k}{sfx}', init, (4 * hid, in_k)),
            self.param(f'weight_hh_l{k}{sfx}', init, (4 * hid, hid)),
            self.param(f'bias_ih_l{k}{sfx}', init, (4 * hid,)),
            self.param(f'bias_hh_l{k}{sfx}', init, (4 * hid,)),
        )
      params.append(layer)

    if impl == 'cudnn':
      y = jnp.asarray(x, jnp.float32)
      for k, layer in enumerate(params):
        fw, bw = layer[''], layer['_reverse']
        y = _bilstm_layer_cudnn(
            y, *[(a.astype(jnp.float32), c.astype(jnp.float32))
                 for a, c in zip(fw, bw)])
        if k < self.num_layers - 1:
          y = Dropout(self.dropout)(y, deterministic=not train)
      return y.astype(self.dtype)

    y = jnp.swapaxes(jnp.asarray(x, self.dtype), 0, 1)  # time-major
    for k, layer in enumerate(params):
      if impl == 'native' and self.has_variable(PREPARED, f'layer{k}'):
        prep = self.get_variable(PREPARED, f'layer{k}')
        y = _bilstm_layer_scan(y, prep['w_ih'], None, prep['b'], SCAN_UNROLL, native=True,
                               w_hh_panels=prep['w_hh_panels'])
      else:
        (wif, whf, bif, bhf), (wib, whb, bib, bhb) = layer[''], layer['_reverse']
        w_ih = jnp.concatenate([wif, wib], axis=0).astype(self.dtype)
        w_hh = jnp.stack([whf, whb]).astype(self.dtype)
        b = jnp.concatenate([bif + bhf, bib + bhb]).astype(self.dtype)
        y = _bilstm_layer_scan(y, w_ih, w_hh, b, SCAN_UNROLL, native=impl == 'native')
      if k < self.num_layers - 1:
        y = Dropout(self.dropout)(y, deterministic=not train)
    return jnp.swapaxes(y, 0, 1)
