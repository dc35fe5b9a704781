"""Separation metrics (MSDM's SI-SDR protocol) and codebook statistics.

Audio is `(..., N, S)` (samples, stems), mixtures `(..., N)`. Everything is jnp, batched and
jit-able; nothing returns NaN for silent references or estimates.
"""
import jax.numpy as jnp


# ----- SI-SDR -----


def si_sdr(reference, estimate, eps: float = 1e-8) -> jnp.ndarray:
  """MSDM's `sisnr(est, ref)` per stem: (..., N, S) -> (..., S), in dB.

  a = (<est, ref> + eps) / (||ref||^2 + eps), t = a ref,
  10 log10((||t||^2 + eps) / (||t - est||^2 + eps)). The eps keep a silent reference or
  estimate finite (a silent reference gives 10 log10(eps / (||est||^2 + eps))).
  """
  ref = jnp.asarray(reference, jnp.float32)
  est = jnp.asarray(estimate, jnp.float32)
  a = (jnp.sum(est * ref, axis=-2, keepdims=True) + eps) / (
      jnp.sum(jnp.square(ref), axis=-2, keepdims=True) + eps)
  target = a * ref
  num = jnp.sum(jnp.square(target), axis=-2) + eps
  den = jnp.sum(jnp.square(target - est), axis=-2) + eps
  return 10.0 * jnp.log10(num / den)


def si_sdr_improvement(reference, estimate, mixture, eps: float = 1e-8) -> jnp.ndarray:
  """SI-SDR(ref, est) - SI-SDR(ref, mixture) per stem; mixture (..., N) is used for every stem."""
  ref = jnp.asarray(reference, jnp.float32)
  mix = jnp.broadcast_to(jnp.asarray(mixture, jnp.float32)[..., None], ref.shape)
  return si_sdr(ref, estimate, eps) - si_sdr(ref, mix, eps)


def leakage(reference, estimate, eps: float = 1e-12) -> jnp.ndarray:
  """Share of each estimate's energy explained by each reference: (..., N, S) -> (..., S, S).

  Entry [i, j] is cos^2 between estimate i and reference j (1 = estimate i is reference j up to
  scale, 0 = orthogonal). The diagonal is what SI-SDR scores; a large off-diagonal [i, j] says
  stem j leaks into estimate i (e.g. guitar and piano confused). 0 where either is silent.
  """
  ref = jnp.asarray(reference, jnp.float32)
  est = jnp.asarray(estimate, jnp.float32)
  dots = jnp.einsum('...ni,...nj->...ij', est, ref)
  est_energy = jnp.sum(jnp.square(est), axis=-2)[..., :, None]
  ref_energy = jnp.sum(jnp.square(ref), axis=-2)[..., None, :]
  return jnp.square(dots) / (est_energy * ref_energy + eps)


# ----- silence and window selection -----


def is_silent(audio, threshold: float) -> jnp.ndarray:
  """Per-stem silence, MSDM's rule `||s||_2 / N < threshold`: (..., N, S) -> bool (..., S)."""
  audio = jnp.asarray(audio, jnp.float32)
  n = audio.shape[-2]
  return jnp.sqrt(jnp.sum(jnp.square(audio), axis=-2)) / n < threshold


def active_stem_mask(audio, threshold: float) -> jnp.ndarray:
  """Non-silent stems, `~is_silent`: (..., N, S) -> bool (..., S)."""
  return jnp.logical_not(is_silent(audio, threshold))


def keep_window(stems, threshold: float, min_active: int) -> jnp.ndarray:
  """Whether a window has at least `min_active` non-silent stems: (..., N, S) -> bool (...)."""
  return jnp.sum(active_stem_mask(stems, threshold), axis=-1) >= min_active


# ----- codebook statistics -----


def code_histogram(codes, codebook_size: int) -> jnp.ndarray:
  """Counts of each code per quantizer stage: codes (B, T, Q) int -> (Q, K) int32.

  A scatter-add, not a one-hot sum (B * T * Q * K would not fit for K = 4096). Out-of-range
  codes are dropped.
  """
  codes = jnp.asarray(codes, jnp.int32)
  num_q = codes.shape[-1]
  flat = codes.reshape(-1, num_q)
  stage = jnp.broadcast_to(jnp.arange(num_q, dtype=jnp.int32), flat.shape)
  valid = (flat >= 0) & (flat < codebook_size)
  # Invalid codes go to an out-of-bounds index, which mode='drop' ignores.
  flat = jnp.where(valid, flat, codebook_size)
  counts = jnp.zeros((num_q, codebook_size), jnp.int32)
  return counts.at[stage, flat].add(1, mode='drop')


def perplexity(counts) -> jnp.ndarray:
  """exp(entropy) of each row's code distribution: (Q, K) -> (Q,).

  k equally used codes give k, a single code gives 1. A row with no counts gives 0 (not 1),
  so that perplexity <= used_codes holds everywhere and "no data" is not mistaken for
  "collapsed to one code".
  """
  counts = jnp.asarray(counts, jnp.float32)
  total = jnp.sum(counts, axis=-1, keepdims=True)
  probs = counts / jnp.where(total > 0, total, 1.0)
  plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)
  ppl = jnp.exp(-jnp.sum(plogp, axis=-1))
  return jnp.where(total[..., 0] > 0, ppl, 0.0)


def used_codes(counts) -> jnp.ndarray:
  """Number of codes used at least once per stage: (Q, K) -> (Q,) int32."""
  return jnp.sum(jnp.asarray(counts) > 0, axis=-1).astype(jnp.int32)


def dead_codes(usage, threshold: float) -> jnp.ndarray:
  """Number of codes whose EMA usage is below `threshold` (restart candidates): (Q, K) -> (Q,)."""
  return jnp.sum(jnp.asarray(usage) < threshold, axis=-1).astype(jnp.int32)
