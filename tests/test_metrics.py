"""Tests of rqvae_jax.metrics: SI-SDR(i) against NumPy, silence rules, codebook statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.rqvae import get_config
from rqvae_jax import metrics


def _np_sisnr(est, ref, eps=1e-8):
  """MSDM's sisnr, float64, for 1-D signals."""
  est, ref = np.asarray(est, np.float64), np.asarray(ref, np.float64)
  a = (np.dot(est, ref) + eps) / (np.dot(ref, ref) + eps)
  t = a * ref
  return 10 * np.log10((np.dot(t, t) + eps) / (np.dot(t - est, t - est) + eps))


def _signals(seed=0, batch=3, n=4000, stems=4):
  rng = np.random.default_rng(seed)
  ref = rng.standard_normal((batch, n, stems)).astype(np.float32)
  est = (0.8 * ref + 0.3 * rng.standard_normal(ref.shape)).astype(np.float32)
  return ref, est


def test_si_sdr_matches_numpy():
  ref, est = _signals()
  got = np.asarray(jax.jit(metrics.si_sdr)(ref, est))
  assert got.shape == (3, 4)
  want = np.array([[_np_sisnr(est[b, :, s], ref[b, :, s]) for s in range(4)]
                   for b in range(3)])
  np.testing.assert_allclose(got, want, atol=1e-3)


def test_leakage_matches_cosines():
  t = np.arange(4000) / 4000.0
  refs = np.stack([np.sin(2 * np.pi * f * t) for f in (5.0, 11.0, 23.0)], -1)  # orthogonal
  est = np.stack([refs[:, 0] + 0.5 * refs[:, 1], 3.0 * refs[:, 1], np.zeros_like(t)], -1)
  got = np.asarray(metrics.leakage(refs[None], est[None]))[0]
  want = np.array([[1 / 1.25, 0.25 / 1.25, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(got, want, atol=1e-5)
  rng = np.random.default_rng(0)
  r, e = rng.normal(size=(2, 300, 4)), rng.normal(size=(2, 300, 4))
  cos2 = np.einsum('bni,bnj->bij', e, r) ** 2 / (
      np.sum(e ** 2, 1)[:, :, None] * np.sum(r ** 2, 1)[:, None, :])
  np.testing.assert_allclose(metrics.leakage(r, e), cos2, rtol=1e-4, atol=1e-7)


def test_si_sdr_improvement_matches_numpy():
  ref, est = _signals(seed=1)
  mix = ref.sum(axis=-1)
  got = np.asarray(jax.jit(metrics.si_sdr_improvement)(ref, est, mix))
  want = np.array([[_np_sisnr(est[b, :, s], ref[b, :, s]) - _np_sisnr(mix[b], ref[b, :, s])
                    for s in range(4)] for b in range(3)])
  np.testing.assert_allclose(got, want, atol=1e-3)
  # The mixture scores about -10 log10(3) dB for four equal stems; improvement is positive.
  assert np.all(got > 0)


def test_si_sdr_extra_leading_axes():
  ref, est = _signals(seed=2, batch=6)
  got = metrics.si_sdr(ref.reshape(2, 3, -1, 4), est.reshape(2, 3, -1, 4))
  np.testing.assert_allclose(np.asarray(got).reshape(6, 4), metrics.si_sdr(ref, est),
                             rtol=1e-6)


@pytest.mark.parametrize('scale', [0.01, 3.0, -2.0])
def test_si_sdr_scale_invariant(scale):
  ref, est = _signals(seed=3)
  np.testing.assert_allclose(metrics.si_sdr(ref, scale * est), metrics.si_sdr(ref, est),
                             atol=1e-3)


def test_si_sdr_perfect_estimate_is_high():
  ref, _ = _signals(seed=4)
  assert np.all(np.asarray(metrics.si_sdr(ref, ref)) > 60)


def test_si_sdr_silent_reference_or_estimate_is_finite():
  ref, est = _signals(seed=5)
  ref[0, :, 1] = 0.0                              # silent reference
  est[1, :, 2] = 0.0                              # silent estimate
  ref[2, :, 3] = 0.0                              # both silent
  est[2, :, 3] = 0.0
  mix = ref.sum(axis=-1)
  sdr = np.asarray(metrics.si_sdr(ref, est))
  sdri = np.asarray(metrics.si_sdr_improvement(ref, est, mix))
  assert np.all(np.isfinite(sdr)) and np.all(np.isfinite(sdri))
  for b, s in ((0, 1), (1, 2), (2, 3)):
    np.testing.assert_allclose(sdr[b, s], _np_sisnr(est[b, :, s], ref[b, :, s]), atol=1e-3)
    np.testing.assert_allclose(sdri[b, s], _np_sisnr(est[b, :, s], ref[b, :, s])
                               - _np_sisnr(mix[b], ref[b, :, s]), atol=1e-3)
  # MSDM's quirk: both silent scores 0 dB, so SI-SDRi is large for a silent reference.
  np.testing.assert_allclose(sdr[2, 3], 0.0, atol=1e-6)
  assert sdri[2, 3] > 80


def _one_sample(value, n, stems=1):
  """(n, stems) with one non-zero sample, so ||s||_2 / N = |value| / n exactly."""
  x = np.zeros((n, stems), np.float32)
  x[0] = value
  return x


def test_is_silent_at_the_threshold():
  # Powers of two: the norm and the division are exact in float32.
  n, threshold = 16, 2.0 ** -10
  at = 2.0 ** -6                                   # ||s|| / N == threshold: not silent
  audio = np.stack([_one_sample(at * f, n)[:, 0] for f in (1.0, 1.0 + 2 ** -10, 1.0 - 2 ** -10)],
                   axis=-1)
  np.testing.assert_array_equal(metrics.is_silent(audio, threshold), [False, False, True])
  np.testing.assert_array_equal(metrics.active_stem_mask(audio, threshold), [True, True, False])


def test_is_silent_config_threshold_on_constant_signals():
  threshold = get_config().data.silence_threshold
  n = 1000
  # A constant c has ||s|| / N = c / sqrt(N).
  levels = threshold * np.sqrt(n) * np.array([1.01, 0.99, 0.0, 100.0])
  audio = np.ones((2, n, 4), np.float32) * levels.astype(np.float32)
  audio[1] *= -1                                   # sign does not matter
  np.testing.assert_array_equal(metrics.is_silent(audio, threshold),
                                [[False, True, True, False]] * 2)


def test_keep_window():
  threshold, n = 1e-3, 100
  loud, quiet = 1.0, 0.0
  def window(*levels):
    return np.ones((n, 4), np.float32) * np.array(levels, np.float32)
  stems = np.stack([window(loud, loud, quiet, quiet),
                    window(loud, quiet, quiet, quiet),
                    window(quiet, quiet, quiet, quiet),
                    window(loud, loud, loud, loud)])
  np.testing.assert_array_equal(metrics.keep_window(stems, threshold, 2),
                                [True, False, False, True])
  np.testing.assert_array_equal(metrics.keep_window(stems, threshold, 1),
                                [True, True, False, True])
  np.testing.assert_array_equal(
      jax.jit(metrics.keep_window, static_argnums=(1, 2))(stems, threshold, 4),
      [False, False, False, True])


def test_code_histogram_and_used_codes():
  codes = np.array([[[0, 3], [0, 3], [2, 3]],
                    [[0, 1], [5, 3], [2, 3]]], np.int32)          # (B=2, T=3, Q=2)
  counts = np.asarray(jax.jit(metrics.code_histogram, static_argnums=1)(codes, 6))
  want = np.zeros((2, 6), np.int32)
  for q in range(2):
    np.add.at(want[q], codes[..., q].ravel(), 1)
  np.testing.assert_array_equal(counts, want)
  assert counts.dtype == np.int32 and counts.sum() == codes.size
  np.testing.assert_array_equal(metrics.used_codes(counts), [3, 2])


def test_code_histogram_drops_out_of_range():
  codes = np.array([[[0], [4], [-1], [1]]], np.int32)
  np.testing.assert_array_equal(metrics.code_histogram(codes, 4), [[1, 1, 0, 0]])


def test_perplexity():
  k, size = 5, 16
  uniform, one_hot, empty, skewed = np.zeros((4, size))
  uniform[:k] = 7.0
  one_hot[3] = 42.0
  skewed[:2] = [3.0, 1.0]
  got = np.asarray(jax.jit(metrics.perplexity)(np.stack([uniform, one_hot, empty, skewed])))
  p = np.array([0.75, 0.25])
  np.testing.assert_allclose(got, [k, 1.0, 0.0, np.exp(-(p * np.log(p)).sum())], rtol=1e-5)
  # Perplexity never exceeds the number of used codes (also for the empty row, by design).
  counts = np.stack([uniform, one_hot, empty, skewed])
  assert np.all(got <= np.asarray(metrics.used_codes(counts)) + 1e-4)


def test_perplexity_of_int_counts_from_histogram():
  codes = jnp.array([[[2], [3], [2], [3]]], jnp.int32)
  counts = metrics.code_histogram(codes, 4)
  np.testing.assert_allclose(metrics.perplexity(counts), [2.0], rtol=1e-6)
  np.testing.assert_allclose(metrics.perplexity(jnp.zeros((1, 4), jnp.int32)), [0.0])


def test_dead_codes():
  usage = np.array([[0.0, 0.5, 1.9, 2.0, 5.0],
                    [3.0, 3.0, 3.0, 3.0, 3.0],
                    [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
  np.testing.assert_array_equal(metrics.dead_codes(usage, 2.0), [3, 0, 5])
  np.testing.assert_array_equal(jax.jit(metrics.dead_codes)(usage, 1.0), [2, 0, 5])
