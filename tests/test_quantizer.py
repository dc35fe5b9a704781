"""ResidualVQ: nearest codes, straight-through, usage stats, dead-code restart, k-means."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rqvae_jax import quantizer as qz


def _vq(q=3, k=16, d=8, decay=0.97):
  return qz.ResidualVQ(num_quantizers=q, codebook_size=k, dim=d, usage_decay=decay)


def _init(vq, x):
  return vq.init(jax.random.PRNGKey(0), x, train=False)


def test_nearest_code_matches_brute_force():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 8)).astype(np.float32)
  cb = rng.normal(size=(50, 8)).astype(np.float32)
  brute = np.argmin(((x[:, None, :] - cb[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(np.asarray(qz.nearest_code(x, cb)), brute)
  dist = np.asarray(qz.squared_distances(x, cb))
  np.testing.assert_allclose(dist, ((x[:, None, :] - cb[None]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('k', [256, 4096, 192, 96])
def test_first_argmin_equals_argmin_with_ties_and_nans(k):
  """The grouped argmin (groups of 64; 96 is not a multiple and takes the plain path) returns
  NumPy's argmin exactly: the first index of the minimum, ties across and within groups
  included; a NaN row (a diverged model) still gets an index inside the codebook."""
  rng = np.random.default_rng(k)
  values = rng.integers(0, 40, size=(300, k)).astype(np.float32)   # many exact ties
  values[0] = 7.0                                   # all equal: index 0
  values[1, [5, k - 1]] = -1.0                      # tie across groups: the first
  values[2, [70, 71]] = -3.0                        # tie inside one group
  values[3, k - 1] = -5.0                           # the last column
  expected = np.argmin(values, axis=-1)
  got = np.asarray(jax.jit(qz.first_argmin)(jnp.asarray(values)))
  np.testing.assert_array_equal(got, expected)
  assert got[0] == 0 and got[1] == 5 and got[3] == k - 1
  values[4, 100 % k] = np.nan
  assert 0 <= int(jax.jit(qz.first_argmin)(jnp.asarray(values))[4]) < k


def test_nearest_code_with_a_grouped_codebook_matches_brute_force():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 16)).astype(np.float32)
  cb = rng.normal(size=(512, 16)).astype(np.float32)
  cb[300] = cb[20]                                  # a duplicated code: the first one wins
  x[:5] = cb[20]
  brute = np.argmin(((x[:, None, :] - cb[None]) ** 2).sum(-1), axis=1)
  got = np.asarray(qz.nearest_code(x, cb))
  np.testing.assert_array_equal(got, brute)
  assert (got[:5] == 20).all()


def test_stage_codes_and_quantized_sum_match_numpy_residual_loop():
  vq = _vq()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
  variables = _init(vq, x)
  out, aux = vq.apply(variables, x, train=False)
  cbs = np.asarray(variables['params']['codebooks'])
  r = np.asarray(x).reshape(-1, 8)
  total = np.zeros_like(r)
  for s in range(cbs.shape[0]):
    idx = np.argmin(((r[:, None] - cbs[s][None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(np.asarray(aux['codes'])[..., s].reshape(-1), idx)
    total += cbs[s][idx]
    r = r - cbs[s][idx]
  np.testing.assert_allclose(np.asarray(out).reshape(-1, 8), total, atol=1e-5)
  assert aux['codes'].dtype == jnp.int32 and aux['codes'].shape == (2, 5, 3)


def test_straight_through_gradient_is_identity():
  vq = _vq()
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 8))
  variables = _init(vq, x)
  w = jax.random.normal(jax.random.PRNGKey(3), x.shape)

  def f(z):
    out, _ = vq.apply(variables, z, train=True, mutable=[qz.STATS])[0]
    return jnp.sum(out * w)

  np.testing.assert_allclose(np.asarray(jax.grad(f)(x)), np.asarray(w), atol=1e-6)


def test_commitment_parts_match_numpy():
  vq = _vq(q=2)
  x = jax.random.normal(jax.random.PRNGKey(4), (1, 6, 8))
  variables = _init(vq, x)
  _, aux = vq.apply(variables, x, train=False)
  cbs = np.asarray(variables['params']['codebooks'])
  z = np.asarray(x).reshape(-1, 8)
  r, cum, parts = z.copy(), np.zeros_like(z), np.zeros(3)
  for s in range(2):
    q = cbs[s][np.argmin(((r[:, None] - cbs[s][None]) ** 2).sum(-1), axis=1)]
    cum += q
    parts += [np.mean((r - q) ** 2), np.mean((r - q) ** 2), np.mean((z - cum) ** 2)]
    r = r - q
  got = [float(aux[k]) for k in ('codebook_loss', 'encoder_loss', 'cumulative_loss')]
  np.testing.assert_allclose(got, parts, rtol=1e-5)


def test_residual_decreases_over_stages_on_data():
  rng = jax.random.PRNGKey(5)
  frames = jax.random.normal(rng, (2000, 8)) * jnp.linspace(0.5, 2.0, 8)
  codebooks = jnp.zeros((4, 64, 8))
  codebooks = qz.kmeans_init_codebooks(codebooks, frames, jax.random.PRNGKey(6), stages='all',
                                       num_iters=10)
  vq = _vq(q=4, k=64)
  variables = {'params': {'codebooks': codebooks},
               qz.STATS: {'usage': jnp.zeros((4, 64))}}
  _, aux = vq.apply(variables, frames[None], train=False)
  norms = np.linalg.norm(np.asarray(aux['residuals'][0]), axis=-1).mean(0)  # per stage input
  final = np.linalg.norm(np.asarray(frames - vq.apply(variables, frames[None])[0][0]), axis=-1)
  assert np.all(np.diff(norms) < 0), norms
  assert final.mean() < norms[-1]


def test_usage_ema_update_counts_duplicates():
  vq = _vq(q=1, k=4, d=2, decay=0.5)
  cb = jnp.array([[[0., 0.], [10., 0.], [0., 10.], [10., 10.]]])
  variables = {'params': {'codebooks': cb}, qz.STATS: {'usage': jnp.full((1, 4), 2.0)}}
  x = jnp.array([[[0.1, 0.], [0., 0.2], [9.9, 0.], [0.1, 0.1]]])  # code 0 three times
  (_, aux), new = vq.apply(variables, x, train=True, mutable=[qz.STATS])
  np.testing.assert_allclose(np.asarray(new[qz.STATS]['usage']), [[0.5 * (2 + 3), 0.5 * (2 + 1),
                                                                    0.5 * 2, 0.5 * 2]])
  # Eval calls leave the statistics alone.
  _, new_eval = vq.apply(variables, x, train=False, mutable=[qz.STATS])
  np.testing.assert_allclose(np.asarray(new_eval[qz.STATS]['usage']), 2.0)


def test_restart_replaces_dead_codes_with_frames_and_keeps_live_ones():
  q, k, d = 2, 6, 3
  codebooks = jnp.arange(q * k * d, dtype=jnp.float32).reshape(q, k, d) + 1000.0
  usage = jnp.array([[5.0, 0.1, 3.0, 1.9, 2.0, 0.0], [0.0, 9.0, 9.0, 9.0, 9.0, 9.0]])
  residuals = jax.random.normal(jax.random.PRNGKey(7), (3, 4, q, d))  # batch 3 < 9 is fine
  new_cb, new_usage, dead = qz.restart_dead_codes(codebooks, usage, residuals,
                                                  jax.random.PRNGKey(8), threshold=2.0)
  dead = np.asarray(dead)
  np.testing.assert_array_equal(dead, np.asarray(usage) < 2.0)
  frames = np.asarray(residuals).reshape(-1, q, d)
  for s in range(q):
    for j in range(k):
      if dead[s, j]:
        assert any(np.allclose(new_cb[s, j], f) for f in frames[:, s]), (s, j)
        assert new_usage[s, j] == 0.0
      else:
        np.testing.assert_array_equal(new_cb[s, j], codebooks[s, j])
        assert new_usage[s, j] == usage[s, j]
  jitted = jax.jit(qz.restart_dead_codes, static_argnums=4)
  np.testing.assert_array_equal(jitted(codebooks, usage, residuals, jax.random.PRNGKey(8), 2.0)[0],
                                new_cb)


@pytest.mark.parametrize('seeding', ['kmeans++', 'random'])
def test_kmeans_beats_random_codebook(seeding):
  key = jax.random.PRNGKey(9)
  centres = jax.random.normal(key, (16, 8)) * 4
  labels = jax.random.randint(jax.random.PRNGKey(10), (3000,), 0, 16)
  frames = centres[labels] + 0.3 * jax.random.normal(jax.random.PRNGKey(11), (3000, 8))
  centroids, err = qz.kmeans(frames, 16, 15, jax.random.PRNGKey(12), seeding)
  random_cb = qz.xavier_normal(jax.random.PRNGKey(13), (1, 16, 8))[0]
  rand_err = np.mean(np.min(np.asarray(qz.squared_distances(frames, random_cb)), -1)) / 8
  assert centroids.shape == (16, 8)
  assert float(err) < 0.2 * rand_err
  if seeding == 'kmeans++':  # random seeding may merge clusters; k-means++ finds them all here
    assert float(err) < 0.2  # close to the 0.09 noise floor of the clusters


def test_kmeans_with_fewer_frames_than_codes_and_bad_input():
  frames = jax.random.normal(jax.random.PRNGKey(14), (5, 4))
  centroids, err = qz.kmeans(frames, 8, 3, jax.random.PRNGKey(15))
  assert centroids.shape == (8, 4) and np.isfinite(float(err)) and float(err) < 1e-6
  with pytest.raises(ValueError, match='shaped'):
    qz.kmeans(jnp.zeros((0, 4)), 4, 1, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="'first', 'all' or 'none'"):
    qz.kmeans_init_codebooks(jnp.zeros((1, 4, 4)), frames, jax.random.PRNGKey(0), stages='some')


def test_kmeans_first_stage_only_leaves_other_stages():
  cb = jnp.ones((3, 8, 4))
  frames = jax.random.normal(jax.random.PRNGKey(16), (100, 4))
  out = qz.kmeans_init_codebooks(cb, frames, jax.random.PRNGKey(17), stages='first', num_iters=2)
  assert not np.allclose(out[0], 1.0)
  np.testing.assert_array_equal(out[1:], cb[1:])
