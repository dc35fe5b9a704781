"""The compiled CPU LSTM kernel (rqvae_jax.native_lstm) against the scan path.

tests/test_lstm.py checks BiLSTM(impl='native') against an independent NumPy LSTM and
autodiff of a plain JAX one; here the recurrence itself at edge shapes, the gradients of
every input, `auto`'s choice and a batch-sharded run. The build and its failure modes:
tests/test_native.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rqvae_jax import lstm as lstm_lib
from rqvae_jax import native
from rqvae_jax import native_lstm
from tests.conftest import run_on_two_cpu_devices

pytestmark = pytest.mark.skipif(
    native.find_compiler() is None or jax.default_backend() != 'cpu',
    reason='the native LSTM kernel needs a C++ compiler and the CPU backend')


def _inputs(t, b, h, seed=0):
  rng = np.random.default_rng(seed)
  xs = jnp.asarray(rng.normal(size=(t, 2, b, 4 * h)), jnp.float32)
  w_hh = jnp.asarray(rng.normal(size=(2, 4 * h, h)) / np.sqrt(h), jnp.float32)
  return xs, w_hh


def _scan(xs, w_hh):
  return lstm_lib._recurrence(xs, w_hh, 1)  # pylint: disable=protected-access


@pytest.fixture(scope='module', autouse=True)
def _built():
  status = native.load()
  assert status.available, status.reason
  yield


# H = 5 and 6: the kernel's rows go four at a time, so these exercise its remainder loop
# and a single partial panel; H = 40: five full 32-column gate panels, and one full and one
# partial panel of the backward's (4H, H) weights; T = 1: no recurrent product at all;
# B = 1, 4 and 7 (its batch tiles of four, two and one rows).
@pytest.mark.parametrize('t,b,h', [(1, 1, 5), (9, 4, 6), (23, 2, 16), (7, 7, 40)])
def test_forward_matches_scan(t, b, h):
  xs, w_hh = _inputs(t, b, h)
  want = np.asarray(jax.jit(_scan)(xs, w_hh))
  got = np.asarray(jax.jit(native_lstm.recurrence)(xs, w_hh))
  assert got.shape == (t, 2, b, h)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  # The training forward (which also keeps the states and gates) gives the same outputs.
  train_hs = jax.jit(lambda x, w: jax.vjp(native_lstm.recurrence, x, w)[0])(xs, w_hh)
  np.testing.assert_array_equal(np.asarray(train_hs), got)


@pytest.mark.parametrize('t,b,h', [(2, 2, 5), (13, 3, 6), (30, 2, 16), (6, 7, 40)])
def test_gradients_match_scan(t, b, h):
  xs, w_hh = _inputs(t, b, h, seed=1)
  cot = jnp.asarray(np.random.default_rng(2).normal(size=(t, 2, b, h)), jnp.float32)

  def grads(fn):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(fn(x, w)) * cot), argnums=(0, 1)))(
        xs, w_hh)

  (gx, gw), (rx, rw) = grads(native_lstm.recurrence), grads(_scan)
  assert float(jnp.max(jnp.abs(rx))) > 1e-2 and float(jnp.max(jnp.abs(rw))) > 1e-2
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), atol=5e-6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), atol=5e-6, rtol=1e-5)


def test_saturated_gates_stay_finite_and_exact():
  # Pre-activations far beyond the exp's clamp (|z| > 88): sigmoid 0 or 1, tanh +-1.
  xs, w_hh = _inputs(6, 2, 8, seed=3)
  xs = xs * 200.0
  got = np.asarray(jax.jit(native_lstm.recurrence)(xs, w_hh))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, np.asarray(jax.jit(_scan)(xs, w_hh)), atol=1e-6, rtol=0)


def test_auto_picks_the_kernel_on_the_cpu_and_scan_for_bfloat16():
  auto = lstm_lib.BiLSTM(hidden_size=4)
  assert auto._resolved_impl() == 'native'  # pylint: disable=protected-access
  bf16 = lstm_lib.BiLSTM(hidden_size=4, dtype=jnp.bfloat16)
  assert bf16._resolved_impl() == 'scan'  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='float32 CPU kernel'):
    lstm_lib.BiLSTM(hidden_size=4, impl='native', dtype=jnp.bfloat16)._resolved_impl()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='float32'):
    native_lstm.recurrence(*(a.astype(jnp.bfloat16) for a in _inputs(2, 1, 4)))
  xs, _ = _inputs(2, 1, 4)
  with pytest.raises(ValueError, match=r'w_hh must be \(D, 4H, H\)'):
    native_lstm.recurrence(xs, jnp.zeros((2, 4, 16), jnp.float32))


_SHARDED = r'''
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rqvae_jax import lstm, native_lstm
mesh = Mesh(np.array(jax.devices()), ('data',))
rng = np.random.default_rng(0)
xs = jnp.asarray(rng.normal(size=(5, 2, 4, 32)), jnp.float32)
w = jnp.asarray(0.3 * rng.normal(size=(2, 32, 8)), jnp.float32)
xs_sharded = jax.device_put(xs, NamedSharding(mesh, P(None, None, 'data')))
w_replicated = jax.device_put(w, NamedSharding(mesh, P()))
def grads(fn):
  return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1)))
native = grads(native_lstm.recurrence)
got = native(xs_sharded, w_replicated)
want = grads(lambda x, w: lstm._recurrence(x, w, 1))(xs, w)
hlo = native.lower(xs_sharded, w_replicated).compile().as_text()
calls = [l for l in hlo.splitlines() if 'custom-call(' in l and '_lstm_' in l]
print(json.dumps({{
    'devices': len(jax.devices()),
    'diff': [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want)],
    'gathers': hlo.count('all-gather('),
    'local_batch_2': all('[5,2,2,' in l for l in calls), 'calls': len(calls),
    'grad_spec': str(got[0].sharding.spec)}}))
'''


def test_sharded_batch_runs_per_device_without_gathering():
  """Under a batch-sharded jit on two devices each device runs the kernel on its own half
  of the batch (custom_partitioning), with the scan's gradients."""
  info = run_on_two_cpu_devices(_SHARDED)
  assert info['devices'] == 2
  assert max(info['diff']) < 1e-5, info
  assert info['gathers'] == 0 and info['calls'] == 2 and info['local_batch_2'], info
  assert 'data' in info['grad_spec']


def test_panels_layout_and_the_kernels_check_of_it():
  m = np.arange(2 * 3 * 70, dtype=np.float32).reshape(2, 3, 70)
  p = np.asarray(native_lstm.panels(jnp.asarray(m)))
  assert p.shape == (2, 3, 3, native_lstm.PANEL)             # ceil(70 / 32) = 3 panels
  for j in range(70):
    np.testing.assert_array_equal(p[:, j // 32, :, j % 32], m[:, :, j])
  np.testing.assert_array_equal(p[:, 2, :, 70 - 64:], 0.0)    # the last panel's padding
  # The kernel itself refuses weights that are not panels of the right size (the wrappers
  # check first; this guards against reading past the buffer).
  xs, w_hh = _inputs(3, 1, 6)
  with pytest.raises(Exception, match='recurrent weights must be in panels'):
    jax.block_until_ready(native_lstm._call(      # pylint: disable=protected-access
        'lstm_inference', xs, jnp.swapaxes(w_hh, 1, 2)[:, None]))


def test_prepared_layers_give_the_same_output():
  # lstm.prepared_layers (what model.with_inference_tables adds for inference) only moves
  # the weights into the kernel's layout: the output is that of the plain params.
  from rqvae_jax import model as model_lib
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 23, 12))
  layer = lstm_lib.BiLSTM(hidden_size=8, num_layers=2, impl='native')
  params = layer.init(jax.random.PRNGKey(1), x)['params']
  prepared = lstm_lib.prepared_layers(params, 2)
  assert prepared['layer0']['w_ih'].shape == (64, 12)
  # H = 8: 4H = 32 gate columns, one panel of (H, 32) per direction.
  assert prepared['layer1']['w_hh_panels'].shape == (2, 1, 8, 32)
  np.testing.assert_allclose(prepared['layer1']['w_hh_panels'][1, 0],
                             np.asarray(params['weight_hh_l1_reverse']).T)
  want = layer.apply({'params': params}, x)
  got = layer.apply({'params': params, lstm_lib.PREPARED: prepared}, x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The model-level walk finds every BiLSTM at its own path.
  tree = {'encoder': {'lstm': params, 'fc': {'kernel': x}}, 'decoder': {'lstm': params}}
  found = model_lib._prepared_lstms(tree)   # pylint: disable=protected-access
  assert set(found) == {'encoder', 'decoder'} and set(found['encoder']) == {'lstm'}
  assert set(found['decoder']['lstm']) == {'layer0', 'layer1'}
  with pytest.raises(ValueError, match=r'w_hh_panels must be recurrent_panels\(w_hh\)'):
    native_lstm.inference_prepared(jnp.zeros((5, 2, 1, 32)), jnp.zeros((2, 8, 32)))
