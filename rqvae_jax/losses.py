"""Training losses: multi-scale mel loss, time-domain MSE and the RVQ commitment term.

Audio is `(B, N, S)` float32 (batch, samples, stems) and already normalised by the caller.
The mel spectrogram reproduces `torchaudio.transforms.MelSpectrogram` (and librosa with
`htk=True, norm=None, pad_mode='reflect'`): power 2, periodic Hann window of `win_length`
zero-padded to the centre of `n_fft`, `center=True` with reflect padding of `n_fft // 2`.

Speed (this runs every training step on the CPU). Timings under jit on the 2-core dev CPU
(shared with other jobs, so +-20%), 16 signals of 88200 samples (B=2 target + estimate, S=4),
value and gradient, min of 7-12 runs:
  * only the `win_length` non-zero samples of each frame are framed and transformed; the
    zero-padding of the window only oversamples the spectrum;
  * when `3 * win_length < n_fft` (w = 64 and 128, where n_fft = 512) the rfft is taken on
    3 * win_length points, and the exact linear map from that power spectrum to the one on
    the n_fft grid (through the frame's autocorrelation, whose lags are < win_length; see
    `_spectrum_constants`) is folded into the mel filterbank. Value+grad of one scale's
    log-mel: w=64 0.39 s vs 0.86 s with the n_fft-point rfft, w=128 0.41 s vs 0.55 s.
    Accuracy against librosa in float64: relative error < 4e-6 on mel bins above 1e-3 of
    the maximum and < 1.3e-4 down to 1e-6 of it (n_fft-point rfft: 3e-6 and 1.6e-5). A hard
    lag cut at 2 * win_length points was no faster and 100x less accurate on quiet bins;
  * frames are one gather with a precomputed index array that also does the reflect
    padding. Run time is the same within noise as a jnp.pad + gather, or a jnp.pad + reshape
    into hop-sized blocks + concatenation of the win // hop shifted views (whole loss 1.04 s
    vs 1.03 s, 12 interleaved runs), but the jit compile of value+grad is about 2x faster
    (4.3-4.9 s vs 5.6-7.2 s gather, 9.7-10.4 s reshape, all 6 scales);
  * a DFT as a matrix product instead of the rfft: faster only at w=64 without folding
    (0.46 s vs 0.55 s), no faster than the rfft after folding, slower from w=128 up (1.2x
    at w=128 to 12x at w=2048).
Whole loss (6 scales, value+grad): min 0.79 s, median 1.26 s of 10 (the CPU was shared);
per scale 0.22, 0.27, 0.11, 0.05, 0.10, 0.08 s for w = 64 ... 2048. Without the folding:
min 1.06 s, median 1.77 s.
"""
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


# ----- mel spectrogram -----


@functools.lru_cache(maxsize=None)
def mel_filterbank(sample_rate: int, n_fft: int, num_mels: int) -> np.ndarray:
  """HTK mel triangles without normalisation, `(n_fft // 2 + 1, num_mels)` float32.

  Matches torchaudio's MelSpectrogram default (`mel_scale='htk'`, `norm=None`, f_min 0,
  f_max sr / 2). Cached: read-only, do not modify in place. The same float64 arithmetic as
  `librosa.filters.mel(htk=True, norm=None)` (tests/test_losses.py compares them), written
  out here because librosa was installed for this one call and brought numba, llvmlite and
  scikit-learn (~260 MB) with it.
  """
  hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
  edges = np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2.0), num_mels + 2)
  edges = 700.0 * (10.0 ** (edges / 2595.0) - 1.0)           # num_mels + 2 band edges, Hz
  freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
  width = np.diff(edges)
  ramps = np.subtract.outer(edges, freqs)
  fb = np.zeros((num_mels, n_fft // 2 + 1), np.float64)
  for i in range(num_mels):
    fb[i] = np.maximum(0, np.minimum(-ramps[i] / width[i], ramps[i + 2] / width[i + 1]))
  out = np.ascontiguousarray(fb.T, dtype=np.float32)
  out.setflags(write=False)
  return out


@functools.lru_cache(maxsize=None)
def _spectrum_constants(sample_rate: int, n_fft: int, win_length: int, num_mels: int):
  """(window, fft size actually used, matrix from its power spectrum to mel), all NumPy.

  The rfft is taken of the `win_length` windowed samples, zero-padded to `fft_size`. When
  `3 * win_length < n_fft`, fft_size = 3 * win_length and the power spectrum on the `n_fft`
  grid is obtained linearly from it: inverse rfft to the frame's autocorrelation (lags <
  win_length for real frames), a lag window, embedding in `n_fft` lags, rfft; that map is
  multiplied into the filterbank. The lag window is 1 below win_length (so the map is exact)
  and a raised cosine down to 0 at fft_size / 2: with a hard cut at fft_size = 2 * win_length
  the map's kernel decays like 1 / distance and float32 rounding of loud bins leaked into
  quiet ones (100x the error of the direct rfft on bins 1e-5 of the maximum; now ~1x-10x).
  """
  n = np.arange(win_length)
  window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)).astype(np.float32)
  fb = mel_filterbank(sample_rate, n_fft, num_mels).astype(np.float64)
  fft_size = 3 * win_length
  if fft_size >= n_fft:
    return window, n_fft, fb.astype(np.float32)
  num_bins = fft_size // 2 + 1
  # Circular autocorrelation (length fft_size) of each basis power spectrum.
  autocorr = np.fft.irfft(np.eye(num_bins), n=fft_size, axis=-1)
  lags = np.arange(fft_size)
  lags = np.where(lags > fft_size // 2, lags - fft_size, lags)
  dist = np.abs(lags) - (win_length - 1)
  width = fft_size // 2 - (win_length - 1)
  taper = 0.5 + 0.5 * np.cos(np.pi * np.minimum(dist / width, 1.0))
  lag_window = np.where(dist <= 0, 1.0, taper)
  keep = lag_window > 0
  embedded = np.zeros((num_bins, n_fft))
  embedded[:, lags[keep] % n_fft] = (autocorr * lag_window)[:, keep]
  to_full = np.fft.rfft(embedded, axis=-1).real           # (num_bins, n_fft // 2 + 1)
  return window, fft_size, (to_full @ fb).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _frame_index(num_samples: int, n_fft: int, win_length: int, hop_length: int) -> np.ndarray:
  """Sample index of each frame's non-zero part, reflect padding included: (T, win_length).

  torch.stft(center=True) pads n_fft // 2 samples by reflection and takes frames of n_fft
  every hop_length; the centred window is non-zero on [left, left + win_length) of a frame.
  """
  pad = n_fft // 2
  if num_samples <= pad:
    raise ValueError(f'Reflect padding needs more than n_fft // 2 = {pad} samples, '
                     f'got {num_samples}.')
  num_frames = 1 + (num_samples + 2 * pad - n_fft) // hop_length
  left = (n_fft - win_length) // 2
  index = (left - pad + hop_length * np.arange(num_frames)[:, None]
           + np.arange(win_length)[None, :])
  index = np.abs(index)                                        # reflect at the start
  index = np.where(index > num_samples - 1, 2 * (num_samples - 1) - index, index)  # and end
  index = index.astype(np.int32)
  index.setflags(write=False)
  return index


def _frames(x: jnp.ndarray, n_fft: int, win_length: int, hop_length: int) -> jnp.ndarray:
  """(..., N) -> (..., T, win_length): the windowed part of torch.stft's frames, one gather."""
  return x[..., _frame_index(x.shape[-1], n_fft, win_length, hop_length)]


# Windows up to this length take their spectrum as one matmul with a DFT matrix instead of
# an rfft: many short frames (w=64: 5513 per 4 s signal) at the odd FFT size 192 are slow in
# XLA's CPU FFT, and the matmul also drops the zero padding to 192 and the window product.
# Measured on the 2-core AMD EPYC (AVX2), the w=64 scale of the paper loss, forward and
# gradient, batch 2 x 4 stems: 261 -> 181 ms and 268 -> 192 ms; w=128 was slower as a
# matmul (204 -> 226 ms), and with target and estimate in separate calls a limit of 128
# was no faster for the whole loss (median 494-548 against 507-513 ms; 256: 543-569), so
# longer windows stay FFTs. README: Performance.
MAX_DFT_WINDOW = 64


@functools.lru_cache(maxsize=None)
def _dft_matrix(sample_rate: int, n_fft: int, win_length: int, num_mels: int) -> np.ndarray:
  """(win, 2 * bins): the windowed rfft that `_spectrum_constants` asks for (a win-sample
  frame zero-padded to its fft size) as a real matrix, [real parts | imaginary parts]."""
  window, fft_size, _ = _spectrum_constants(sample_rate, n_fft, win_length, num_mels)
  n = np.arange(win_length)[:, None]
  k = np.arange(fft_size // 2 + 1)[None, :]
  angle = 2.0 * np.pi * ((n * k) % fft_size) / fft_size          # float64, exact phase
  out = (np.concatenate([np.cos(angle), -np.sin(angle)], axis=1)
         * window[:, None].astype(np.float64)).astype(np.float32)
  out.setflags(write=False)
  return out


def _mel_frames(x, *, sample_rate: int, n_fft: int, win_length: int, hop_length: int,
                num_mels: int) -> jnp.ndarray:
  """Power mel spectrogram with frames before mel bins: (..., N) -> (..., T, num_mels)."""
  if win_length > n_fft:
    raise ValueError(f'win_length {win_length} > n_fft {n_fft}.')
  window, fft_size, to_mel = _spectrum_constants(int(sample_rate), int(n_fft),
                                                 int(win_length), int(num_mels))
  frames = _frames(jnp.asarray(x, jnp.float32), int(n_fft), int(win_length), int(hop_length))
  if win_length <= MAX_DFT_WINDOW:
    dft = _dft_matrix(int(sample_rate), int(n_fft), int(win_length), int(num_mels))
    spec = jnp.matmul(frames, dft, precision=jax.lax.Precision.HIGHEST)
    real, imag = jnp.split(spec, 2, axis=-1)
  else:
    spec = jnp.fft.rfft(frames * window, n=fft_size, axis=-1)
    real, imag = spec.real, spec.imag
  power = jnp.square(real) + jnp.square(imag)
  # HIGHEST: no TF32/bf16 passes on accelerators (the folded matrix has mixed signs).
  mel = jnp.matmul(power, to_mel, precision=jax.lax.Precision.HIGHEST)
  # Mixed signs: float32 rounding can leave tiny negative values on empty bins.
  return jnp.maximum(mel, 0.0) if fft_size != n_fft else mel


def mel_spectrogram(x, *, sample_rate: int, n_fft: int, win_length: int, hop_length: int,
                    num_mels: int) -> jnp.ndarray:
  """Power mel spectrogram as torchaudio computes it: (..., N) -> (..., num_mels, frames)."""
  mel = _mel_frames(x, sample_rate=sample_rate, n_fft=n_fft, win_length=win_length,
                    hop_length=hop_length, num_mels=num_mels)
  return jnp.swapaxes(mel, -1, -2)


# ----- losses -----


def _safe_norm(x: jnp.ndarray, axis: int) -> jnp.ndarray:
  """L2 norm whose gradient is 0 (not NaN) where the norm is 0."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def multiscale_mel_loss(target, estimate, loss_config, sample_rate: int) -> jnp.ndarray:
  """Sum over stems and window sizes of (mel L1 + alpha * log-mel L2), as the original sums it.

  For w = 2**p, p in loss_config.mel_window_powers: n_fft = max(mel_min_n_fft, w),
  hop = w // 4. Each term is a mean over (batch, frames) of a sum (L1) or an L2 norm over
  mel bins; the log has an epsilon (the original has none and is NaN on silent stems).
  alpha is `loss_config.mel_log_weight`: the paper's "alpha = 1" weighs the log term inside
  this spectral loss (Gritsenko et al.), it is not the weight of the mel loss in the total
  (`mel_weight`). A config without the field (an older workdir) gets 1, what it trained with.
  target, estimate: (B, N, S).
  """
  target = jnp.asarray(target, jnp.float32)
  estimate = jnp.asarray(estimate, jnp.float32)
  # Target and estimate in separate spectrogram calls, all stems in each: (B, S, N). One
  # call on their concatenation ran the gradient's inverse transforms over the target half
  # too (zeros): the paper's mel loss, forward and gradient, batch 2, took 750-800 ms that
  # way and 445-530 ms this way (AMD EPYC AVX2, three interleaved pairs).
  target, estimate = jnp.swapaxes(target, -1, -2), jnp.swapaxes(estimate, -1, -2)
  eps = loss_config.log_epsilon
  log_weight = getattr(loss_config, 'mel_log_weight', 1.0)
  total = jnp.zeros((), jnp.float32)
  for p in loss_config.mel_window_powers:
    win = 2 ** int(p)
    n_fft = max(int(loss_config.mel_min_n_fft), win)
    mel_t, mel_e = (_mel_frames(x, sample_rate=sample_rate, n_fft=n_fft, win_length=win,
                                hop_length=win // 4, num_mels=int(loss_config.num_mels))
                    for x in (target, estimate))                  # (B, S, T, M)
    l1 = jnp.sum(jnp.abs(mel_t - mel_e), axis=-1)                  # (B, S, T)
    l2 = _safe_norm(jnp.log(mel_t + eps) - jnp.log(mel_e + eps), axis=-1)
    # Mean over (batch, frames) per stem, summed over stems.
    total = total + jnp.sum(jnp.mean(l1 + log_weight * l2, axis=(0, 2)))
  return total


def time_mse(target, estimate) -> jnp.ndarray:
  """Mean squared error over all samples and stems."""
  diff = jnp.asarray(target, jnp.float32) - jnp.asarray(estimate, jnp.float32)
  return jnp.mean(jnp.square(diff))


def commitment_loss(quant_aux: Mapping[str, Any], loss_config) -> jnp.ndarray:
  """Weighted sum of the quantizer's codebook, encoder and cumulative terms."""
  return (loss_config.codebook_term * quant_aux['codebook_loss']
          + loss_config.encoder_term * quant_aux['encoder_loss']
          + loss_config.cumulative_term * quant_aux['cumulative_loss'])


def gaussian_kl(mean, logvar, form: str = 'standard') -> jnp.ndarray:
  """KL(N(mean, exp(logvar)) || N(0, I)) of a Gaussian latent (B, T, D), as a loss.

  Per frame, 0.5 * sum_d (mean^2 + exp(logvar) - 1 - logvar). 'standard': its mean over the
  frames; 'sqrt': the original VAE's sqrt(-0.5 * mean_b sum_{t,d}(1 + logvar - mean^2 -
  exp(logvar))), i.e. the square root of the batch mean of the KL summed over frames and dims.
  """
  mean = jnp.asarray(mean, jnp.float32)
  logvar = jnp.asarray(logvar, jnp.float32)
  per_dim = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  if form == 'standard':
    return jnp.mean(jnp.sum(per_dim, axis=-1))
  if form == 'sqrt':
    return jnp.sqrt(jnp.mean(jnp.sum(per_dim.reshape(per_dim.shape[0], -1), axis=-1)))
  raise ValueError(f"loss.kl_form must be 'standard' or 'sqrt', got {form!r}.")


def total_loss(target, estimate, quant_aux: Mapping[str, Any], loss_config,
               sample_rate: int) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """mel_weight * mel + time_weight * time + commitment_weight * commitment, and its parts.

  The parts dict holds the unweighted terms (float32 scalars) for logging. A zero mel_weight
  skips the mel spectrograms altogether (they are the costliest part of the loss). With a
  Gaussian bottleneck (its aux holds 'mean' and 'logvar', no codes) the commitment parts are
  0 and kl_weight * kl is added (part 'kl').
  """
  if 'mean' in quant_aux:
    zero = jnp.zeros((), jnp.float32)
    kl = gaussian_kl(quant_aux['mean'], quant_aux['logvar'], loss_config.get('kl_form',
                                                                             'standard'))
    quant_aux = {'codebook_loss': zero, 'encoder_loss': zero, 'cumulative_loss': zero}
    total, parts = total_loss(target, estimate, quant_aux, loss_config, sample_rate)
    total = total + loss_config.get('kl_weight', 0.0) * kl
    return total, {**parts, 'total': total, 'kl': jnp.asarray(kl, jnp.float32)}
  skip_mel = isinstance(loss_config.mel_weight, (int, float)) and loss_config.mel_weight == 0
  if not skip_mel:
    mel = multiscale_mel_loss(target, estimate, loss_config, sample_rate)
  else:
    mel = jnp.zeros((), jnp.float32)
  time = time_mse(target, estimate)
  commitment = commitment_loss(quant_aux, loss_config)
  total = (loss_config.mel_weight * mel + loss_config.time_weight * time
           + loss_config.commitment_weight * commitment)
  parts = {
      'total': total,
      'mel': mel,
      'time': time,
      'commitment': commitment,
      'codebook': quant_aux['codebook_loss'],
      'encoder': quant_aux['encoder_loss'],
      'cumulative': quant_aux['cumulative_loss'],
  }
  parts = {k: jnp.asarray(v, jnp.float32) for k, v in parts.items()}
  return parts['total'], parts


def sisdr_loss(target, estimate, silence_threshold: float) -> jnp.ndarray:
  """-SI-SDR (dB) averaged over the stems whose reference is not silent (raw scale audio).

  Not in the paper: an optional term (`loss.sisdr_weight`) that optimises the evaluation
  metric directly; silent references are left to the time MSE (their SI-SDR is degenerate).
  """
  from rqvae_jax import metrics  # pylint: disable=g-import-not-at-top
  values = metrics.si_sdr(target, estimate)
  active = metrics.active_stem_mask(target, silence_threshold).astype(jnp.float32)
  return -jnp.sum(values * active) / jnp.maximum(jnp.sum(active), 1.0)


def multiresolution_stft_loss(target, estimate, window_powers, log_floor: float = 1e-3
                              ) -> jnp.ndarray:
  """Spectral convergence + log-magnitude L1 at several resolutions, summed over them.

  The multi-resolution STFT loss of Yamamoto et al. (2020), on magnitudes scaled by
  1 / sqrt(win) so that `log_floor` is a level in the signal's own units (normalised-scale
  RMS; 1e-3 is about 57 dB below a typical stem). Not in the paper: the time MSE alone lets
  every estimate keep a broadband floor of the mixture (a bass estimate with energy at
  10 kHz costs almost nothing in MSE), and the log-magnitude term charges each empty band.
  Per window w = 2**p: Hann window of w samples, hop w // 4, centred frames with reflect
  padding. Spectral convergence is ||S - S_hat||_F / ||S||_F per stem over the batch (a stem
  silent in the whole batch is left to the log term), averaged over stems.
  target, estimate: (B, N, S) on the normalised scale.
  """
  target = jnp.asarray(target, jnp.float32)
  estimate = jnp.asarray(estimate, jnp.float32)
  # Separate calls for target and estimate, as in multiscale_mel_loss (no gradient
  # transforms over the target).
  target, estimate = jnp.swapaxes(target, -1, -2), jnp.swapaxes(estimate, -1, -2)  # (B, S, N)
  total = jnp.zeros((), jnp.float32)
  for p in window_powers:
    win = 2 ** int(p)
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(win) / win)).astype(np.float32)

    def magnitude(x):
      spec = jnp.fft.rfft(_frames(x, win, win, win // 4) * window, axis=-1)
      return jnp.sqrt(jnp.square(spec.real) + jnp.square(spec.imag) + 1e-12) / np.sqrt(win)

    mag_t, mag_e = magnitude(target), magnitude(estimate)                   # (B, S, T, F)
    diff = jnp.sum(jnp.square(mag_t - mag_e), axis=(0, 2, 3))
    ref = jnp.sum(jnp.square(mag_t), axis=(0, 2, 3))
    present = ref > 1e-6 * jnp.max(ref)
    sc = jnp.sqrt(diff / jnp.where(present, ref, 1.0))
    sc = jnp.sum(jnp.where(present, sc, 0.0)) / jnp.maximum(jnp.sum(present), 1)
    log_mag = jnp.mean(jnp.abs(jnp.log(mag_t + log_floor) - jnp.log(mag_e + log_floor)))
    total = total + sc + log_mag
  return total
