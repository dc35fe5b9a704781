"""A spectrogram output head for codec mode: codes alone -> each stem's STFT magnitude.

Why (README: Codec and prior): a codec's decoder sees nothing but the codes. The paper's
waveform decoder, trained without skips on the demo's CPU budget (600 steps), learned only a
flat broadband noise (every octave band within a few dB, 50 dB in the bass stem's empty
top octave; SI-SDR -42 dB, log-mel correlation 0.31): predicting a waveform's phase sample by
sample from 110 frames/s is what a time-domain loss cannot teach quickly, and its minimum
under uncertainty is silence or noise. A magnitude per frame and bin is a well-posed
regression. Phase is then the mixture's during training (so the time-domain losses still
apply) and Griffin-Lim's when there is no mixture: evaluation, `decode(codes)`, generation.
So a codec's evaluation-mode forward equals encode -> decode exactly, and what validation
scores is what the codes give.

`model.output_head = 'spectrum'` selects it, with `model.skip_connections = False` (the head
never sees the mixture's spectrogram). STFT frames coincide with latent frames, as for the
mask head (rqvae_jax/mask_head.py: `stft`, `istft`, hop = the encoder's total stride).
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rqvae_jax.mask_head import (frame_trunk, hop_length, istft, latent_aligned_stft, stft,
                                 trunk_input)


def griffin_lim(magnitude, n_fft: int, hop: int, iterations: int, momentum: float = 0.99,
                seed: int = 0):
  """Waveforms (B, N) whose STFT magnitude approaches `magnitude` (B, T, F).

  The fast Griffin-Lim of Perraudin et al. (2013): alternate projections between the set of
  spectrograms with this magnitude and the set of consistent spectrograms (STFT of a
  signal), with momentum. Starts from a fixed random phase (deterministic: same magnitude,
  same waveform). A `lax.fori_loop`, so it jits to one loop whatever `iterations`.
  """
  magnitude = magnitude.astype(jnp.float32)
  phase = jax.random.uniform(jax.random.PRNGKey(seed), magnitude.shape, jnp.float32,
                             0.0, 2.0 * jnp.pi)
  angles = jnp.exp(1j * phase).astype(jnp.complex64)
  beta = momentum / (1.0 + momentum)

  def step(_, carry):
    angles, previous = carry
    rebuilt = stft(istft(magnitude * angles, n_fft, hop), n_fft, hop)
    accelerated = rebuilt - beta * previous
    angles = accelerated / (jnp.abs(accelerated) + 1e-16)
    return angles, rebuilt

  angles, _ = jax.lax.fori_loop(0, iterations, step, (angles, jnp.zeros_like(angles)))
  return istft(magnitude * angles, n_fft, hop)


class SpectrumDecoder(nn.Module):
  """Quantized latent (B, T, D) -> stems (B, T * hop, S) on the model's normalised scale.

  BiLSTM and dense over the latent frames (the mask head's trunk), then a dense to a
  log-magnitude for each stem and bin. With `mixture` (B, N) and `train`, the stems take the
  mixture's phase; otherwise Griffin-Lim's (`model.griffin_lim_iters`).
  """
  config: Any

  @nn.compact
  def __call__(self, z, mixture: Optional[jax.Array], train: bool):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    n_fft, hop = c.mask_fft, hop_length(c)
    bins = n_fft // 2 + 1
    x = frame_trunk(c, trunk_input(c, z, dtype), train, dtype)
    log_magnitude = nn.Dense(c.num_stems * bins, dtype=dtype, name='log_magnitude')(x)
    log_magnitude = log_magnitude.reshape(*x.shape[:2], c.num_stems, bins).astype(jnp.float32)
    # exp of a clipped value: a wild logit early in training cannot overflow the ISTFT.
    magnitude = jnp.exp(jnp.clip(log_magnitude, -30.0, 10.0))
    magnitude = jnp.moveaxis(magnitude, 2, 1)                           # (B, S, T, F)
    if train and mixture is not None:
      spec = latent_aligned_stft(mixture, z, n_fft, hop)
      phase = (spec / (jnp.abs(spec) + 1e-8))[:, None]                  # (B, 1, T, F)
      stems = istft((magnitude * phase).reshape(-1, *magnitude.shape[2:]), n_fft, hop)
    else:
      stems = griffin_lim(magnitude.reshape(-1, *magnitude.shape[2:]), n_fft, hop,
                          int(c.get('griffin_lim_iters', 32)))
    return jnp.moveaxis(stems.reshape(z.shape[0], c.num_stems, -1), 1, 2)
