"""The RQ-Transformer prior: exact causality over frames and depths, and that it can learn
(overfits a tiny fixed code set to near-zero NLL)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs.prior import get_config
from rqvae_jax import prior

Q, K, T, DC = 3, 16, 12, 8


def _model():
  cfg = get_config('smoke').transformer
  return prior.RQTransformer(cfg, Q, K, DC)


def test_changing_a_later_code_leaves_earlier_logits_exactly_unchanged():
  model = _model()
  rng = np.random.default_rng(0)
  codes = jnp.asarray(rng.integers(0, K, (2, T, Q)), jnp.int32)
  codebooks = rng.standard_normal((Q, K, DC)).astype(np.float32)
  # jitted: an eager Flax init compiles every op on its own (seconds)
  params = jax.jit(lambda k: prior.init_params(model, k, codebooks))(jax.random.PRNGKey(0))
  apply = jax.jit(lambda c: model.apply({'params': params}, c))
  base = np.asarray(apply(codes))
  assert base.shape == (2, T, Q, K)
  for t, d in ((5, 0), (5, 1), (5, 2), (0, 1), (T - 1, 0)):
    changed = codes.at[:, t, d].set((codes[:, t, d] + 1 + rng.integers(0, K - 1)) % K)
    out = np.asarray(apply(changed))
    # positions before (t, d) in the order (frame, depth) are exactly unchanged, including
    # (t, d) itself (its own code is the target, not an input) ...
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    np.testing.assert_array_equal(out[:, t, :d + 1], base[:, t, :d + 1])
    # ... and later ones do change (the inputs are used)
    later = out[:, t, d + 1:] if d + 1 < Q else out[:, t + 1:] if t + 1 < T else None
    if later is not None and later.size:
      ref = base[:, t, d + 1:] if d + 1 < Q else base[:, t + 1:]
      assert np.abs(later - ref).max() > 1e-6


def test_nll_matches_a_numpy_cross_entropy():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 3, Q, K)).astype(np.float32)
  codes = rng.integers(0, K, (2, 3, Q))
  mean, per_depth = prior.nll(jnp.asarray(logits), jnp.asarray(codes))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ref = -np.take_along_axis(logp, codes[..., None], -1)[..., 0]
  np.testing.assert_allclose(per_depth, ref.mean((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(mean, ref.mean(), rtol=1e-5)


def test_prior_overfits_a_tiny_fixed_code_set():
  model = _model()
  rng = np.random.default_rng(2)
  codes = jnp.asarray(rng.integers(0, K, (4, T, Q)), jnp.int32)   # 144 random codes
  params = jax.jit(lambda k: prior.init_params(model, k))(jax.random.PRNGKey(1))
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: prior.nll(model.apply({'params': p}, codes), codes)[0])(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  first = None
  for _ in range(300):
    params, opt_state, loss = step(params, opt_state)
    first = float(loss) if first is None else first
  assert first > 0.9 * np.log(K)            # starts near uniform (2.77 nats)
  assert float(loss) < 0.05, float(loss)    # the code set is learnt by heart
