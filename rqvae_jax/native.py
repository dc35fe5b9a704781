"""The compiled CPU kernels (rqvae_jax/native/*.cc) behind jax.ffi: build, load, call.

Kernels where XLA's CPU code was measurably slow (README: Performance):
  * the BiLSTM recurrence (native/lstm_cpu.cc; rqvae_jax/native_lstm.py): each
    direction's 441 steps on its own thread instead of several small thunks a step;
  * the nearest-code search's argmin (native/nearest_cpu.cc; quantizer.nearest_code): one
    pass over the plain matmul's output instead of a fused distance epilogue and three
    reductions; and, with a search table, the screened search (`nearest_code_screened`):
    a bfloat16 dot's result checked against a proven error bound, the codes it cannot rule
    out scored exactly;
  * that table (native/nearest_cpu.cc, `search_table`): the codebooks' bfloat16 bits
    transposed and their norms in one pass, cheap enough to rebuild in every training step;
  * a convolution's weight gradient x^T dy (native/weight_grad_cpu.cc, `tn_matmul`): read in
    the arrays' own layout, where XLA's dot had them written transposed first;
  * stride-1, kernel-3 convolutions of few channels (native/conv_cpu.cc, `conv3`), where
    XLA's convolution ran at a fraction of the cores' peak.
All have portable XLA paths they are tested against, used on accelerators and wherever
the kernels cannot be built.

The C++ sources ship with the package and are compiled on first use into one library with
the machine's C++ compiler (`$CXX`, else `c++` / `g++` / `clang++`), for this CPU
(`-march=native`), against the XLA FFI headers jaxlib ships. The library is cached under
`$RQVAE_JAX_NATIVE_CACHE` (default `~/.cache/rqvae_jax/native`), keyed by the sources,
compiler, flags, jaxlib version and CPU, so a later process loads it in milliseconds. No
compiler, or a failed build: the XLA paths run, with one warning that says why;
`RQVAE_JAX_NATIVE=0` turns the kernels off.
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
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

NATIVE_DIR = pathlib.Path(__file__).parent / 'native'
SOURCES = (NATIVE_DIR / 'lstm_cpu.cc', NATIVE_DIR / 'nearest_cpu.cc',
           NATIVE_DIR / 'weight_grad_cpu.cc', NATIVE_DIR / 'conv_cpu.cc')
HEADERS = (NATIVE_DIR / 'parallel.h', NATIVE_DIR / 'simd.h')
# FFI target (without the library's prefix) -> the symbol the library exports for it.
_TARGETS = {'lstm_forward': 'RqvaeLstmForward', 'lstm_inference': 'RqvaeLstmInference',
            'lstm_backward': 'RqvaeLstmBackward', 'nearest_code': 'RqvaeNearestCode',
            'nearest_code_screened': 'RqvaeNearestCodeScreened',
            'search_table': 'RqvaeSearchTable', 'tn_matmul': 'RqvaeTnMatmul',
            'conv3': 'RqvaeConv3'}
OFF = 'RQVAE_JAX_NATIVE=0'                 # the reason load() gives when turned off
# -fno-trapping-math lets GCC vectorise floor (the exp's range reduction); the kernels
# never read the FP exception flags.
_FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC', '-fno-math-errno', '-fno-trapping-math')
_NATIVE_ARCH = ('-march=native',)


@dataclasses.dataclass(frozen=True)
class Status:
  """Whether the kernels are loaded and registered, and if not, why (for the warning)."""
  available: bool
  reason: str = ''
  library: str = ''
  target_prefix: str = ''   # the FFI targets' names: prefix + a key of _TARGETS


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
  """Compiles SOURCES into `out` (atomically); returns '' or the compiler's complaint."""
  include = jax.ffi.include_dir()
  out.parent.mkdir(parents=True, exist_ok=True)
  errors = []
  for arch in (_NATIVE_ARCH, ()):                   # -march=native, then without it
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, *arch, f'-I{include}', *map(str, SOURCES), '-o', tmp]
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
  """Where the library for these sources, compiler, jaxlib and CPU is (or will be) cached."""
  try:
    version = subprocess.run([compiler, '--version'], capture_output=True, text=True,
                             timeout=60, check=False).stdout
  except (OSError, subprocess.TimeoutExpired):
    version = ''
  import jaxlib  # pylint: disable=g-import-not-at-top
  key = hashlib.sha256()
  for part in (*(p.read_bytes() for p in SOURCES + HEADERS), compiler.encode(), version.encode(),
               ' '.join(_FLAGS + _NATIVE_ARCH).encode(), jaxlib.__version__.encode(),
               platform.machine().encode(), _cpu_signature().encode()):
    key.update(part)
    key.update(b'\0')
  return cache_dir() / f'rqvae_native-{key.hexdigest()[:16]}.so'


@functools.lru_cache(maxsize=None)
def load() -> Status:
  """Builds (once per machine), loads and registers the kernels; never raises."""
  if os.environ.get('RQVAE_JAX_NATIVE', '1') == '0':
    return Status(False, OFF)
  compiler = find_compiler()
  if compiler is None:
    return Status(False, 'no C++ compiler found (set CXX, or install g++ or clang++)')
  try:
    path = library_path(compiler)
    if not path.exists():
      logging.info('Building the CPU kernels with %s into %s', compiler, path)
      complaint = _build(compiler, path)
      if complaint:
        return Status(False, complaint)
    lib = ctypes.cdll.LoadLibrary(str(path))
    # XLA refuses a second handler under a name, so each library file registers its own
    # names (a process that loads two, e.g. the tests with two caches, keeps both).
    prefix = f'rqvae_jax_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}_'
    for kind, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(prefix + kind, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')
  except (OSError, AttributeError, RuntimeError, ValueError) as e:
    return Status(False, f'{type(e).__name__}: {e}')
  return Status(True, library=str(path), target_prefix=prefix)


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
  logging.warning('The compiled CPU kernels are not available, so the BiLSTM runs as a '
                  'lax.scan and the nearest-code search as XLA reductions (slower on the '
                  'CPU). Why: %s', reason)


def usable() -> bool:
  """True when the kernels are loaded and the default backend is the CPU; warns once (with
  the reason) when they cannot be built."""
  if jax.default_backend() != 'cpu':
    return False
  status = load()
  if not status.available and status.reason != OFF:
    _warn_once(status.reason)
  return status.available


def ffi(kind: str, out_shapes, *args):
  """The kernel `kind` (a key of _TARGETS) on args, for this device's data only."""
  status = load()
  if not status.available:
    raise RuntimeError(f'The compiled CPU kernels are not available: {status.reason}')
  return jax.ffi.ffi_call(status.target_prefix + kind, out_shapes, vmap_method='sequential')(
      *args)


def partitioned(kind: str, rule: str, batch_factor: str, result_shapes):
  """`ffi(kind)` as a custom_partitioning op, per batch shard.

  Under a sharded jit (several devices or processes) each device runs the kernel on its own
  shard of the batch factor with every other factor replicated, instead of GSPMD gathering
  the whole batch to every device. On one device it lowers to the plain custom call (and
  stays in the persistent compilation cache). `rule`: the Shardy rule over the arguments
  and results (e.g. 'n k, k -> n'); `result_shapes(args)`: the results' ShapeDtypeStructs.
  A rule whose results lack the batch factor is a sum over it (e.g. 'n m, n p -> m p'):
  each device's partial result is summed over the batch's mesh axes.
  """
  # Imported here: only the CPU kernels need this experimental module, so a JAX that moved it
  # (a GPU image newer than the lock) still imports the model and runs everything else.
  from jax.experimental.custom_partitioning import custom_partitioning  # pylint: disable=g-import-not-at-top
  operands, results = (part.split(',') for part in rule.split('->'))
  arg_factors = [f.split() for f in operands]
  out_factors = [f.split() for f in results]
  summed = not any(batch_factor in f for f in out_factors)   # results are sums over it

  @custom_partitioning
  def call(*args):
    return ffi(kind, result_shapes(args), *args)

  def batch_axes(arg_shapes):
    """The mesh axes the batch factor is sharded over (None: not sharded)."""
    for factors, shape in zip(arg_factors, arg_shapes):
      if batch_factor in factors:
        spec = getattr(shape.sharding, 'spec', P())
        axis = factors.index(batch_factor)
        return spec[axis] if len(spec) > axis else None
    return None

  def shardings(mesh, arg_shapes):
    batch = batch_axes(arg_shapes)
    spec = lambda factors: NamedSharding(
        mesh, P(*(batch if f == batch_factor else None for f in factors)))
    args = tuple(spec(f) for f in arg_factors)
    outs = tuple(spec(f) for f in out_factors)
    return args, outs if len(outs) > 1 else outs[0]

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return shardings(mesh, arg_shapes)[1]

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    args, outs = shardings(mesh, arg_shapes)
    batch = batch_axes(arg_shapes)

    def lower(*local):
      result = ffi(kind, result_shapes(local), *local)
      return jax.lax.psum(result, batch) if summed and batch is not None else result
    return mesh, lower, outs, args

  # Every factor but the batch, in order of appearance (Shardy wants them sorted).
  replicated = tuple(f for f in dict.fromkeys(rule.replace(',', ' ').replace('->', ' ').split())
                     if f != batch_factor)
  call.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=rule, need_replication_factors=replicated)
  return call


@functools.lru_cache(maxsize=None)
def _nearest_call():
  return partitioned('nearest_code', 'n k, k -> n', 'n',
                     lambda args: jax.ShapeDtypeStruct(args[0].shape[:1], jnp.int32))


def nearest_code_from_cross(cross: jax.Array, norms: jax.Array) -> jax.Array:
  """argmin_k(norms[k] - 2 cross[n, k]) per row, the first index of the minimum (as
  jnp.argmin): (N, K) float32, (K,) float32 -> (N,) int32. Not differentiable (an index)."""
  if cross.ndim != 2 or norms.shape != cross.shape[1:]:
    raise ValueError(f'cross must be (N, K) and norms (K,), got {cross.shape} and '
                     f'{norms.shape}.')
  # An index has no gradient; stop_gradient keeps autodiff (the codebook's tangent in a
  # training step) away from the kernel, which has no JVP rule.
  cross, norms = (jax.lax.stop_gradient(a.astype(jnp.float32)) for a in (cross, norms))
  return _nearest_call()(cross, norms)


def nearest_code_screened(cross: jax.Array, norms: jax.Array, x: jax.Array,
                          codebook: jax.Array) -> jax.Array:
  """The nearest code of each row of x, screened by an approximate cross product: `cross`
  (N, K) is bf16(x) . bf16(codebook) accumulated in float32, `norms` (K,) the float32
  ||codebook||^2; the kernel bounds the approximation's error, scores the codes the bound
  cannot rule out exactly from x (N, D) and the codebook (K, D), and returns (N,) int32 the
  argmin of the exact distances (the first index on ties; native/nearest_cpu.cc says why the
  bound holds). Not differentiable (an index)."""
  n, k = cross.shape if cross.ndim == 2 else (None, None)
  if (cross.ndim != 2 or norms.shape != (k,) or x.ndim != 2 or x.shape[0] != n
      or codebook.shape != (k, x.shape[1])):
    raise ValueError(f'cross must be (N, K), norms (K,), x (N, D) and codebook (K, D), got '
                     f'{cross.shape}, {norms.shape}, {x.shape} and {codebook.shape}.')
  args = (jax.lax.stop_gradient(a.astype(jnp.float32)) for a in (cross, norms, x, codebook))
  return _screened_call()(*args)


def search_table(codebooks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The screened search's table of float32 codebooks (Q, K, D), as
  `quantizer.search_table` defines it: (bfloat16 bits (Q, D, K) uint16, norms (Q, K)
  float32), in one pass (native/nearest_cpu.cc says why). Not differentiable."""
  if codebooks.ndim != 3:
    raise ValueError(f'codebooks must be (Q, K, D), got {codebooks.shape}.')
  return _table_call()(jax.lax.stop_gradient(codebooks.astype(jnp.float32)))


@functools.lru_cache(maxsize=None)
def _table_call():
  def shapes(args):
    q, k, d = args[0].shape
    return (jax.ShapeDtypeStruct((q, d, k), jnp.uint16), jax.ShapeDtypeStruct((q, k), jnp.float32))
  return partitioned('search_table', 'q k d -> q d k, q k', 'q', shapes)


@functools.lru_cache(maxsize=None)
def _screened_call():
  return partitioned('nearest_code_screened', 'n k, k, n d, k d -> n', 'n',
                     lambda args: jax.ShapeDtypeStruct(args[0].shape[:1], jnp.int32))


@functools.lru_cache(maxsize=None)
def _tn_call():
  return partitioned('tn_matmul', 'n m, n p -> m p', 'n',
                     lambda args: jax.ShapeDtypeStruct((args[0].shape[1], args[1].shape[1]),
                                                       jnp.float32))


def tn_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a^T b for float32 a (N, M) and b (N, P): (M, P), accumulated in float32 (a weight
  gradient: native/weight_grad_cpu.cc says why). Summed over the devices a sharded N is
  split across. Not differentiable (it is itself a gradient)."""
  if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
    raise ValueError(f'a must be (N, M) and b (N, P), got {a.shape} and {b.shape}.')
  if a.dtype != jnp.float32 or b.dtype != jnp.float32:
    raise ValueError(f'The weight-gradient kernel computes in float32, got {a.dtype} and '
                     f'{b.dtype}.')
  return _tn_call()(jax.lax.stop_gradient(a), jax.lax.stop_gradient(b))


@functools.lru_cache(maxsize=None)
def _conv3_call():
  return partitioned('conv3', 'b l c, k c o -> b l o', 'b',
                     lambda args: jax.ShapeDtypeStruct(args[0].shape[:2] + args[1].shape[2:],
                                                       jnp.float32))


def conv3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A stride-1, kernel-3, zero-padding-1 convolution of float32 channels-last x (B, L, C_in)
  with kernel (3, C_in, C_out): (B, L, C_out) (native/conv_cpu.cc says where it pays). Not
  differentiable here (`blocks.conv` gives it XLA's convolution gradient)."""
  if x.ndim != 3 or kernel.ndim != 3 or kernel.shape[:2] != (3, x.shape[2]):
    raise ValueError(f'x must be (B, L, C_in) and kernel (3, C_in, C_out), got {x.shape} and '
                     f'{kernel.shape}.')
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise ValueError(f'The convolution kernel computes in float32, got {x.dtype} and '
                     f'{kernel.dtype}.')
  return _conv3_call()(jax.lax.stop_gradient(x), jax.lax.stop_gradient(kernel))
