"""rqvae_jax.torch_format against torch itself (a test-only dependency, requirements-dev.txt)."""
import collections
import os
import warnings
import zipfile

import ml_dtypes
import numpy as np
import pytest

try:
  import torch
except ImportError as e:
  raise ImportError('tests/test_torch_format.py needs torch (CPU): '
                    'pip install -r requirements-dev.txt (make test does).') from e

from rqvae_jax import torch_format


def test_reads_what_torch_saves(tmp_path):
  base = torch.randn(4, 6)
  tensors = collections.OrderedDict(
      param=torch.nn.Parameter(torch.randn(2, 3)), transposed=base.t(), view=base[1, 2:5],
      scalar=torch.tensor(7), long=torch.arange(5), flag=torch.tensor([True, False]),
      half=torch.randn(3).half(), bf16=torch.randn(3).bfloat16(), empty=torch.zeros(0, 3))
  path = str(tmp_path / 'x.pt')
  torch.save({'state_dict': tensors, 'epoch': 3, 'lr': 1e-3, 'betas': (0.9, 0.999),
              'names': ['a'], 'seen': {1, 2}, 'none': None}, path)
  got = torch_format.load(path)
  assert isinstance(got['state_dict'], collections.OrderedDict)
  for key, value in tensors.items():
    array = got['state_dict'][key]
    assert array.shape == tuple(value.shape), key
    if value.dtype == torch.bfloat16:
      assert array.dtype == ml_dtypes.bfloat16
      np.testing.assert_array_equal(array.astype(np.float32), value.float().detach().numpy())
    else:
      np.testing.assert_array_equal(array, value.detach().numpy(), err_msg=key)
  assert (got['epoch'], got['lr'], got['betas'], got['names'], got['seen'], got['none']) == (
      3, 1e-3, (0.9, 0.999), ['a'], {1, 2}, None)


def test_torch_reads_what_save_writes_with_weights_only(tmp_path):
  arrays = collections.OrderedDict(
      w=np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
      t=np.arange(12, dtype=np.float32).reshape(3, 4).T,      # not contiguous
      n=np.asarray(5, np.int64), h=np.ones(2, np.float16), b=np.array([True, False]))
  path = str(tmp_path / 'y.pt')
  torch_format.save({'sd': arrays, 'meta': [1, 'x', None]}, path)
  got = torch.load(path, weights_only=True)
  assert list(got['sd']) == list(arrays) and got['meta'] == [1, 'x', None]
  for key, value in arrays.items():
    assert tuple(got['sd'][key].shape) == value.shape, key
    np.testing.assert_array_equal(got['sd'][key].numpy(), value, err_msg=key)
  again = torch_format.load(path)
  for key, value in arrays.items():
    np.testing.assert_array_equal(again['sd'][key], value)


class _Oversized:
  """A tensor record that reaches past its storage (a crafted file's read past the end)."""

  def __reduce__(self):
    import torch._utils  # pylint: disable=import-outside-toplevel
    with warnings.catch_warnings():      # TypedStorage is deprecated, and what torch pickles
      warnings.simplefilter('ignore')
      storage = torch.zeros(4).storage()
    return (torch._utils._rebuild_tensor_v2,
            (storage, 0, (100,), (1,), False, collections.OrderedDict()))


def test_malformed_and_foreign_files_are_clear_errors(tmp_path):
  legacy = str(tmp_path / 'legacy.pt')
  torch.save({'w': torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
  with pytest.raises(torch_format.CheckpointFormatError, match='legacy'):
    torch_format.load(legacy)
  other_zip = str(tmp_path / 'other.zip')
  with zipfile.ZipFile(other_zip, 'w') as z:
    z.writestr('readme.txt', 'hello')
  with pytest.raises(torch_format.CheckpointFormatError, match='not a torch.save archive'):
    torch_format.load(other_zip)
  oversized = str(tmp_path / 'oversized.pt')
  torch.save({'w': _Oversized()}, oversized)
  with pytest.raises(torch_format.CheckpointFormatError, match='reaches element 99'):
    torch_format.load(oversized)


def test_build_only_on_inert_records(tmp_path):
  """BUILD (setstate) on any other object is refused: NumPy's would read raw pointers."""
  path = str(tmp_path / 'build.pt')
  with zipfile.ZipFile(path, 'w') as z:   # set() then BUILD with a dict state
    z.writestr('archive/data.pkl', b'\x80\x02cbuiltins\nset\n)R}b.')
  with pytest.raises(torch_format.UnsafeCheckpointError, match='sets the state of a set'):
    torch_format.load(path)


def test_unknown_globals_are_refused_without_running_them(tmp_path):
  marker = tmp_path / 'ran'

  class RunsCode:
    def __reduce__(self):
      return (os.makedirs, (str(marker),))

  path = str(tmp_path / 'evil.pt')
  torch.save({'w': RunsCode()}, path)
  with pytest.raises(torch_format.UnsafeCheckpointError, match=r'pickles (os|posix)\.makedirs'):
    torch_format.load(path)
  assert not marker.exists()
