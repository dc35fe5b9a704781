"""The LSTM recurrence as a compiled CPU kernel (rqvae_jax/native/lstm_cpu.cc) behind jax.ffi.

Why: on the CPU, XLA runs the BiLSTM's 441 sequential steps as several small thunks each,
with both directions' 2 MB of recurrent weights in one matmul; the kernel runs each
direction's whole sequence on its own thread (README: Performance has the measurements).
It is what `BiLSTM(impl='auto')` uses on the CPU when it builds; `impl='scan'` is the
portable path it is tested against (tests/test_native_lstm.py).

The C++ source ships with the package and is compiled on first use with the machine's C++
compiler (`$CXX`, else `c++` / `g++` / `clang++`), for this CPU (`-march=native`), against
the XLA FFI headers jaxlib ships. The library is cached under `$RQVAE_JAX_NATIVE_CACHE`
(default `~/.cache/rqvae_jax/native`), keyed by the source, compiler, flags, jaxlib
version and CPU, so a second process loads it in milliseconds. No compiler, or a failed
build: `impl='auto'` falls back to the scan with one warning that says why;
`RQVAE_JAX_NATIVE_LSTM=0` turns the kernel off.
"""

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

SOURCE = pathlib.Path(__file__).parent / 'native' / 'lstm_cpu.cc'
_TARGETS = {'forward': 'RqvaeLstmForward', 'inference': 'RqvaeLstmInference',
            'backward': 'RqvaeLstmBackward'}
# -fno-trapping-math lets GCC vectorise floor (the exp's range reduction); the kernel
# never reads the FP exception flags.
_FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC', '-fno-math-errno', '-fno-trapping-math')
_NATIVE_ARCH = ('-march=native',)


@dataclasses.dataclass(frozen=True)
class Status:
  """Whether the kernel is loaded and registered, and if not, why (for the warning)."""
  available: bool
  reason: str = ''
  library: str = ''
  target_prefix: str = ''   # the FFI targets' names: prefix + forward / inference / backward


def cache_dir() -> pathlib.Path:
  root = os.environ.get('RQVAE_JAX_NATIVE_CACHE')
  if root:
    return pathlib.Path(root)
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'rqvae_jax' / 'native'


def find_compiler() -> str | None:
  """$CXX if set (even when it is not found: the user asked for it), else the first of
  c++ / g++ / clang++ on PATH."""
  if os.environ.get('CXX'):
    return os.environ['CXX']
  for name in ('c++', 'g++', 'clang++'):
    path = shutil.which(name)
    if path:
      return path
  return None


def _cpu_signature() -> str:
  """The CPU's model and flags: a library built with -march=native is for this CPU only."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      lines = [l for l in f if l.startswith(('model name', 'flags', 'Features', 'CPU part'))]
    return ''.join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


def _build(compiler: str, out: pathlib.Path) -> str:
  """Compiles SOURCE into `out` (atomically); returns '' or the compiler's complaint."""
  include = jax.ffi.include_dir()
  out.parent.mkdir(parents=True, exist_ok=True)
  errors = []
  for arch in (_NATIVE_ARCH, ()):                   # -march=native, then without it
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, *arch, f'-I{include}', str(SOURCE), '-o', tmp]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
      os.unlink(tmp)
      return f'{" ".join(cmd)} could not run: {e}'
    if proc.returncode == 0:
      os.replace(tmp, out)
      return ''
    os.unlink(tmp)
    errors.append(f'{" ".join(cmd)} failed:\n{proc.stderr[-2000:]}')
  return '\n'.join(errors)


def library_path(compiler: str) -> pathlib.Path:
  """Where the library for this source, compiler, jaxlib and CPU is (or will be) cached."""
  try:
    version = subprocess.run([compiler, '--version'], capture_output=True, text=True,
                             timeout=60, check=False).stdout
  except (OSError, subprocess.TimeoutExpired):
    version = ''
  import jaxlib  # pylint: disable=g-import-not-at-top
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), compiler.encode(), version.encode(),
               ' '.join(_FLAGS + _NATIVE_ARCH).encode(), jaxlib.__version__.encode(),
               platform.machine().encode(), _cpu_signature().encode()):
    key.update(part)
    key.update(b'\0')
  return cache_dir() / f'lstm_cpu-{key.hexdigest()[:16]}.so'


@functools.lru_cache(maxsize=None)
def load() -> Status:
  """Builds (once per machine), loads and registers the kernel; never raises."""
  if os.environ.get('RQVAE_JAX_NATIVE_LSTM', '1') == '0':
    return Status(False, 'RQVAE_JAX_NATIVE_LSTM=0')
  compiler = find_compiler()
  if compiler is None:
    return Status(False, 'no C++ compiler found (set CXX, or install g++ or clang++)')
  try:
    path = library_path(compiler)
    if not path.exists():
      logging.info('Building the CPU LSTM kernel with %s into %s', compiler, path)
      complaint = _build(compiler, path)
      if complaint:
        return Status(False, complaint)
    lib = ctypes.cdll.LoadLibrary(str(path))
    # XLA refuses a second handler under a name, so each library file registers its own
    # names (a process that loads two, e.g. the tests with two caches, keeps both).
    prefix = f'rqvae_jax_lstm_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}_'
    for kind, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(prefix + kind, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')
  except (OSError, AttributeError, RuntimeError, ValueError) as e:
    return Status(False, f'{type(e).__name__}: {e}')
  return Status(True, library=str(path), target_prefix=prefix)


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
  logging.warning('The CPU LSTM kernel is not available, so the BiLSTM runs as a lax.scan '
                  '(slower on the CPU). Why: %s', reason)


def usable() -> bool:
  """True when the kernel is loaded; warns once (with the reason) when it cannot be."""
  status = load()
  if not status.available and status.reason != 'RQVAE_JAX_NATIVE_LSTM=0':
    _warn_once(status.reason)
  return status.available


def _ffi(kind: str, out_shapes, *args):
  status = load()
  if not status.available:
    raise RuntimeError(f'The CPU LSTM kernel is not available: {status.reason}')
  return jax.ffi.ffi_call(status.target_prefix + kind, out_shapes, vmap_method='sequential')(
      *args)


# Per kernel: its Shardy rule (t time, d direction, b batch, h hidden, g = 4h gates) and
# its results' shapes from its arguments'.
_RULES = {
    'inference': 't d b g, d h g -> t d b h',
    'forward': 't d b g, d h g -> t d b h, t d b h, t d b g',
    'backward': 't d b h, t d b h, t d b g, d g h -> t d b g',
}


def _result_shapes(kind, args):
  if kind == 'backward':
    return jax.ShapeDtypeStruct(args[2].shape, jnp.float32)
  t, d, b, g4 = args[0].shape
  state = jax.ShapeDtypeStruct((t, d, b, g4 // 4), jnp.float32)
  if kind == 'inference':
    return state
  return state, state, jax.ShapeDtypeStruct((t, d, b, g4), jnp.float32)


@functools.lru_cache(maxsize=None)
def _partitioned(kind: str):
  """The kernel as a custom_partitioning op: under a sharded jit (several devices or
  processes) each device runs it on its own batch shard (axis 2) with replicated weights,
  instead of GSPMD gathering the whole batch to every device. On one device it lowers to
  the plain custom call (and stays in the persistent compilation cache)."""

  @custom_partitioning
  def call(*args):
    return _ffi(kind, _result_shapes(kind, args), *args)

  def shardings(mesh, arg_shapes):
    spec = getattr(arg_shapes[0].sharding, 'spec', P())
    batch = spec[2] if len(spec) > 2 else None
    batched = NamedSharding(mesh, P(None, None, batch, None))
    args = tuple(batched if a.ndim == 4 else NamedSharding(mesh, P()) for a in arg_shapes)
    results = batched if kind != 'forward' else (batched,) * 3
    return args, results

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return shardings(mesh, arg_shapes)[1]

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    args, results = shardings(mesh, arg_shapes)
    lower = lambda *local: _ffi(kind, _result_shapes(kind, local), *local)
    return mesh, lower, results, args

  rule = _RULES[kind]
  # All factors but the batch, in their order of appearance (Shardy wants them sorted).
  replicated = tuple(f for f in dict.fromkeys(rule.replace(',', ' ').split()) if f in 'tdhg')
  call.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=rule, need_replication_factors=replicated)
  return call


def _call(kind: str, *args):
  return _partitioned(kind)(*args)


def _check(xs, w_hh):
  t, d, b, g4 = xs.shape
  if xs.dtype != jnp.float32 or w_hh.dtype != jnp.float32:
    raise ValueError(f'The CPU LSTM kernel computes in float32, got xs {xs.dtype} and '
                     f'w_hh {w_hh.dtype}; use BiLSTM(impl="scan") for other dtypes.')
  if w_hh.shape != (d, g4, g4 // 4):
    raise ValueError(f'w_hh must be (D, 4H, H) = {(d, g4, g4 // 4)} for xs {xs.shape}, '
                     f'got {w_hh.shape}.')
  return t, d, b, g4 // 4


@jax.custom_vjp
def recurrence(xs: jax.Array, w_hh: jax.Array) -> jax.Array:
  """The kernel's counterpart of `lstm._recurrence`: (T, D, B, 4H), (D, 4H, H) -> (T, D, B, H).

  Same contract (input projections with both biases, direction 1 time-reversed, zero
  initial state, PyTorch gate order); float32 only; reverse-mode differentiable.
  """
  _check(xs, w_hh)
  return _call('inference', xs, jnp.swapaxes(w_hh, 1, 2))


def _recurrence_fwd(xs, w_hh):
  _check(xs, w_hh)
  hs, cs, acts = _call('forward', xs, jnp.swapaxes(w_hh, 1, 2))
  return hs, (hs, cs, acts, w_hh)


def _recurrence_bwd(residuals, dhs):
  hs, cs, acts, w_hh = residuals
  dgates = _call('backward', dhs.astype(jnp.float32), cs, acts, w_hh)
  # dW_hh as one matmul over all steps (the kernel only walks the recurrence).
  h_prev = jnp.concatenate([jnp.zeros_like(hs[:1]), hs[:-1]], axis=0)
  dw_hh = jnp.einsum('tdbg,tdbh->dgh', dgates, h_prev, preferred_element_type=jnp.float32)
  return dgates, dw_hh


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
