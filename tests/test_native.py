"""The compiled CPU kernels' build, cache and fallback (rqvae_jax.native), and the
nearest-code kernel against XLA's argmin (the LSTM kernel: tests/test_native_lstm.py)."""

import json
import logging
import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rqvae_jax import lstm as lstm_lib
from rqvae_jax import native
from rqvae_jax import quantizer as qz
from tests.conftest import REPO, run_on_two_cpu_devices

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


def _screened(x, codebook):
  """The screened search as quantizer.nearest_code runs it: the bfloat16 dot, then the kernel."""
  x, codebook = jnp.asarray(x, jnp.float32), jnp.asarray(codebook, jnp.float32)
  table = qz.search_table(codebook[None])
  stage = {'codebook_t': table['codebooks_t'][0], 'norms': table['norms'][0]}
  return np.asarray(jax.jit(qz.nearest_code)(x, codebook, table=stage))


def _exact_nearest(x, codebook):
  """The nearest code of the real-valued distances (float64 from the float32 inputs)."""
  x, c = np.asarray(x, np.float64), np.asarray(codebook, np.float64)
  return np.argmin(np.sum(c * c, -1)[None] - 2.0 * x @ c.T, axis=-1)


def _bf16_only(x, codebook):
  """What the bfloat16 dot alone would pick (no exact rescoring)."""
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  cb = np.asarray(jnp.asarray(codebook, jnp.bfloat16), np.float64)
  c2 = np.sum(np.asarray(codebook, np.float64) ** 2, -1)
  return np.argmin(c2[None] - 2.0 * xb @ cb.T, axis=-1)


def test_screened_search_is_the_exact_nearest_code_where_bfloat16_alone_is_not():
  rng = np.random.default_rng(4)
  # Clustered codes and frames (64 centres, spread 0.3): many codes within bfloat16 rounding
  # of the nearest, where the bf16 dot alone ranks them wrongly.
  centres = rng.normal(size=(64, 256))
  codebook = centres[rng.integers(0, 64, 4096)] + 0.3 * rng.normal(size=(4096, 256))
  x = centres[rng.integers(0, 64, 300)] + 0.3 * rng.normal(size=(300, 256))
  x, codebook = x.astype(np.float32), codebook.astype(np.float32)
  want = _exact_nearest(x, codebook)
  assert np.mean(_bf16_only(x, codebook) != want) > 0.01      # the screen alone is not enough
  got = _screened(x, codebook)
  assert got.dtype == np.int32 and got.shape == (300,)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('n,k,d', [(130, 4096, 256), (63, 37, 20), (1, 5, 3)])
def test_screened_search_matches_exact_for_any_shape(n, k, d):
  # Scalar tails in the codes (37, 5) and in the dimension (20, 3); one and two threads.
  rng = np.random.default_rng(n + k)
  x = rng.normal(size=(n, d)).astype(np.float32)
  codebook = (0.5 * rng.normal(size=(k, d))).astype(np.float32)
  np.testing.assert_array_equal(_screened(x, codebook), _exact_nearest(x, codebook))


def test_screened_search_ties_nan_and_shapes():
  rng = np.random.default_rng(5)
  codebook = rng.normal(size=(40, 16)).astype(np.float32)
  codebook = np.concatenate([codebook, codebook])         # every code twice: the first wins
  x = (codebook[rng.integers(0, 40, 9)] + 0.01 * rng.normal(size=(9, 16))).astype(np.float32)
  x[4] = np.nan
  got = _screened(x, codebook)
  want = _exact_nearest(x, codebook)
  keep = np.arange(9) != 4
  np.testing.assert_array_equal(got[keep], want[keep])
  assert np.all(got < 40) and got[4] == 0                 # a NaN row: index 0, as the argmin
  cross = jnp.zeros((9, 80), jnp.float32)
  with pytest.raises(ValueError, match=r'codebook \(K, D\)'):
    native.nearest_code_screened(cross, jnp.ones((80,)), jnp.asarray(x), jnp.asarray(codebook[:, :8]))


@pytest.mark.parametrize('screened', [True, False])
def test_vq_with_stage_tables_gives_the_float32_codes(screened):
  model = qz.ResidualVQ(num_quantizers=3, codebook_size=512, dim=64)
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 50, 64))
  variables = model.init(jax.random.PRNGKey(1), z)
  codebooks = variables['params']['codebooks']
  table = qz.search_table(codebooks)
  assert table['codebooks_t'].shape == (3, 64, 512) and table['norms'].shape == (3, 512)
  stages = qz.stage_tables(codebooks, screened)
  assert len(stages) == 3
  for q, stage in enumerate(stages):
    np.testing.assert_array_equal(stage['codebook'], codebooks[q])
    np.testing.assert_allclose(stage['norms'], np.sum(np.square(codebooks[q]), -1), rtol=1e-6)
    if screened:
      assert stage['codebook_t'].dtype == jnp.bfloat16 and stage['codebook_t'].shape == (64, 512)
      np.testing.assert_array_equal(np.asarray(stage['codebook_t'], np.float32),
                                    np.asarray(codebooks[q].astype(jnp.bfloat16), np.float32).T)
    else:
      assert 'codebook_t' not in stage
  plain_q, plain = model.apply(variables, z)
  target = native.load().target_prefix + 'nearest_code_screened'
  with_stages = {**variables, qz.SEARCH: {'stages': stages}}
  fn = jax.jit(lambda v, z: model.apply(v, z))
  lowered = fn.lower(with_stages, z).as_text()
  assert (target in lowered) == screened
  assert 'while' not in lowered and 'dynamic_slice' not in lowered   # the stages, unrolled
  assert target not in fn.lower(variables, z).as_text()
  got_q, got = fn(with_stages, z)
  for key in ('codes', 'residuals', 'counts', 'codebook_loss', 'cumulative_loss'):
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(plain[key]), err_msg=key)
  np.testing.assert_array_equal(np.asarray(got_q), np.asarray(plain_q))
  # Stage tables are for inference: a training call with them, or the wrong count, is refused.
  with pytest.raises(ValueError, match='stages are for inference with 3 stages'):
    model.apply({**variables, qz.SEARCH: {'stages': stages[:2]}}, z)
  with pytest.raises(ValueError, match='stages are for inference'):
    model.apply(with_stages, z, train=True, mutable=[qz.STATS])


@pytest.mark.parametrize('q,k,d', [(2, 4096, 256), (3, 100, 37), (1, 5, 3)])
def test_search_table_kernel_is_xlas_conversion_and_float64_norms(q, k, d):
  """native.search_table: the bfloat16 bits of XLA's conversion (round to nearest even,
  halfway cases, infinities, NaN, subnormals), transposed, whole and partial blocks of 32
  codes; the norms within float32 rounding of float64 sums."""
  rng = np.random.default_rng(q * k + d)
  codebooks = (0.3 * rng.normal(size=(q, k, d))).astype(np.float32)
  flat = codebooks.reshape(-1)
  specials = np.array([np.inf, -np.inf, np.nan, 1e-40, -1e-40, 0.0, -0.0], np.float32)
  halfway = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x7F7FFFFF],
                     np.uint32).view(np.float32)       # ties to even (down, up), carries
  extra = np.concatenate([specials, halfway])[:flat.size]
  flat[rng.choice(flat.size, extra.size, replace=False)] = extra
  bits, norms = jax.jit(native.search_table)(jnp.asarray(codebooks))
  assert bits.dtype == jnp.uint16 and bits.shape == (q, d, k) and norms.shape == (q, k)
  want = np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(codebooks).astype(jnp.bfloat16),
                                                 jnp.uint16)).transpose(0, 2, 1)
  got = np.asarray(bits)
  nan = np.isnan(codebooks).transpose(0, 2, 1)
  np.testing.assert_array_equal(got[~nan], want[~nan])
  assert np.all((got[nan] & 0x7F80) == 0x7F80) and np.all(got[nan] & 0x7F)   # still NaN
  with np.errstate(over='ignore'):       # 0x7F7FFFFF squared: inf in float32, as the kernel
    exact = np.sum(np.asarray(codebooks, np.float64) ** 2, axis=-1).astype(np.float32)
  np.testing.assert_allclose(np.asarray(norms), exact, rtol=1e-6)   # NaN and inf where exact
  with pytest.raises(ValueError, match=r'\(Q, K, D\)'):
    native.search_table(jnp.zeros((4, 8)))


def test_training_search_screened_matches_float32_and_builds_its_table_in_the_step():
  """train_search='screened': the table is built inside the traced call (the codebooks
  change every step) and the codes, output, losses and gradients are the float32 search's."""
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 50, 64))
  models = {mode: qz.ResidualVQ(num_quantizers=3, codebook_size=512, dim=64,
                                train_search=mode) for mode in ('screened', 'float32')}
  variables = models['float32'].init(jax.random.PRNGKey(1), z)
  table_target = native.load().target_prefix + 'search_table'
  outs = {}
  for mode, model in models.items():
    def loss(params, z, model=model):
      (quantized, aux), _ = model.apply({**variables, 'params': params}, z, train=True,
                                        mutable=[qz.STATS])
      total = aux['codebook_loss'] + aux['encoder_loss'] + jnp.sum(quantized ** 2)
      return total, aux
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    assert (table_target in fn.lower(variables['params'], z).as_text()) == (mode == 'screened')
    outs[mode] = fn(variables['params'], z)
  (loss_s, aux_s), grads_s = outs['screened']
  (loss_f, aux_f), grads_f = outs['float32']
  np.testing.assert_array_equal(np.asarray(aux_s['codes']), np.asarray(aux_f['codes']))
  np.testing.assert_array_equal(np.asarray(loss_s), np.asarray(loss_f))
  for a, b in zip(jax.tree_util.tree_leaves(grads_s), jax.tree_util.tree_leaves(grads_f)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match='model.quantizer.train_search must be one of'):
    qz.ResidualVQ(num_quantizers=1, codebook_size=8, dim=4, train_search='bf16').init(
        jax.random.PRNGKey(0), jnp.zeros((1, 3, 4)), train=True)


def test_search_mode_choice(monkeypatch):
  with pytest.raises(ValueError, match='inference.vq_search must be one of'):
    qz.use_screened_search('bf16')
  assert qz.use_screened_search('screened') and not qz.use_screened_search('float32')
  monkeypatch.setattr(qz, 'bf16_dot_pays', lambda: False)
  assert not qz.use_screened_search('auto')
  monkeypatch.setattr(qz, 'bf16_dot_pays', lambda: True)
  assert qz.use_screened_search('auto')
  monkeypatch.setattr(native, 'usable', lambda: False)     # accelerators: no kernel, no table
  assert not qz.use_screened_search('screened') and not qz.use_screened_search('auto')


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


# Tails of every loop: M = 7 (a 4-row tile, then single rows), P = 53 (32 + 16 + 5 scalar
# columns), N = 1100 (two threads' halves split at a 256-row block, a partial last block);
# N = 3 (one part, one short block); P = 16 exactly; a 1 x 1 product.
@pytest.mark.parametrize('n,m,p', [(1100, 7, 53), (3, 5, 19), (4096, 16, 16), (600, 1, 1)])
def test_tn_matmul_is_the_transposed_product(n, m, p):
  rng = np.random.default_rng(n + m + p)
  a = rng.normal(size=(n, m)).astype(np.float32)
  b = rng.normal(size=(n, p)).astype(np.float32)
  got = np.asarray(jax.jit(native.tn_matmul)(jnp.asarray(a), jnp.asarray(b)))
  want = a.astype(np.float64).T @ b.astype(np.float64)
  assert got.shape == (m, p) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(n) * np.abs(want).max())
  # The same call again gives the same bits (fixed thread split, no timing dependence).
  np.testing.assert_array_equal(np.asarray(jax.jit(native.tn_matmul)(jnp.asarray(a),
                                                                     jnp.asarray(b))), got)


def test_tn_matmul_refuses_bad_shapes_and_dtypes():
  with pytest.raises(ValueError, match=r'a must be \(N, M\) and b \(N, P\)'):
    native.tn_matmul(jnp.zeros((4, 3)), jnp.zeros((5, 3)))
  with pytest.raises(ValueError, match='computes in float32'):
    native.tn_matmul(jnp.zeros((4, 3), jnp.bfloat16), jnp.zeros((4, 3)))


_TN_SHARDED = r'''
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rqvae_jax import native
mesh = Mesh(np.array(jax.devices()), ('data',))
rng = np.random.default_rng(0)
a = jnp.asarray(rng.normal(size=(2048, 12)), jnp.float32)
b = jnp.asarray(rng.normal(size=(2048, 40)), jnp.float32)
rows = NamedSharding(mesh, P('data'))
fn = jax.jit(native.tn_matmul)
got = fn(jax.device_put(a, rows), jax.device_put(b, rows))
hlo = fn.lower(jax.device_put(a, rows), jax.device_put(b, rows)).compile().as_text()
calls = [l for l in hlo.splitlines() if 'custom-call(' in l and 'tn_matmul' in l]
want = np.asarray(a, np.float64).T @ np.asarray(b, np.float64)
print(json.dumps({{
    'devices': len(jax.devices()), 'diff': float(np.max(np.abs(np.asarray(got) - want))),
    'gathers': hlo.count('all-gather('), 'reduces': hlo.count('all-reduce('),
    'local_rows': all('f32[1024,12]' in l for l in calls), 'calls': len(calls),
    'spec': str(got.sharding.spec)}}))
'''


def test_tn_matmul_sums_the_devices_shards():
  """Rows sharded over two devices: each device's kernel runs on its own half and the
  partial products are summed (an all-reduce), no rows gathered."""
  info = run_on_two_cpu_devices(_TN_SHARDED)
  assert info['devices'] == 2 and info['diff'] < 1e-3, info
  assert info['gathers'] == 0 and info['reduces'] >= 1, info
  assert info['calls'] == 1 and info['local_rows'], info


def _conv3_reference(x, w):
  """float64 y[b, t, o] = sum_k sum_c x[b, t + k - 1, c] w[k, c, o], zeros outside."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))
  return sum(xp[:, k:k + x.shape[1]] @ w[k] for k in range(3))


@pytest.mark.parametrize('shape', [(2, 88200 // 50, 1, 16), (2, 301, 16, 16), (2, 301, 16, 4),
                                   (3, 1, 2, 17), (1, 2, 5, 33), (2, 7, 64, 64), (1, 9, 3, 5)])
def test_conv3_kernel_matches_the_convolution(shape):
  """The stride-1, kernel-3 convolution kernel against a float64 sum, on lengths of 1 and 2
  (every frame is a border), a length that is no multiple of the register tile, and output
  channel counts below, at and above one register (4, 5, 16, 17, 33, 64)."""
  if not native.usable():
    pytest.skip('the CPU kernels are not built here')
  b, length, ci, co = shape
  rng = np.random.default_rng(sum(shape))
  x = rng.normal(size=(b, length, ci)).astype(np.float32)
  w = rng.normal(size=(3, ci, co)).astype(np.float32)
  got = np.asarray(jax.jit(native.conv3)(jnp.asarray(x), jnp.asarray(w)))
  assert got.shape == (b, length, co)
  np.testing.assert_allclose(got, _conv3_reference(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(3 * ci))


def test_blocks_conv_uses_the_kernel_for_small_channels_with_xlas_gradient():
  """blocks.conv sends a float32 stride-1 kernel-3 layer of <= 64 channels to the kernel (a
  custom call in the program) and not a wider one; the value and both gradients equal XLA's
  convolution's."""
  if not native.usable():
    pytest.skip('the CPU kernels are not built here')
  from rqvae_jax import blocks
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 203, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 16, 4)) * 0.2, jnp.float32)
  loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))
  ours = lambda x, w: blocks.conv(x, w, 1, 1)
  xla = lambda x, w: blocks._xla_conv(x, w, 1, 1)
  text = jax.jit(ours).lower(x, w).as_text()
  assert 'conv3' in text and 'convolution' not in text
  wide = jnp.zeros((3, 16, 128), jnp.float32)
  assert 'conv3' not in jax.jit(ours).lower(x, wide).as_text()
  np.testing.assert_allclose(np.asarray(jax.jit(ours)(x, w)), np.asarray(jax.jit(xla)(x, w)),
                             rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(xla), argnums=(0, 1)))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r'x must be \(B, L, C_in\) and kernel \(3, C_in, C_out\)'):
    native.conv3(jnp.zeros((2, 5, 3)), jnp.zeros((3, 4, 8)))
  with pytest.raises(ValueError, match='computes in float32'):
    native.conv3(jnp.zeros((2, 5, 3), jnp.bfloat16), jnp.zeros((3, 3, 8)))


_CONV3_SHARDED = r'''
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rqvae_jax import native
mesh = Mesh(np.array(jax.devices()), ('data',))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(4, 50, 16)), jnp.float32)
w = jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32)
rows = NamedSharding(mesh, P('data'))
fn = jax.jit(native.conv3)
xs = jax.device_put(x, rows)
got = fn(xs, w)
hlo = fn.lower(xs, w).compile().as_text()
calls = [l for l in hlo.splitlines() if 'custom-call(' in l and 'conv3' in l]
xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (0, 0)))
want = sum(xp[:, k:k + 50] @ np.asarray(w[k], np.float64) for k in range(3))
print(json.dumps({{
    'devices': len(jax.devices()), 'diff': float(np.max(np.abs(np.asarray(got) - want))),
    'gathers': hlo.count('all-gather('), 'local': all('f32[2,50,16]' in l for l in calls),
    'calls': len(calls), 'spec': str(got.sharding.spec)}}))
'''


def test_conv3_runs_per_batch_shard():
  """A batch sharded over two devices: each device convolves its own half, nothing gathered."""
  info = run_on_two_cpu_devices(_CONV3_SHARDED)
  assert info['devices'] == 2 and info['diff'] < 1e-4, info
  assert info['gathers'] == 0 and info['calls'] == 1 and info['local'], info
  assert 'data' in info['spec'], info


_OTHER_ISA = r'''
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np, jax, jax.numpy as jnp
from rqvae_jax import lstm, native, native_lstm, quantizer
status = native.load()
rng = np.random.default_rng(0)
xs = jnp.asarray(rng.normal(size=(9, 2, 3, 160)), jnp.float32)            # H = 40
w = jnp.asarray(rng.normal(size=(2, 160, 40)) / np.sqrt(40), jnp.float32)
loss = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))
got = jax.jit(loss(native_lstm.recurrence))(xs, w)
want = jax.jit(loss(lambda x, w: lstm._recurrence(x, w, 1)))(xs, w)
a = rng.normal(size=(1100, 7)).astype(np.float32); b = rng.normal(size=(1100, 53)).astype(np.float32)
tn = np.asarray(jax.jit(native.tn_matmul)(jnp.asarray(a), jnp.asarray(b)))
x = rng.normal(size=(130, 20)).astype(np.float32); c = rng.normal(size=(37, 20)).astype(np.float32)
codes = np.asarray(jax.jit(quantizer.nearest_code)(jnp.asarray(x), jnp.asarray(c)))
exact = np.argmin(np.sum(c.astype(np.float64) ** 2, -1) - 2 * x.astype(np.float64) @ c.T, -1)
cs = rng.normal(size=(2, 70, 20)).astype(np.float32)                   # two full tiles + 6
bits, norms = jax.jit(native.search_table)(jnp.asarray(cs))
want_bits = np.swapaxes(np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(cs, jnp.bfloat16), jnp.uint16)), 1, 2)
table = {{'codebook_t': jnp.asarray(bits[1]), 'norms': norms[1]}}
screened = np.asarray(jax.jit(quantizer.nearest_code)(jnp.asarray(x), jnp.asarray(cs[1]), table=table))
exact_s = np.argmin(np.sum(cs[1].astype(np.float64) ** 2, -1) - 2 * x.astype(np.float64) @ cs[1].T, -1)
cx = rng.normal(size=(2, 23, 16)).astype(np.float32); cw = rng.normal(size=(3, 16, 21)).astype(np.float32)
cy = np.asarray(jax.jit(native.conv3)(jnp.asarray(cx), jnp.asarray(cw)))
cxp = np.pad(cx.astype(np.float64), ((0, 0), (1, 1), (0, 0)))
cwant = sum(cxp[:, k:k + 23] @ cw[k].astype(np.float64) for k in range(3))
print(json.dumps({{'available': status.available, 'library': status.library,
    'conv3': float(np.max(np.abs(cy - cwant))),
    'table': bool((np.asarray(bits) == want_bits).all()) and float(np.max(np.abs(np.asarray(norms) - np.sum(cs.astype(np.float64) ** 2, -1)))) < 1e-4,
    'screened': bool((screened == exact_s).all()),
    'lstm': max(float(jnp.max(jnp.abs(g - r))) for g, r in zip(got, want)),
    'tn': float(np.max(np.abs(tn - a.astype(np.float64).T @ b))), 'codes': bool((codes == exact).all())}}))
'''


@pytest.mark.skipif(platform.machine() not in ('x86_64', 'AMD64') or shutil.which('g++') is None,
                    reason='builds the kernels for other x86-64 levels with g++')
@pytest.mark.parametrize('march', ['x86-64-v3', 'x86-64'])
def test_kernels_built_for_avx2_and_sse2_compute_the_same(tmp_path, march):
  """The kernels compiled for AVX2 (x86-64-v3) and plain SSE2 (x86-64), as a CPU without
  AVX-512 builds them (simd.h's narrower vectors): the LSTM recurrence and its gradients
  against the scan, the weight-gradient product, the nearest codes (plain and screened), the
  search table, the small convolution. (A later -march wins over the build's -march=native.)"""
  wrapper = tmp_path / 'cxx'
  wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("g++")} "$@" -march={march}\n')
  wrapper.chmod(0o755)
  env = dict(os.environ, CXX=str(wrapper), RQVAE_JAX_NATIVE_CACHE=str(tmp_path / 'cache'))
  proc = subprocess.run([sys.executable, '-c', _OTHER_ISA.format(repo=str(REPO))], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info['available'] and str(tmp_path) in info['library'], info
  assert info['lstm'] < 1e-4 and info['tn'] < 1e-3 and info['codes'], info
  assert info['table'] and info['screened'] and info['conv3'] < 1e-4, info
