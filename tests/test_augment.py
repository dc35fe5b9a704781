"""Remixing augmentation: what it moves where, its gains, its key, its errors."""
import jax
import ml_collections
import numpy as np
import pytest

from rqvae_jax import augment


def _config(fraction, gains=(1.0, 1.0)):
  return ml_collections.ConfigDict({'remix_fraction': fraction, 'stem_gain_range': gains})


def _batch(b=8, n=5, s=4):
  # example i, stem j holds the constant 100 * i + j: where each stem came from is readable
  return (100.0 * np.arange(b)[:, None, None] + np.arange(s)[None, None, :]
          + np.zeros((b, n, s))).astype(np.float32)


def test_full_remix_permutes_each_stem_across_the_batch():
  batch = _batch()
  out = np.asarray(augment.remix(batch, jax.random.PRNGKey(3), _config(1.0)))
  assert out.shape == batch.shape
  sources = out[:, 0, :] // 100                       # (B, S): source example of each stem
  for s in range(batch.shape[-1]):
    np.testing.assert_array_equal(out[:, 0, s] % 100, s)          # stem s stays stem s
    assert sorted(sources[:, s]) == list(range(batch.shape[0]))   # a permutation
  assert np.any(sources != np.arange(batch.shape[0])[:, None])    # and not the identity
  np.testing.assert_array_equal(out, out[:, :1, :].repeat(batch.shape[1], 1))


def test_no_remix_and_unit_gains_is_the_identity_and_gains_stay_in_range():
  batch = _batch()
  assert not augment.enabled(_config(0.0))
  np.testing.assert_array_equal(augment.remix(batch, jax.random.PRNGKey(0), _config(0.0)), batch)
  out = np.asarray(augment.remix(batch + 1.0, jax.random.PRNGKey(1), _config(0.0, (0.5, 1.5))))
  ratio = out / (batch + 1.0)
  assert np.all((ratio >= 0.5) & (ratio <= 1.5)) and ratio.std() > 0.1
  np.testing.assert_allclose(ratio, ratio[:, :1, :].repeat(batch.shape[1], 1))  # one per stem


def test_partial_remix_keeps_the_other_examples_and_is_deterministic_per_key():
  batch = _batch(b=64)
  cfg = _config(0.25)
  out = np.asarray(augment.remix(batch, jax.random.PRNGKey(7), cfg))
  kept = np.all(out[:, 0, :] // 100 == np.arange(64)[:, None], axis=1)
  assert 30 <= kept.sum() < 64          # ~75% untouched (a redrawn one may draw itself)
  np.testing.assert_array_equal(out, augment.remix(batch, jax.random.PRNGKey(7), cfg))
  assert not np.array_equal(out, augment.remix(batch, jax.random.PRNGKey(8), cfg))


@pytest.mark.parametrize('cfg, match', [(_config(1.5), 'remix_fraction'),
                                        (_config(0.5, (0.0, 1.0)), 'stem_gain_range'),
                                        (_config(0.5, (2.0, 1.0)), 'stem_gain_range')])
def test_bad_settings_name_the_field(cfg, match):
  with pytest.raises(ValueError, match=match):
    augment.remix(_batch(), jax.random.PRNGKey(0), cfg)
