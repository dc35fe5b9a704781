"""Reads and writes PyTorch's checkpoint files (`torch.save`'s zip format) without torch.

Why not `torch.load`: torch is not a dependency of this project, and a checkpoint is a
pickle, which can run any code it names when loaded. Reading here goes through a restricted
unpickler that resolves only an allowlist of names (tensor and storage rebuilders,
OrderedDict, a few inert builtins) and refuses anything else with an error naming it. A
published Lightning checkpoint also pickles the original code's `Configuration` object and
its enums (`save_hyperparameters`), which torch's own `weights_only=True` loading refuses;
those names, and Lightning's `AttributeDict`, load here as inert `PickledObject` records:
their classes are never imported or called.

Tensors come back as NumPy arrays; `save` writes a dict of arrays in the same zip layout
(`<name>/data.pkl`, `<name>/data/<key>`, `byteorder`, `version`) that `torch.load`,
including `weights_only=True`, reads.
"""
import _compat_pickle
import collections
import io
import pickle
import sys
import zipfile
from typing import Any, Dict

import ml_dtypes
import numpy as np

_STORAGES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}
_STORAGE_OF = {np.dtype(v): k for k, v in _STORAGES.items()}

# Metadata classes of the original code and of Lightning, kept as inert records.
_RECORDS = {
    ('config', 'Configuration'),
    ('constants', 'LearningHyperParameter'), ('constants', 'Autoencoders'),
    ('constants', 'Transformers'), ('constants', 'Optimizers'),
    ('lightning.fabric.utilities.data', 'AttributeDict'),
    ('lightning_fabric.utilities.data', 'AttributeDict'),
    ('pytorch_lightning.utilities.parsing', 'AttributeDict'),
}


class UnsafeCheckpointError(ValueError):
  """The file pickles something outside the allowlist; nothing of it was executed."""


class CheckpointFormatError(ValueError):
  """The file is not a PyTorch zip checkpoint, or its tensor records are malformed."""


class PickledObject:
  """An allowlisted metadata object, kept as data: `pickled_as` ('module.Name'), the
  arguments it was rebuilt with, its pickled state and items. Never the real class."""
  pickled_as = ''

  def __new__(cls, *args):  # pickle's NEWOBJ calls __new__ alone, REDUCE calls the class
    self = super().__new__(cls)
    self.args, self.state, self.items = args, None, {}
    return self

  def __init__(self, *args):
    pass

  def __setitem__(self, key, value):
    self.items[key] = value

  def __repr__(self):
    return f'<pickled {self.pickled_as}{self.args!r}>'


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGES[name])


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None):
  """torch._utils._rebuild_tensor_v2 as a NumPy copy, bounds-checked against the storage."""
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise CheckpointFormatError('A tensor record does not point at a storage.')
  if not all(isinstance(v, int) for v in (offset, *size, *stride)) or len(size) != len(stride):
    raise CheckpointFormatError(f'Malformed tensor record: size {size!r}, stride {stride!r}.')
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  if offset < 0 or min(stride, default=0) < 0:
    raise CheckpointFormatError('A tensor record has a negative offset or stride.')
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.shape[0]:
    raise CheckpointFormatError(f'A tensor record reaches element {last} of a storage of '
                                f'{storage.shape[0]}.')
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size),
      strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view, copy=True, order='C')


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  return data


def _numpy_scalar(dtype, data):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise UnsafeCheckpointError('Refusing a pickled NumPy scalar of an object dtype.')
  return np.frombuffer(data, dtype, count=1)[0]


def _numpy_dtype(name, align=False, copy=False):
  dtype = np.dtype(name)
  if dtype.hasobject:
    raise UnsafeCheckpointError('Refusing a pickled NumPy object dtype.')
  return dtype


_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch', 'Size'): tuple,
    ('torch', 'device'): lambda *args: 'device(' + ', '.join(map(repr, args)) + ')',
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy', 'dtype'): _numpy_dtype,
}


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """The pure-Python unpickler with an allowlist for globals and a restricted BUILD.

  Python's BUILD opcode calls `__setstate__` of whatever object is on the stack (NumPy's
  can reinterpret raw bytes as object pointers), so BUILD is allowed only on the inert
  records and on OrderedDicts (whose instance dict PyTorch pickles, e.g. `_metadata`).
  """
  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, data: bytes, read_record, where: str, big_endian: bool = False):
    super().__init__(io.BytesIO(data))
    self._read_record, self._where, self._storages = read_record, where, {}
    self._big_endian = big_endian

  def find_class(self, module, name):
    if self.proto < 3:  # Python 2 names, as protocol 2 writes builtins ('__builtin__.set')
      module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
      module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'torch' and name in _STORAGES:
      return _StorageType(name)
    if (module, name) in _RECORDS:
      return type(name, (PickledObject,), {'pickled_as': f'{module}.{name}'})
    raise UnsafeCheckpointError(
        f'{self._where} pickles {module}.{name}, which is not a tensor, a storage or a known '
        'metadata class; refusing to load it (nothing in it was executed). If you trust the '
        "file, extract its state dict with torch (torch.load(path, weights_only=False)"
        "['state_dict']), save that with torch.save, and import the new file.")

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != 'storage'
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
        or not isinstance(pid[4], int)):
      raise CheckpointFormatError(f'{self._where}: unknown persistent record {pid!r}.')
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      raw = self._read_record(key)
      if len(raw) < numel * storage_type.dtype.itemsize:
        raise CheckpointFormatError(f'{self._where}: storage {key} is shorter than {numel} '
                                    f'{storage_type.name} elements.')
      dtype = storage_type.dtype
      if self._big_endian and dtype.itemsize > 1:
        stored = np.frombuffer(raw, dtype.newbyteorder('>'), count=numel)
        self._storages[key] = stored.astype(dtype)
      else:
        self._storages[key] = np.frombuffer(raw, dtype, count=numel)
    return self._storages[key]

  def _load_build(self):
    state = self.stack.pop()
    inst = self.stack[-1]
    if isinstance(inst, PickledObject):
      inst.state = state
    elif isinstance(inst, collections.OrderedDict) and isinstance(state, dict):
      inst.__dict__.update(state)
    else:
      raise UnsafeCheckpointError(f'{self._where} sets the state of a {type(inst).__name__}; '
                                  'refusing to load it.')

  dispatch[pickle.BUILD[0]] = _load_build


def load(path: str) -> Any:
  """The object a `torch.save` zip file holds, tensors as NumPy arrays (see module doc)."""
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as f:
      head = f.read(2)
    kind = ('a legacy (pre-1.6) torch file or a plain pickle' if head[:1] == b'\x80'
            else 'not a PyTorch checkpoint')
    raise CheckpointFormatError(
        f'{path} is {kind}; only the zip format of torch.save (PyTorch 1.6 and later) is read. '
        'Re-save it with a recent torch: torch.save(torch.load(path), new_path).')
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise CheckpointFormatError(f'{path} is a zip file but not a torch.save archive '
                                  '(no <name>/data.pkl record).')
    prefix = pickles[0][:-len('data.pkl')]
    big_endian = (prefix + 'byteorder' in names
                  and archive.read(prefix + 'byteorder').strip() == b'big')

    def read_record(key: str) -> bytes:
      name = f'{prefix}data/{key}'
      if name not in names:
        raise CheckpointFormatError(f'{path} has no storage record {name!r}.')
      return archive.read(name)

    unpickler = _RestrictedUnpickler(archive.read(pickles[0]), read_record, path, big_endian)
    return unpickler.load()


class _Global:
  """A name `save` writes as a pickle GLOBAL without importing it (torch may be absent)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle wants reduce functions callable; never called here
    raise TypeError(f'{self.module}.{self.name} is only a name to write.')


_REBUILD = _Global('torch._utils', '_rebuild_tensor_v2')


class _Storage:
  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pickles NumPy arrays as torch tensors (storages go to separate zip records)."""

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages: Dict[str, np.ndarray] = {}
    self._globals = {}

  def reducer_override(self, obj):
    if isinstance(obj, _Global):
      return obj.name
    if isinstance(obj, (np.ndarray, np.generic)):
      array = np.asarray(obj, order='C')  # (ascontiguousarray would make 0-d arrays 1-d)
      if array.dtype not in _STORAGE_OF:
        raise TypeError(f'Cannot write an array of dtype {array.dtype} as a torch tensor.')
      key = str(len(self.storages))
      self.storages[key] = array
      strides = tuple(s // array.itemsize for s in array.strides) if array.size else (
          tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)))
      return (_REBUILD, (_Storage(key, array), 0, tuple(array.shape), strides, False,
                         collections.OrderedDict()))
    return NotImplemented

  def save_global(self, obj, name=None):
    if isinstance(obj, _Global):  # (the memo was checked by save())
      self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('utf-8'))
      self.memoize(obj)
      return
    super().save_global(obj, name)

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      storage = self._globals.setdefault(obj.array.dtype,
                                         _Global('torch', _STORAGE_OF[obj.array.dtype]))
      return ('storage', storage, obj.key, 'cpu', int(obj.array.size))
    return None


def save(obj: Any, path: str, archive_name: str = 'archive') -> None:
  """Writes `obj` (dicts, lists, tuples, scalars, strings and NumPy arrays, which become
  tensors) as a torch.save zip file that `torch.load(path, weights_only=True)` reads."""
  buffer = io.BytesIO()
  pickler = _TorchPickler(buffer)
  pickler.dump(obj)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr(f'{archive_name}/data.pkl', buffer.getvalue())
    archive.writestr(f'{archive_name}/byteorder', 'little')
    for key, array in pickler.storages.items():
      little = array if sys.byteorder == 'little' else array.byteswap()
      archive.writestr(f'{archive_name}/data/{key}', little.tobytes())
    archive.writestr(f'{archive_name}/version', '3\n')

