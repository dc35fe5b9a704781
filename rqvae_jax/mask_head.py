"""A spectral-mask output head: the latent decides, per frame and frequency bin, which stem
owns the mixture's energy; the stems are the masked mixture STFT, inverted.

Why (README: Demo): the paper's waveform decoder rebuilds each stem sample by sample through
transposed convolutions and full-rate skips. On a 2-core CPU budget it learns bass and drums
but hedges guitar vs piano (estimates ~0.4/0.4 blends of both), and most of what it separates
comes through the skips, not the codes. Here the STFT frames are aligned one-to-one with the
latent frames (hop = the encoder's total stride, 200 samples: 110.25 frames/s at 22.05 kHz),
so every mask value comes from the decoder's reading of the (quantized) latent, and the
mixture's own detail is passed through untouched, the way a skip connection would, but
frequency-selectively. Masks are a softmax over stems, so the stems always sum to the mixture.

`model.output_head = 'mask'` selects it; `model.skip_connections` then means: also feed the
decoder the mixture's log-magnitude frames (the spectral analogue of the encoder skips).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rqvae_jax import blocks
from rqvae_jax.lstm import BiLSTM


def hop_length(model_config) -> int:
  """The STFT hop: the encoder's total stride, so that STFT and latent frames coincide."""
  return int(np.prod(model_config.strides))


def sqrt_hann(n_fft: int) -> np.ndarray:
  """Square root of the periodic Hann window: analysis x synthesis = Hann, which sums to a
  constant (n_fft / (2 hop)) when n_fft is a multiple of 2 hop."""
  return np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)


def _check(num_samples: int, n_fft: int, hop: int) -> int:
  if hop % 2:
    raise ValueError(f'The STFT heads need an even hop (the product of model.strides), got '
                     f'{hop}: frames are centred on hop-long blocks with (n_fft - hop) / 2 '
                     'samples each side.')
  if n_fft % hop or (n_fft // hop) % 2:
    raise ValueError(f'model.mask_fft ({n_fft}) must be an even multiple of the hop ({hop}, '
                     f'the product of model.strides), e.g. {4 * hop}.')
  if num_samples % hop:
    raise ValueError(f'The mask head needs a length that is a multiple of the hop {hop}; got '
                     f'{num_samples}. Pad to rqvae_jax.model.next_valid_length.')
  return num_samples // hop


def stft(x, n_fft: int, hop: int):
  """(B, N) -> complex (B, N / hop, n_fft // 2 + 1).

  Frame t covers samples [t * hop - (n_fft - hop) / 2, t * hop + (n_fft + hop) / 2): it is
  centred on the t-th hop-long block, which is what latent frame t summarises.
  """
  frames_count = _check(x.shape[-1], n_fft, hop)
  ratio, pad = n_fft // hop, (n_fft - hop) // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad)))
  hops = xp.reshape(x.shape[0], frames_count + ratio - 1, hop)
  frames = jnp.concatenate([hops[:, j:j + frames_count] for j in range(ratio)], axis=-1)
  return jnp.fft.rfft(frames * sqrt_hann(n_fft), axis=-1)


def istft(spec, n_fft: int, hop: int):
  """Inverse of `stft` (weighted overlap-add, divided by the summed squared window): exact
  reconstruction, edges included, for an unmodified spectrogram."""
  batch, frames_count = spec.shape[0], spec.shape[1]
  ratio, pad = n_fft // hop, (n_fft - hop) // 2
  window = sqrt_hann(n_fft)
  frames = jnp.fft.irfft(spec, n=n_fft, axis=-1) * window
  parts = frames.reshape(batch, frames_count, ratio, hop)
  out = 0.0
  envelope = np.zeros((frames_count + ratio - 1, hop), np.float32)
  w2 = (window ** 2).reshape(ratio, hop)
  for j in range(ratio):
    out = out + jnp.pad(parts[:, :, j], ((0, 0), (j, ratio - 1 - j), (0, 0)))
    envelope[j:j + frames_count] += w2[j]
  out = out / np.maximum(envelope, 1e-8)
  out = out.reshape(batch, -1)
  return out[:, pad:pad + frames_count * hop]


def latent_aligned_stft(mixture, z, n_fft: int, hop: int):
  """The mixture's STFT (B, T, F), checked to have the latent's T frames."""
  spec = stft(mixture.astype(jnp.float32), n_fft, hop)
  if spec.shape[1] != z.shape[1]:
    raise ValueError(f'{spec.shape[1]} STFT frames vs {z.shape[1]} latent frames: the STFT '
                     'heads need a length the encoder maps to length / hop frames.')
  return spec


def trunk_width(model_config) -> int:
  """Width of the STFT heads' BiLSTM and dense: `model.mask_hidden`, 0 = the latent's."""
  return model_config.get('mask_hidden', 0) or model_config.channels[-1]


def trunk_input(model_config, z, dtype):
  """The latent (B, T, D), projected to the trunk's width when that differs (`latent_in`).
  Called inside a head's compact `__call__`, so its layers are that head's."""
  x = z.astype(dtype)
  hidden = trunk_width(model_config)
  if hidden != z.shape[-1]:
    x = nn.Dense(hidden, dtype=dtype, name='latent_in')(x)
  return x


def frame_trunk(model_config, x, train: bool, dtype):
  """The STFT heads' shared trunk over latent frames: BiLSTM (`lstm`), dense (`fc`), GELU.
  Called inside a head's compact `__call__`, so its layers are that head's."""
  c = model_config
  hidden = trunk_width(c)
  x = BiLSTM(hidden, c.lstm_layers, c.dropout, c.lstm_impl, dtype, name='lstm')(x, train)
  x = nn.Dense(hidden, dtype=dtype, name='fc',
               **blocks.dense_init(x.shape[-1], c.get('torch_init', False)))(x)
  return nn.gelu(x)


class MaskDecoder(nn.Module):
  """Quantized latent (B, T, D) [+ the mixture's log-magnitude frames] -> stems (B, N, S)."""
  config: Any

  @nn.compact
  def __call__(self, z, mixture, use_spectrogram: bool, train: bool):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    n_fft, hop = c.mask_fft, hop_length(c)
    spec = latent_aligned_stft(mixture, z, n_fft, hop)           # (B, T, F)
    hidden = trunk_width(c)
    x = trunk_input(c, z, dtype)
    logmag = None
    if use_spectrogram:
      logmag = jnp.log(jnp.abs(spec) + 1e-4)
      logmag = nn.LayerNorm(dtype=dtype, name='spec_norm')(logmag.astype(dtype))
      x = x + nn.Dense(hidden, dtype=dtype, name='spec_in')(logmag)
    x = frame_trunk(c, x, train, dtype)
    bins = spec.shape[-1]
    logits = nn.Dense(c.num_stems * bins, dtype=dtype, name='mask')(x)
    logits = logits.reshape(*x.shape[:2], c.num_stems, bins)
    if c.get('mask_bin_features', 0):
      logits = logits + per_bin_logits(c, x, logmag, bins, dtype)
    logits = logits.astype(jnp.float32)
    masks = nn.softmax(logits, axis=2)                           # (B, T, S, F), sums to 1
    stems = istft(jnp.moveaxis(masks * spec[:, :, None], 2, 1).reshape(-1, *spec.shape[1:]),
                  n_fft, hop)
    return jnp.moveaxis(stems.reshape(spec.shape[0], c.num_stems, -1), 1, 2)


def per_bin_logits(model_config, x, logmag, bins: int, dtype):
  """(B, T, S, F) logits from a small per-bin network: the frame state, expanded to
  `model.mask_bin_features` values per bin, plus the mixture's local spectral shape (a 3 x 5
  conv over time and frequency of the log-magnitude), then `model.mask_bin_layers` residual
  convolutions (dilated 1, 2, 4.. in frequency, and in time too with
  `model.mask_bin_dilate_time`), through a GELU and a dense to the stems.

  Called inside a head's compact `__call__`, so its layers are that head's.

  Why: the single dense from the frame state gives masks of rank <= its width, a poor fit
  for harmonic combs at arbitrary pitches; here each bin's decision also sees whether that
  bin is a spectral peak and how it moves, so masks can follow individual partials.
  """
  c = model_config
  features = c.mask_bin_features
  state = nn.Dense(bins * features, dtype=dtype, name='bin_state')(x)
  state = state.reshape(*x.shape[:2], bins, features)
  if logmag is not None:
    local = nn.Conv(features, (3, 5), padding='SAME', dtype=dtype, name='bin_local')(
        logmag[..., None])
    state = state + local
  dilate_time = bool(c.get('mask_bin_dilate_time', False))
  for i in range(c.get('mask_bin_layers', 0)):
    # Residual convolutions over (time, frequency), dilated along frequency 1, 2, 4, ...:
    # a partial's neighbours a harmonic spacing away (7+ bins for a 200 Hz note) and the
    # note's onset and decay over a few frames come into each bin's view; with
    # `model.mask_bin_dilate_time` also along time (+-16 frames, ~150 ms, after four layers:
    # a struck note's decay vs a sustained one's) at the same cost.
    step = nn.Conv(features, (3, 3), kernel_dilation=(2 ** i if dilate_time else 1, 2 ** i),
                   padding='SAME',
                   dtype=dtype, name=f'bin_conv{i}')(nn.gelu(state))
    state = state + step
  out = nn.Dense(c.num_stems, dtype=dtype, name='bin_out',
                 kernel_init=nn.initializers.zeros)(nn.gelu(state))   # starts as a no-op
  return jnp.moveaxis(out, -1, 2)
