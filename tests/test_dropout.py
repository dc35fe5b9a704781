"""The fast dropout draws exactly flax's masks (same rng stream) and a correct Threefry."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rqvae_jax import dropout


@pytest.mark.parametrize('key,counter,expected', [
    # Random123's known-answer vectors for threefry2x32 with 20 rounds.
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6b200159, 0x99ba4efe)),
    ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
    ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0)),
])
def test_threefry_matches_published_vectors(key, counter, expected):
  out = dropout.threefry_2x32(jnp.asarray(key, jnp.uint32), jnp.uint32(counter[0]),
                              jnp.uint32(counter[1]))
  assert tuple(int(w) for w in out) == expected


@pytest.mark.parametrize('shape', [(1,), (7,), (2, 3, 5), (2, 4410, 16)])
@pytest.mark.parametrize('seed', [0, 1, 12345])
def test_bits_and_masks_equal_jax_random(shape, seed):
  key = jax.random.PRNGKey(seed)
  np.testing.assert_array_equal(dropout.random_bits(key, shape),
                                jax.random.bits(key, shape, jnp.uint32))
  for p in (0.9, 0.5, 0.1, 0.75):
    mask = dropout.bernoulli(key, p, shape)
    assert mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask, jax.random.bernoulli(key, p, shape))


def test_typed_and_non_threefry_keys():
  typed = jax.random.key(3)
  np.testing.assert_array_equal(dropout.bernoulli(typed, 0.9, (100,)),
                                jax.random.bernoulli(typed, 0.9, (100,)))
  rbg = jax.random.key(3, impl='rbg')               # falls back to jax.random.bernoulli
  np.testing.assert_array_equal(dropout.bernoulli(rbg, 0.9, (100,)),
                                jax.random.bernoulli(rbg, 0.9, (100,)))


def test_keep_rate_is_the_requested_one():
  mask = np.asarray(dropout.bernoulli(jax.random.PRNGKey(7), 0.9, (400_000,)))
  assert abs(mask.mean() - 0.9) < 3 * np.sqrt(0.09 / mask.size)


class _TwoDropouts(nn.Module):
  """Auto-named dropouts in one module: each must get the flax module's rng."""
  impl: type

  @nn.compact
  def __call__(self, x, train):
    x = self.impl(0.1, deterministic=not train)(x)
    x = nn.Dense(8)(x)
    return self.impl(0.3)(x, deterministic=not train)


def test_dropout_module_equals_flax_dropout():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 300, 8)), jnp.float32)
  ours, theirs = _TwoDropouts(dropout.Dropout), _TwoDropouts(nn.Dropout)
  variables = ours.init(jax.random.PRNGKey(0), x, False)
  for seed in (1, 2):
    rngs = {'dropout': jax.random.PRNGKey(seed)}
    a = ours.apply(variables, x, True, rngs=rngs)
    b = theirs.apply(variables, x, True, rngs=rngs)
    np.testing.assert_array_equal(a, b)
    assert 0 < float(jnp.mean(a == 0)) < 1               # something was dropped
  np.testing.assert_array_equal(ours.apply(variables, x, False), theirs.apply(variables, x, False))


def test_dropout_edge_rates():
  x = jnp.ones((4, 5))
  rngs = {'dropout': jax.random.PRNGKey(0)}
  np.testing.assert_array_equal(dropout.Dropout(0.0).apply({}, x, False, rngs=rngs), x)
  np.testing.assert_array_equal(dropout.Dropout(1.0).apply({}, x, False, rngs=rngs), 0 * x)
  np.testing.assert_array_equal(dropout.Dropout(0.5).apply({}, x, True), x)
  kept = dropout.Dropout(0.5).apply({}, x, False, rngs=rngs)
  assert set(np.unique(np.asarray(kept)).tolist()) <= {0.0, 2.0}
