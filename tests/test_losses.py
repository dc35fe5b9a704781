"""Tests of rqvae_jax.losses: mel spectrogram against librosa, loss values, weights, gradients."""
import functools
import types

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from configs.rqvae import get_config
from rqvae_jax import losses

SR = 22050
NUM_MELS = 64


def _htk_mel_filterbank(sr, n_fft, num_mels):
  """Independent HTK triangles (no normalisation), (n_fft // 2 + 1, num_mels), float64."""
  hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
  mel_to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
  edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2.0), num_mels + 2))
  freqs = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
  fb = np.zeros((n_fft // 2 + 1, num_mels))
  for j in range(num_mels):
    lo, mid, hi = edges[j], edges[j + 1], edges[j + 2]
    rising = (freqs - lo) / (mid - lo)
    falling = (hi - freqs) / (hi - mid)
    fb[:, j] = np.maximum(0.0, np.minimum(rising, falling))
  return fb


def _audio(shape, seed=0):
  """Noise with a few sinusoids and a decay, so that spectra have structure and dynamics."""
  rng = np.random.default_rng(seed)
  n = shape[-1]
  t = np.arange(n) / SR
  x = 0.1 * rng.standard_normal(shape)
  for f in (55.0, 440.0, 3000.0):
    x = x + np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi, shape[:-1] + (1,)))
  return (x * np.exp(-2.0 * t)).astype(np.float32)


def _small_loss_config(variant='smoke'):
  """Three of the six scales (folded rfft, n_fft > win, n_fft == win): faster to compile."""
  cfg = get_config(variant).loss
  cfg.mel_window_powers = (6, 8, 11)
  return cfg


def _aux(codebook=0.3, encoder=0.2, cumulative=0.1):
  return {'codebook_loss': jnp.float32(codebook), 'encoder_loss': jnp.float32(encoder),
          'cumulative_loss': jnp.float32(cumulative)}


@pytest.mark.parametrize('n_fft', [512, 1024, 2048])
def test_mel_filterbank_matches_htk_formula(n_fft):
  fb = losses.mel_filterbank(SR, n_fft, NUM_MELS)
  assert fb.shape == (n_fft // 2 + 1, NUM_MELS) and fb.dtype == np.float32
  np.testing.assert_allclose(fb, _htk_mel_filterbank(SR, n_fft, NUM_MELS), atol=1e-6)


def _librosa_mel(x, n_fft, win, hop, num_mels=NUM_MELS):
  """The reference: float64 librosa with torchaudio's settings (pad_mode is not the default)."""
  return librosa.feature.melspectrogram(
      y=np.asarray(x, np.float64), sr=SR, n_fft=n_fft, hop_length=hop, win_length=win,
      window='hann', center=True, pad_mode='reflect', power=2.0, n_mels=num_mels, htk=True,
      norm=None)


def _our_mel(x, n_fft, win, hop):
  # jit: one compile instead of one per op, much faster for tests.
  fn = jax.jit(functools.partial(losses.mel_spectrogram, sample_rate=SR, n_fft=n_fft,
                                 win_length=win, hop_length=hop, num_mels=NUM_MELS))
  return np.asarray(fn(jnp.asarray(x)), np.float64)


@pytest.mark.parametrize('win', [64, 128, 256, 512, 2048])
def test_mel_spectrogram_matches_librosa(win):
  n_fft, hop = max(512, win), win // 4
  x = _audio((2, 6000), seed=win)
  ours, ref = _our_mel(x, n_fft, win, hop), _librosa_mel(x, n_fft, win, hop)
  assert ours.shape == ref.shape == (2, NUM_MELS, 1 + 6000 // hop)
  scale = np.abs(ref).max()
  assert np.abs(ours - ref).max() / scale < 1e-4
  rel = np.abs(ours - ref) / np.maximum(ref, 1e-30)
  big = ref > 1e-3 * scale
  assert np.mean(big) > 0.1
  assert rel[big].max() < 1e-4
  # Quiet bins (float32 rounding dominates; the folded small windows are ~10x the rfft's).
  assert rel[ref > 1e-6 * scale].max() < 1e-3


def test_folded_small_window_gradient_matches_direct_rfft():
  """w=64 uses a 192-point rfft folded into the filterbank; value and gradient are unchanged."""
  n_fft, win, hop = 512, 64, 16
  x = jnp.asarray(_audio((2, 2000), seed=2))
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
  full_window = np.zeros(n_fft, np.float32)
  full_window[(n_fft - win) // 2:(n_fft + win) // 2] = window
  fb = jnp.asarray(losses.mel_filterbank(SR, n_fft, NUM_MELS))

  def direct(x):                                  # torch.stft semantics, written plainly
    xp = jnp.pad(x, [(0, 0), (n_fft // 2, n_fft // 2)], mode='reflect')
    idx = hop * np.arange(1 + x.shape[-1] // hop)[:, None] + np.arange(n_fft)[None, :]
    spec = jnp.fft.rfft(xp[..., idx] * full_window, axis=-1)
    return jnp.log(jnp.abs(spec) ** 2 @ fb + 1e-5).sum()

  def ours(x):
    mel = losses.mel_spectrogram(x, sample_rate=SR, n_fft=n_fft, win_length=win,
                                 hop_length=hop, num_mels=NUM_MELS)
    return jnp.log(mel + 1e-5).sum()

  v1, g1 = jax.jit(jax.value_and_grad(direct))(x)
  v2, g2 = jax.jit(jax.value_and_grad(ours))(x)
  np.testing.assert_allclose(float(v2), float(v1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g2), np.asarray(g1),
                             atol=1e-4 * float(jnp.max(jnp.abs(g1))))


def test_short_windows_take_their_spectrum_as_a_dft_matmul_equal_to_numpys_rfft():
  """w <= MAX_DFT_WINDOW: frames @ _dft_matrix is the windowed, zero-padded rfft."""
  win = losses.MAX_DFT_WINDOW
  window, fft_size, _ = losses._spectrum_constants(SR, 512, win, NUM_MELS)
  dft = losses._dft_matrix(SR, 512, win, NUM_MELS)
  bins = fft_size // 2 + 1
  assert dft.shape == (win, 2 * bins) and dft.dtype == np.float32
  frames = _audio((50, win), seed=5).astype(np.float64)
  ref = np.fft.rfft(frames * window, n=fft_size, axis=-1)
  ours = frames @ dft.astype(np.float64)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(ours[:, :bins], ref.real, atol=1e-6 * scale)
  np.testing.assert_allclose(ours[:, bins:], ref.imag, atol=1e-6 * scale)


def test_mel_spectrogram_hop_not_dividing_window():
  x = _audio((1, 3000), seed=1)
  ours, ref = _our_mel(x, 512, 400, 160), _librosa_mel(x, 512, 400, 160)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def _reference_mel_parts(cfg, target, estimate):
  """(mel L1 part, log-mel L2 part) of the multi-scale loss from librosa, each summed over
  stems and scales. target, estimate: (B, N, S)."""
  l1_total = l2_total = 0.0
  for p in cfg.mel_window_powers:
    w = 2 ** p
    mel = lambda a: _librosa_mel(a.transpose(0, 2, 1), max(512, w), w, w // 4,
                                 cfg.num_mels)                     # (B, S, M, T)
    mt, me = mel(target), mel(estimate)
    l1_total += np.abs(mt - me).sum(axis=2).mean(axis=(0, 2)).sum()
    l2_total += np.sqrt(((np.log(mt + cfg.log_epsilon) - np.log(me + cfg.log_epsilon)) ** 2)
                        .sum(axis=2)).mean(axis=(0, 2)).sum()
  return l1_total, l2_total


def _mel_pair(seed=3, scale=1.0):
  target = scale * _audio((2, 4, 3000), seed=seed).transpose(0, 2, 1)     # (B, N, S)
  estimate = 0.7 * target + 0.05 * scale * _audio((2, 4, 3000), seed=seed + 1).transpose(0, 2, 1)
  return target, estimate


def test_mel_loss_matches_numpy_reference():
  """The loss formula itself, on top of librosa spectrograms."""
  cfg = get_config('smoke').loss
  cfg.mel_window_powers = (6, 7, 10)
  target, estimate = _mel_pair()
  expected = sum(_reference_mel_parts(cfg, target, estimate))
  got = jax.jit(lambda t, e: losses.multiscale_mel_loss(t, e, cfg, SR))(target, estimate)
  np.testing.assert_allclose(float(got), expected, rtol=1e-4)


def test_mel_log_weight_scales_only_the_log_term():
  """mel_log_weight is the paper's alpha: the weight of the log-mel L2 term inside the loss."""
  base = get_config('paper').loss
  assert base.mel_log_weight == 1.0 and base.mel_weight == 1e-6
  base.mel_window_powers = (6, 7, 10)
  # Quiet audio: the L1 part scales with power, the log part does not; at 1/100 of the
  # amplitude the two are of one size, so a wrong weighting shows at rtol 1e-4.
  target, estimate = _mel_pair(scale=0.01)
  l1, l2 = _reference_mel_parts(base, target, estimate)
  assert 0.1 < l2 / l1 < 10, (l1, l2)

  @jax.jit
  def mel(log_weight):
    cfg = types.SimpleNamespace(**base.to_dict())
    cfg.mel_log_weight = log_weight                # traced: one compile for every weight
    return losses.multiscale_mel_loss(target, estimate, cfg, SR)

  np.testing.assert_allclose(float(mel(0.0)), l1, rtol=1e-4)
  np.testing.assert_allclose(float(mel(1.0)), l1 + l2, rtol=1e-4)
  np.testing.assert_allclose(float(mel(2.0)), l1 + 2.0 * l2, rtol=1e-4)
  np.testing.assert_allclose(float(mel(2.0)) - float(mel(0.0)), 2.0 * l2, rtol=1e-3)


def test_time_mse_matches_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((2, 2, 500, 4)).astype(np.float32)
  np.testing.assert_allclose(float(losses.time_mse(a, b)), np.mean((a.astype(np.float64) - b) ** 2),
                             rtol=1e-5)


def test_commitment_loss_weights():
  cfg = get_config().loss
  cfg.codebook_term, cfg.encoder_term, cfg.cumulative_term = 0.75, 2.0, 3.0
  got = float(losses.commitment_loss(_aux(1.0, 10.0, 100.0), cfg))
  np.testing.assert_allclose(got, 0.75 + 20.0 + 300.0, rtol=1e-6)


def test_total_loss_parts_and_weights():
  base = _small_loss_config()
  target = jnp.asarray(_audio((2, 4, 2500), seed=5).transpose(0, 2, 1))
  estimate = 0.5 * target

  @jax.jit
  def run(weights):
    # total_loss only reads attributes: traced weights give one compile for all cases.
    cfg = types.SimpleNamespace(**base.to_dict())
    cfg.mel_weight, cfg.time_weight, cfg.commitment_weight = weights
    return losses.total_loss(target, estimate, _aux(), cfg, SR)

  weights = np.array([base.mel_weight, base.time_weight, base.commitment_weight], np.float32)
  total, parts = run(weights)
  assert set(parts) == {'total', 'mel', 'time', 'commitment', 'codebook', 'encoder',
                        'cumulative'}
  assert all(v.shape == () and v.dtype == jnp.float32 for v in parts.values())
  assert float(total) == float(parts['total'])
  np.testing.assert_allclose(float(parts['commitment']), 0.75 * 0.3 + 1.0 * 0.2 + 1.0 * 0.1,
                             rtol=1e-6)
  np.testing.assert_allclose([float(parts[k]) for k in ('codebook', 'encoder', 'cumulative')],
                             [0.3, 0.2, 0.1], rtol=1e-6)
  names = ('mel', 'time', 'commitment')
  unweighted = np.array([float(parts[k]) for k in names])
  assert np.all(unweighted > 0)
  np.testing.assert_allclose(float(total), weights @ unweighted, rtol=1e-6)
  # Doubling a weight doubles that part's contribution and leaves the parts unchanged;
  # also the original code's weights (mel 1e-6).
  for new in (*(weights * np.where(np.arange(3) == i, 2.0, 1.0) for i in range(3)),
              np.array([1e-6, 1.0, 1.0])):
    total2, parts2 = run(new.astype(np.float32))
    np.testing.assert_allclose([float(parts2[k]) for k in names], unweighted, rtol=1e-6)
    np.testing.assert_allclose(float(total2), new.astype(np.float32) @ unweighted, rtol=1e-6)


def test_loss_zero_for_identical_inputs():
  cfg = _small_loss_config()
  x = jnp.asarray(_audio((2, 4, 2500), seed=6).transpose(0, 2, 1))
  _, parts = jax.jit(lambda x: losses.total_loss(x, x, _aux(0.0, 0.0, 0.0), cfg, SR))(x)
  assert float(parts['mel']) == 0.0
  assert float(parts['time']) == 0.0
  assert float(parts['total']) == 0.0


def test_loss_and_gradient_finite_with_silent_stem():
  cfg = get_config().loss
  target = np.array(_audio((2, 4, 3000), seed=7).transpose(0, 2, 1))
  target[..., 1] = 0.0                                 # silent drums in the target ...
  estimate = 0.8 * target + 0.01
  estimate[..., 1] = 0.0                               # ... and in the estimate
  estimate[0, :, 3] = 0.0                              # a stem silent only in the estimate

  def f(est, tgt):
    return losses.total_loss(tgt, est, _aux(), cfg, SR)[0]

  value_and_grad = jax.jit(jax.value_and_grad(f))      # all six scales, compiled once
  value, grad = value_and_grad(jnp.asarray(estimate), jnp.asarray(target))
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(np.asarray(grad)))
  # Identical silent inputs: zero mel and time parts, a finite (zero-norm safe) gradient.
  zeros = jnp.zeros(target.shape)
  value, grad = value_and_grad(zeros, zeros)
  commitment = cfg.codebook_term * 0.3 + cfg.encoder_term * 0.2 + cfg.cumulative_term * 0.1
  assert float(value) == pytest.approx(cfg.commitment_weight * commitment)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_mel_loss_has_useful_gradient():
  """A descent step on the estimate reduces the mel loss (the gradient is not garbage)."""
  cfg = _small_loss_config()
  target = jnp.asarray(_audio((1, 4, 3000), seed=8).transpose(0, 2, 1))
  estimate = 0.5 * target
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda e: losses.multiscale_mel_loss(target, e, cfg, SR)))
  value, grad = value_and_grad(estimate)
  assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.max(jnp.abs(grad))) > 0
  step = 1e-3 / jnp.max(jnp.abs(grad))
  assert float(value_and_grad(estimate - step * grad)[0]) < float(value)


def test_sisdr_loss_matches_metric_and_ignores_silent_references():
  from rqvae_jax import metrics
  rng = np.random.default_rng(3)
  target = rng.normal(size=(2, 1000, 4)).astype(np.float32)
  target[0, :, 2] = 0.0                       # a silent reference stem
  estimate = target + 0.3 * rng.normal(size=target.shape).astype(np.float32)
  expected = np.asarray(metrics.si_sdr(target, estimate))
  mask = np.ones((2, 4), bool)
  mask[0, 2] = False
  got = float(losses.sisdr_loss(target, estimate, 1.5e-5))
  np.testing.assert_allclose(got, -expected[mask].mean(), rtol=1e-5)
  grad = jax.grad(lambda e: losses.sisdr_loss(target, e, 1.5e-5))(estimate)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[0, :, 2] == 0)


def _numpy_stft_loss(target, estimate, powers, floor):
  """Reference: librosa's STFT (periodic Hann, centred, reflect padding) of every stem."""
  total = 0.0
  for p in powers:
    win = 2 ** p
    mag = lambda x: np.abs(librosa.stft(x, n_fft=win, hop_length=win // 4, window='hann',
                                        center=True, pad_mode='reflect')) / np.sqrt(win)
    t = np.stack([[mag(target[b, :, s]) for s in range(target.shape[2])]
                  for b in range(target.shape[0])])            # (B, S, F, T)
    e = np.stack([[mag(estimate[b, :, s]) for s in range(target.shape[2])]
                  for b in range(target.shape[0])])
    sc = [np.sqrt(np.sum((t[:, s] - e[:, s]) ** 2) / np.sum(t[:, s] ** 2))
          for s in range(t.shape[1])]
    total += np.mean(sc) + np.mean(np.abs(np.log(t + floor) - np.log(e + floor)))
  return total


def test_stft_loss_matches_librosa_reference():
  rng = np.random.default_rng(0)
  target = rng.normal(size=(2, 4096, 3)).astype(np.float32)
  estimate = (0.7 * target + 0.3 * rng.normal(size=target.shape)).astype(np.float32)
  got = float(losses.multiresolution_stft_loss(target, estimate, (6, 8), 1e-3))
  want = _numpy_stft_loss(target.astype(np.float64), estimate.astype(np.float64), (6, 8), 1e-3)
  assert got == pytest.approx(want, rel=1e-4)
  assert float(losses.multiresolution_stft_loss(target, target, (6, 8), 1e-3)) == pytest.approx(
      0.0, abs=1e-5)


def test_stft_loss_charges_a_noise_floor_in_an_empty_band():
  """A low tone's estimate with a quiet broadband floor (-40 dB: ~0.01 % of MSE) costs far
  more in the STFT loss than the same floor costs in the time MSE."""
  t = np.arange(8192) / 22050
  tone = np.sin(2 * np.pi * 80 * t)[None, :, None].astype(np.float32)
  noisy = tone + 0.01 * np.random.default_rng(1).normal(size=tone.shape).astype(np.float32)
  stft = float(losses.multiresolution_stft_loss(tone, noisy, (8, 10), 1e-3))
  mse = float(losses.time_mse(tone, noisy))
  assert mse < 2e-4 and stft > 1.0


def test_stft_loss_silent_stem_is_finite_with_gradient():
  rng = np.random.default_rng(2)
  target = rng.normal(size=(2, 2048, 2)).astype(np.float32)
  target[..., 1] = 0.0                                          # silent in the whole batch
  estimate = jnp.asarray(rng.normal(size=target.shape), jnp.float32)
  value, grad = jax.value_and_grad(
      lambda e: losses.multiresolution_stft_loss(target, e, (6, 8), 1e-3))(estimate)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  # The silent stem's estimate is still pushed towards silence by the log term.
  assert float(jnp.sum(jnp.abs(grad[..., 1]))) > 0
