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

from rqvae_jax import blocks
from rqvae_jax.lstm import BiLSTM
from rqvae_jax.mask_head import hop_length, istft, stft


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
    hidden = c.get('mask_hidden', 0) or c.channels[-1]
    x = z.astype(dtype)
    if hidden != z.shape[-1]:
      x = nn.Dense(hidden, dtype=dtype, name='latent_in')(x)
    x = BiLSTM(hidden, c.lstm_layers, c.dropout, c.lstm_impl, dtype, name='lstm')(x, train)
    x = nn.Dense(hidden, dtype=dtype, name='fc',
                 **blocks.dense_init(x.shape[-1], c.get('torch_init', False)))(x)
    x = nn.gelu(x)
    log_magnitude = nn.Dense(c.num_stems * bins, dtype=dtype, name='log_magnitude')(x)
    log_magnitude = log_magnitude.reshape(*x.shape[:2], c.num_stems, bins).astype(jnp.float32)
    # exp of a clipped value: a wild logit early in training cannot overflow the ISTFT.
    magnitude = jnp.exp(jnp.clip(log_magnitude, -30.0, 10.0))           # (B, T, S, F)
    magnitude = jnp.moveaxis(magnitude, 2, 1).reshape(-1, *magnitude.shape[1:2], bins)
    if train and mixture is not None:
      phase = stft(mixture.astype(jnp.float32), n_fft, hop)
      if phase.shape[1] != z.shape[1]:
        raise ValueError(f'{phase.shape[1]} STFT frames vs {z.shape[1]} latent frames: the '
                         'spectrum head needs a length the encoder maps to length / hop frames.')
      unit = phase / (jnp.abs(phase) + 1e-8)
      unit = jnp.repeat(unit[:, None], c.num_stems, axis=1).reshape(magnitude.shape)
      stems = istft(magnitude * unit, n_fft, hop)
    else:
      stems = griffin_lim(magnitude, n_fft, hop, int(c.get('griffin_lim_iters', 32)))
    return jnp.moveaxis(stems.reshape(z.shape[0], c.num_stems, -1), 1, 2)
