"""Importing and exporting the original PyTorch RQ-VAE's checkpoints: parity with its code.

The reference is the original code itself (../shared/original, built with random weights by
tests/original_rqvae.py) run with torch, a test-only dependency (requirements-dev.txt, which
`make test` installs): the importer's point is that a published checkpoint computes here what
it computed there.
"""
import copy
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
  import torch
except ImportError as e:  # not a skip: these tests are the importer's parity check
  raise ImportError('tests/test_original_checkpoint.py needs torch (CPU): '
                    'pip install -r requirements-dev.txt (make test does).') from e

from configs import rqvae
from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import import_original
from rqvae_jax import original_layout as layout
from rqvae_jax import torch_format
from rqvae_jax import train_state
from rqvae_jax.model import Encoder, RQVAE
from rqvae_jax.separate import Separator
from tests import original_rqvae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 1234                       # training batches the original model has "seen"
SR, N = 22050, 88200              # the paper's 4 s input


def _clip(seed: int) -> np.ndarray:
  """A 4 s mixture in [-1, 1]: two tones and noise (1, N) float64."""
  rng = np.random.default_rng(seed)
  t = np.arange(N) / SR
  f1, f2 = rng.uniform(80, 200), rng.uniform(300, 900)
  return (0.3 * np.sin(2 * np.pi * f1 * t) + 0.2 * np.sin(2 * np.pi * f2 * t + 1.0)
          + 0.1 * rng.normal(size=N))[None]


def _original_input(mix: np.ndarray):
  """The original's model input for raw audio: z-scored int16-scale stems, summed."""
  mean, std = import_original.ORIGINAL_MEAN, import_original.ORIGINAL_STD
  return torch.tensor(((32768.0 * mix - 4 * mean) / std)[:, None].astype(np.float32))


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
  """Largest deviation relative to the reference's peak."""
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _restore(workdir: str):
  config = ckpt_lib.load_config(workdir)
  state, meta, step = ckpt_lib.restore_once(workdir, 'latest',
                                            train_state.abstract_train_state(config))
  return config, jax.device_get(state), meta, step


@pytest.fixture(scope='module')
def original(tmp_path_factory):
  """The original model (random, calibrated codebooks), its eval outputs on a 4 s clip, and
  its Lightning checkpoint."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)   # torch's OpenMP threads crawl on a shared 2-core machine
  model = original_rqvae.build(seed=0, batches_seen=STEP)
  mix = _clip(0)
  original_rqvae.calibrate_codebooks(model, torch.cat([_original_input(mix),
                                                       _original_input(_clip(1))]))
  root = tmp_path_factory.mktemp('original')
  ckpt = str(root / 'original.ckpt')
  original_rqvae.lightning_checkpoint(model, ckpt, global_step=STEP)
  yield types.SimpleNamespace(model=model, mix=mix, ref=original_rqvae.forward(
      model, _original_input(mix)), ckpt=ckpt, root=root)
  torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def imported(original):
  """The Lightning checkpoint imported through the command line."""
  workdir = str(original.root / 'imported')
  run = subprocess.run([sys.executable, '-m', 'rqvae_jax.import_original', original.ckpt,
                        '--workdir', workdir], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': REPO}, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return types.SimpleNamespace(workdir=workdir, log=run.stderr)


@pytest.fixture(scope='module')
def imported_state(imported):
  """(config, state, meta, step) restored from the imported workdir."""
  return _restore(imported.workdir)


@pytest.fixture(scope='module')
def exported(original, imported):
  """The imported workdir exported again through the command line."""
  out = str(original.root / 'exported.pt')
  run = subprocess.run([sys.executable, '-m', 'rqvae_jax.export_original', '--workdir',
                        imported.workdir, out], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': REPO}, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return out


def test_imported_checkpoint_reproduces_the_original_code(original, imported):
  """Eval mode, same 4 s input: encoder frames, the 12 stages' codes and the stems."""
  separator = Separator.from_workdir(imported.workdir)   # what eval.py and separate load
  model = RQVAE(separator.config.model)

  @jax.jit
  def run(variables, mixture):
    (stems, aux), inter = model.apply(
        variables, mixture, train=False,
        capture_intermediates=lambda mdl, _: isinstance(mdl, Encoder))
    return inter['intermediates']['encoder']['__call__'][0][0], aux['codes'], stems

  z_e, codes, stems = jax.device_get(run(separator.variables, jnp.asarray(original.mix,
                                                                          jnp.float32)))
  ref_z, ref_codes, ref_stems = original.ref
  m = separator.config.model
  ours = np.transpose((stems - m.norm_offset) / m.norm_scale, (0, 2, 1))  # original's scale
  agreement = _code_agreement(codes, ref_codes, ref_z, separator.variables)
  print(f'\nz_e max rel error {_rel(z_e, ref_z):.2e}, stems {_rel(ours, ref_stems):.2e}; '
        f'codes equal per stage {np.round((codes == ref_codes).mean(axis=(0, 1)), 4)}, '
        f'ties aside {np.round(agreement, 4)}')
  assert _rel(z_e, ref_z) < 1e-4
  assert np.all(agreement >= 0.999), agreement
  assert _rel(ours, ref_stems) < 1e-4


def _code_agreement(codes, ref_codes, ref_z, variables) -> np.ndarray:
  """Per stage, the share of frames whose code is the original's, a tie counting as equal.

  A tie: the two codes are equally near the original's residual within 1e-5 of the squared
  distance (float64), i.e. float32 rounding chose. From a tie on, a frame's residuals part
  ways, so its later stages are left out.
  """
  cbs = np.asarray(variables['params']['quantizer']['codebooks'], np.float64)
  ref_codes, codes = ref_codes.reshape(-1, cbs.shape[0]), codes.reshape(-1, cbs.shape[0])
  residual = ref_z.reshape(-1, cbs.shape[-1]).astype(np.float64)
  alive = np.ones(len(residual), bool)
  out = []
  for s, cb in enumerate(cbs):
    same = codes[:, s] == ref_codes[:, s]
    d_ours = np.sum((residual - cb[codes[:, s]]) ** 2, -1)
    d_ref = np.sum((residual - cb[ref_codes[:, s]]) ** 2, -1)
    tie = ~same & (np.abs(d_ours - d_ref) <= 1e-5 * d_ref)
    out.append(np.mean((same | tie)[alive]))
    alive &= ~tie
    residual = residual - cb[ref_codes[:, s]]
  return np.array(out)


def test_import_log_says_where_the_codebooks_come_from(original, imported, imported_state):
  config, state, meta, step = imported_state
  assert 'Lightning checkpoint, 286 tensors mapped, step 1234' in imported.log
  assert 'no separate EMA copy' in imported.log
  assert step == STEP and meta['codebooks'] == 'state_dict'
  assert config.variant == 'original'
  np.testing.assert_array_equal(state.codebook_ema, state.params['quantizer']['codebooks'])
  np.testing.assert_array_equal(state.codebook_stats['quantizer']['usage'], 0.0)
  ref = np.stack([cb.weight.detach().numpy() for cb in original.model.codebooks])
  np.testing.assert_array_equal(state.codebook_ema, ref)


def test_lightning_checkpoint_with_ema_codebooks(original, tmp_path):
  from torch_ema import ExponentialMovingAverage
  model = copy.deepcopy(original.model)
  ema = ExponentialMovingAverage(model.codebooks.parameters(), decay=0.99)
  with torch.no_grad():
    for cb in model.codebooks:
      cb.weight.add_(0.1 * torch.randn_like(cb.weight))
  ema.update()                       # shadow = 0.99 * before + 0.01 * after
  path = str(tmp_path / 'with_ema.ckpt')
  original_rqvae.lightning_checkpoint(model, path, global_step=STEP, ema=ema)
  lines = []
  imported = import_original.convert(path, rqvae.get_config('original'), log=lines.append)
  assert any('the EMA copy' in line for line in lines), lines
  assert imported.meta['codebooks'] == 'ema'
  state = jax.device_get(imported.state)
  shadow = np.stack([p.numpy() for p in ema.shadow_params])
  trained = np.stack([cb.weight.detach().numpy() for cb in model.codebooks])
  assert not np.allclose(shadow, trained)
  np.testing.assert_array_equal(state.codebook_ema, shadow)
  np.testing.assert_array_equal(state.params['quantizer']['codebooks'], trained)


def test_export_loads_strictly_into_the_original_and_reproduces_it(original, exported):
  state_dict = torch.load(exported, weights_only=True)
  reference = original.model.state_dict()
  assert list(state_dict) == list(reference)
  for key, value in reference.items():
    assert torch.equal(state_dict[key], value), key
  fresh = original_rqvae.build(seed=1)            # other weights, overwritten by the load
  fresh.load_state_dict(state_dict, strict=True)
  for got, want in zip(original_rqvae.forward(fresh, _original_input(original.mix)),
                       original.ref):
    np.testing.assert_array_equal(got, want)


def test_round_trip_import_export_import_is_the_identity(imported_state, exported):
  config, state_a, _, step_a = imported_state
  again = import_original.convert(exported, config, log=lambda s: None)
  assert step_a == again.step == STEP
  leaves_a = jax.tree_util.tree_leaves_with_path(state_a)
  leaves_b = jax.tree_util.tree_leaves(jax.device_get(again.state))
  assert len(leaves_a) == len(leaves_b)
  for (path, a), b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def plain_state_dict(original):
  return {k: v.numpy() for k, v in original.model.state_dict().items()}


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd.pop('encoder.modules3.1.weight'), r'missing: encoder\.modules3\.1\.weight'),
    (lambda sd: sd.update({'encoder.modules6.1.weight': np.zeros((3, 3, 3), np.float32)}),
     r'does not have: encoder\.modules6\.1\.weight'),
    (lambda sd: sd.update({'decoder.fc.weight': np.zeros((256, 256), np.float32)}),
     r'decoder\.fc\.weight has shape \(256, 256\), the config expects \(256, 512\)'),
    (lambda sd: sd.update({'codebooks.11.weight': np.zeros((4096, 128), np.float32)}),
     r'codebooks\.11\.weight has shape \(4096, 128\), the config expects \(4096, 256\)'),
])
def test_missing_extra_and_misshapen_keys_are_named(plain_state_dict, tmp_path, change, message):
  state_dict = dict(plain_state_dict)
  change(state_dict)
  path = str(tmp_path / 'broken.pt')
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
  with pytest.raises(layout.LayoutError, match=message):
    import_original.import_checkpoint(path, str(tmp_path / 'wd'), rqvae.get_config('original'),
                                      log=lambda s: None)
  assert not os.path.exists(tmp_path / 'wd')


class NotATensor:
  """Some object a checkpoint should not hold."""


class RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


def test_non_tensor_pickled_objects_are_refused(tmp_path):
  path = str(tmp_path / 'object.pt')
  torch.save({'encoder.fc.bias': NotATensor()}, path)
  with pytest.raises(torch_format.UnsafeCheckpointError, match=r'NotATensor.*refusing'):
    import_original.read_checkpoint(path, 12)
  marker = tmp_path / 'was_executed'
  torch.save({'state_dict': {'AE.encoder.fc.bias': RunsCode(str(marker))}}, path)
  with pytest.raises(torch_format.UnsafeCheckpointError, match=r'makedirs'):
    import_original.read_checkpoint(path, 12)
  assert not marker.exists()
  torch.save({'encoder.fc.bias': [0.0] * 256}, path)    # plain data, but not a tensor
  config = rqvae.get_config('original')
  abstract = train_state.abstract_train_state(config)
  with pytest.raises(layout.LayoutError, match=r'encoder\.fc\.bias holds a list, not a tensor'):
    layout.to_variables(import_original.read_checkpoint(path, 12).state_dict, config.model,
                        {'params': abstract.params, 'batch_stats': abstract.batch_stats})


def test_configs_that_are_not_the_original_are_refused(tmp_path):
  config = rqvae.get_config('original')
  config.model.skip_mode = 'gated'
  with pytest.raises(layout.LayoutError, match="skip_mode must be 'add'"):
    import_original.import_checkpoint('unused.ckpt', str(tmp_path / 'a'), config)
  config = rqvae.get_config('original')
  config.model.norm_scale = 1.0
  with pytest.raises(layout.LayoutError, match='norm_offset/norm_scale'):
    import_original.import_checkpoint('unused.ckpt', str(tmp_path / 'b'), config)
