"""The compiled CPU kernels' build, cache and fallback (rqvae_jax.native), and the
nearest-code kernel against XLA's argmin (the LSTM kernel: tests/test_native_lstm.py)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rqvae_jax import lstm as lstm_lib
from rqvae_jax import native
from rqvae_jax import quantizer as qz
from tests.conftest import run_on_two_cpu_devices

pytestmark = pytest.mark.skipif(
    native.find_compiler() is None or jax.default_backend() != 'cpu',
    reason='the native kernels need a C++ compiler and the CPU backend')


@pytest.fixture(scope='module', autouse=True)
def _built():
  status = native.load()
  assert status.available, status.reason
  yield


def _search_inputs(n, k, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, k)), jnp.float32),
          jnp.asarray(rng.uniform(0.5, 2.0, size=(k,)), jnp.float32))


def _argmin(cross, norms):
  return np.asarray(jnp.argmin(norms[None, :] - 2.0 * cross, axis=-1))


# K = 4096 (the paper), 48 (whole vectors of 16 only), 37 and 5 (a scalar tail, and no
# whole vector at all); N = 1 and 63 (one thread) and 130 (split over two).
@pytest.mark.parametrize('n,k', [(130, 4096), (63, 48), (130, 37), (1, 5)])
def test_nearest_code_kernel_matches_argmin(n, k):
  cross, norms = _search_inputs(n, k)
  got = np.asarray(jax.jit(native.nearest_code_from_cross)(cross, norms))
  assert got.dtype == np.int32 and got.shape == (n,)
  np.testing.assert_array_equal(got, _argmin(cross, norms))


def test_nearest_code_kernel_takes_the_first_of_equal_minima():
  # Every code duplicated at a distance of 16 (other lanes of the vector) and 2048 columns
  # (other chunks): jnp.argmin's first index is the one to return.
  cross, norms = _search_inputs(70, 2048, seed=1)
  cross = jnp.concatenate([cross, cross], axis=1)
  norms = jnp.concatenate([norms, norms])
  got = np.asarray(jax.jit(native.nearest_code_from_cross)(cross, norms))
  np.testing.assert_array_equal(got, _argmin(cross, norms))
  assert np.all(got < 2048)
  lanes = jnp.tile(cross[:, :16], (1, 8))        # the same 16 values in all 8 vectors
  got = np.asarray(native.nearest_code_from_cross(lanes, jnp.ones((128,), jnp.float32)))
  np.testing.assert_array_equal(got, _argmin(lanes, jnp.ones((128,), jnp.float32)))
  assert np.all(got < 16)


def test_nearest_code_kernel_skips_nan_and_checks_shapes():
  cross, norms = _search_inputs(4, 40, seed=2)
  cross = cross.at[0, 3].set(jnp.nan).at[1].set(jnp.nan)
  got = np.asarray(native.nearest_code_from_cross(cross, norms))
  finite = np.where(np.isnan(np.asarray(cross)), np.inf, np.asarray(norms - 2 * cross))
  assert got[0] == np.argmin(finite[0]) and got[1] == 0
  np.testing.assert_array_equal(got[2:], _argmin(cross, norms)[2:])
  with pytest.raises(ValueError, match=r'cross must be \(N, K\)'):
    native.nearest_code_from_cross(cross, norms[:-1])


def test_quantizer_search_uses_the_kernel_with_the_xla_paths_indices(monkeypatch):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(882, 256)), jnp.float32)
  codebook = jnp.asarray(rng.normal(size=(4096, 256)), jnp.float32)
  target = native.load().target_prefix + 'nearest_code'
  search = lambda: jax.jit(lambda a, b: qz.nearest_code(a, b))   # traced afresh each time
  assert target in search().lower(x, codebook).as_text()
  got = np.asarray(search()(x, codebook))
  monkeypatch.setattr(native, 'usable', lambda: False)
  assert target not in search().lower(x, codebook).as_text()
  np.testing.assert_array_equal(got, np.asarray(search()(x, codebook)))


_SHARDED = r'''
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rqvae_jax import native
mesh = Mesh(np.array(jax.devices()), ('data',))
rng = np.random.default_rng(0)
cross = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
norms = jnp.asarray(rng.uniform(size=(64,)), jnp.float32)
fn = jax.jit(native.nearest_code_from_cross)
sharded = jax.device_put(cross, NamedSharding(mesh, P('data')))
got = fn(sharded, jax.device_put(norms, NamedSharding(mesh, P())))
hlo = fn.lower(sharded, norms).compile().as_text()
calls = [l for l in hlo.splitlines() if 'custom-call(' in l and 'nearest_code' in l]
print(json.dumps({{'devices': len(jax.devices()),
                  'equal': bool(np.array_equal(np.asarray(got),
                      np.asarray(jnp.argmin(norms - 2 * cross, axis=-1)))),
                  'gathers': hlo.count('all-gather('), 'calls': len(calls),
                  'local_rows_4': all('f32[4,64]' in l for l in calls),
                  'spec': str(got.sharding.spec)}}))
'''


def test_nearest_code_kernel_runs_per_batch_shard():
  info = run_on_two_cpu_devices(_SHARDED)
  assert info['devices'] == 2 and info['equal'], info
  assert info['gathers'] == 0 and info['calls'] == 1 and info['local_rows_4'], info
  assert 'data' in info['spec']


def test_cache_key_follows_the_source_and_the_compiler(tmp_path, monkeypatch):
  monkeypatch.setenv('RQVAE_JAX_NATIVE_CACHE', str(tmp_path))
  compiler = native.find_compiler()
  path = native.library_path(compiler)
  assert path.parent == tmp_path and path.suffix == '.so'
  assert native.library_path(compiler) == path                 # deterministic
  for i, original in enumerate(native.SOURCES + native.HEADERS):  # an edit of any rebuilds
    edited = tmp_path / original.name
    edited.write_text(original.read_text() + '\n// edited\n')
    with monkeypatch.context() as m:
      if i < len(native.SOURCES):
        m.setattr(native, 'SOURCES', tuple(edited if p == original else p
                                             for p in native.SOURCES))
      else:
        m.setattr(native, 'HEADERS', (edited,))
      assert native.library_path(compiler) != path, original.name
  assert native.library_path(compiler) == path


def test_build_failure_falls_back_to_scan_with_the_reason(tmp_path, monkeypatch, caplog):
  """No usable compiler: `load` says why, 'native' raises with it, 'auto' warns once and
  runs the scan, and nothing is left in the cache."""
  monkeypatch.setenv('RQVAE_JAX_NATIVE_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  native.load.cache_clear()
  native._warn_once.cache_clear()  # pylint: disable=protected-access
  try:
    status = native.load()
    assert not status.available
    assert 'no-such-compiler' in status.reason
    with pytest.raises(RuntimeError, match='no-such-compiler'):
      lstm_lib.BiLSTM(hidden_size=4, impl='native')._resolved_impl()  # pylint: disable=protected-access
    with caplog.at_level(logging.WARNING):
      assert lstm_lib.BiLSTM(hidden_size=4)._resolved_impl() == 'scan'  # pylint: disable=protected-access
      assert lstm_lib.BiLSTM(hidden_size=8)._resolved_impl() == 'scan'  # pylint: disable=protected-access
    warnings = [r for r in caplog.records if 'compiled CPU kernels' in r.getMessage()]
    assert len(warnings) == 1 and 'no-such-compiler' in warnings[0].getMessage()
    assert not list(tmp_path.glob('*.so'))
    monkeypatch.setenv('RQVAE_JAX_NATIVE', '0')
    native.load.cache_clear()
    assert native.load().reason == 'RQVAE_JAX_NATIVE=0'
    assert not native.usable()
  finally:
    native.load.cache_clear()
    monkeypatch.undo()
    assert native.load().available                 # the real kernel again


def test_a_fresh_build_compiles_loads_and_computes(tmp_path, monkeypatch):
  # The build path end to end into an empty cache (the other tests may reuse a cached one).
  monkeypatch.setenv('RQVAE_JAX_NATIVE_CACHE', str(tmp_path))
  native.load.cache_clear()
  try:
    status = native.load()
    assert status.available, status.reason
    assert status.library.startswith(str(tmp_path)) and list(tmp_path.glob('rqvae_native-*.so'))
    assert not list(tmp_path.glob('tmp*'))                       # no half-written files
    cross, norms = _search_inputs(50, 48, seed=4)
    np.testing.assert_array_equal(np.asarray(jax.jit(native.nearest_code_from_cross)(
        cross, norms)), _argmin(cross, norms))
  finally:
    native.load.cache_clear()
    monkeypatch.undo()
    native.load()


