"""KV-cached sampling: equal to re-running the whole prior for every code (greedy and with
the same keys for top-p sampling), the sliding window past the context, and top-p itself."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.prior import get_config
from rqvae_jax import prior, sampling

# The smoke prior over the test codec's codes (tests/codec_fixture.py): the same program as
# test_prior_training's generate step, so the session's compilation cache serves both.
Q, K, DC, C = 3, 32, 16, 16


@pytest.fixture(scope='module')
def model_and_variables():
  cfg = get_config('smoke').transformer
  assert cfg.context_frames == C
  model = prior.RQTransformer(cfg, Q, K, DC)
  params = jax.jit(lambda k: prior.init_params(model, k))(jax.random.PRNGKey(4))
  # larger output weights: peaked distributions, so greedy and top-p choices differ by code
  params = {**params, 'head_w': params['head_w'] * 40.0}
  return model, {'params': params}


@pytest.mark.parametrize('temperature,top_p', [(0.0, 1.0), (1.0, 0.8)])
def test_cached_sampling_equals_the_uncached_model(model_and_variables, temperature, top_p):
  model, variables = model_and_variables
  key = jax.random.PRNGKey(7)
  cached = sampling.sample(model, variables, key, 2, C, temperature=temperature, top_p=top_p)
  ref = sampling.sample_uncached(model, variables, key, 2, C, temperature=temperature,
                                 top_p=top_p)
  assert cached.shape == (2, C, Q)
  np.testing.assert_array_equal(cached, ref)
  assert len(np.unique(cached)) > 2                     # not a constant sequence


def test_sliding_window_goes_past_the_context(model_and_variables):
  model, variables = model_and_variables
  done = []
  codes = sampling.sample(model, variables, jax.random.PRNGKey(1), 2, 2 * C - 2,
                          temperature=0.0, progress=done.append)
  assert codes.shape == (2, 2 * C - 2, Q) and done == [C, C + C // 2, 2 * C - 2]
  # Each window after the first sees the previous window's last C/2 frames as its prefix:
  # the greedy codes of the second window (frames C..3C/2-1) are what the uncached model
  # gives, code by code, for frames C/2..C-1 as the start of a new window.
  half = C // 2
  window = jnp.zeros((2, C, Q), jnp.int32).at[:, :half].set(codes[:, half:C])
  forward = jax.jit(lambda c: model.apply(variables, c))
  for t in range(half, C):
    for d in range(Q):
      window = window.at[:, t, d].set(jnp.argmax(forward(window)[:, t, d], axis=-1))
  np.testing.assert_array_equal(np.asarray(window[:, half:]), codes[:, C:C + half])
  # One compiled program serves every window, length and setting: none is added here.
  compiled = sampling.compiled_windows(model)
  assert compiled >= 1
  sampling.sample(model, variables, jax.random.PRNGKey(2), 2, 5, temperature=0.7, top_p=0.5)
  assert sampling.compiled_windows(model) == compiled


def test_bad_settings_are_refused(model_and_variables):
  model, variables = model_and_variables
  with pytest.raises(ValueError, match='top_p'):
    sampling.sample(model, variables, jax.random.PRNGKey(0), 1, 4, top_p=0.0)
  with pytest.raises(ValueError, match='temperature'):
    sampling.sample(model, variables, jax.random.PRNGKey(0), 1, 4, temperature=-1.0)


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  draws = jax.jit(lambda p: jax.vmap(lambda k: sampling.sample_logits(k, logits, 1.0, p))(keys))
  draw = lambda p: np.asarray(draws(jnp.float32(p)))     # one program for every p
  assert set(draw(0.7).ravel().tolist()) == {0, 1}             # 0.5 < 0.7 <= 0.8
  # (not p = 0.5 itself: the mass before code 1 is 0.5 only up to float32 rounding)
  assert set(draw(0.49).ravel().tolist()) == {0}
  assert set(draw(0.81).ravel().tolist()) == {0, 1, 2}
  assert int(sampling.sample_logits(keys[0], logits, 0.0, 0.9)[0]) == 0
  # temperature divides: T = 0.5 squares the odds of code 0 over code 1
  hot = jax.nn.softmax(logits / 0.5)
  assert float(hot[0, 0] / hot[0, 1]) == pytest.approx((0.5 / 0.3) ** 2, rel=1e-4)
