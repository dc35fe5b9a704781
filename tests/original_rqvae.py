"""Builds the original PyTorch RQ-VAE (../shared/original) with random weights, for parity tests.

Why the tests read ../shared/original: the importer's point is numerical parity with the code
that produced the published checkpoints, so the reference must be that code, not a
re-statement of it. CI has a copy of shared/ beside the clone (and torch from
requirements-dev.txt), so these tests run there for real.

The original imports torchaudio, vector_quantize_pytorch and torchmetrics at module level
for its losses and metrics only; they are stubbed here (as ../shared/original/bench_original.py
does), and its top-level module names (`config`, `constants`, `models`, `utils`) are removed
from sys.modules afterwards so that they cannot shadow anything else in the test session.
"""
import contextlib
import os
import sys
import types

import numpy as np

ORIGINAL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            '..', 'shared', 'original')
_OWN_NAMES = ('config', 'constants', 'models', 'utils')
_STUBS = ('torchaudio', 'torchaudio.transforms', 'vector_quantize_pytorch', 'torchmetrics',
          'torchmetrics.audio')


class _Inert:
  """Stands for a metric or transform the forward pass never calls."""

  def __init__(self, *args, **kwargs):
    pass

  def to(self, *args, **kwargs):
    return self


def _stub_modules():
  ta, tat = types.ModuleType('torchaudio'), types.ModuleType('torchaudio.transforms')
  tat.MelSpectrogram = _Inert
  ta.transforms = tat
  vq = types.ModuleType('vector_quantize_pytorch')
  vq.ResidualVQ = object
  tm, tma = types.ModuleType('torchmetrics'), types.ModuleType('torchmetrics.audio')
  tma.ScaleInvariantSignalNoiseRatio = tma.ScaleInvariantSignalDistortionRatio = _Inert
  tm.audio = tma
  return {'torchaudio': ta, 'torchaudio.transforms': tat, 'vector_quantize_pytorch': vq,
          'torchmetrics': tm, 'torchmetrics.audio': tma}


@contextlib.contextmanager
def original_code():
  """Imports of the original's modules work inside; yields its `models.RQVAE.RQVAE` module.

  Pickling the original's own objects (its Configuration in a Lightning checkpoint) must
  happen inside too: pickle looks the class up by module name.
  """
  if not os.path.isdir(ORIGINAL_DIR):
    raise FileNotFoundError(f'The original code is not at {ORIGINAL_DIR} (shared/original).')
  saved = {name: sys.modules.get(name) for name in _STUBS}
  sys.modules.update({k: v for k, v in _stub_modules().items() if k not in sys.modules})
  sys.path.insert(0, ORIGINAL_DIR)
  try:
    import importlib
    yield importlib.import_module('models.RQVAE.RQVAE')
  finally:
    sys.path.remove(ORIGINAL_DIR)
    own = [name for name in sys.modules
           if name.split('.')[0] in _OWN_NAMES and _is_original(sys.modules[name])]
    for name in own:
      del sys.modules[name]
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


def _is_original(module) -> bool:
  paths = [getattr(module, '__file__', None) or ''] + list(getattr(module, '__path__', []))
  root = os.path.abspath(ORIGINAL_DIR)
  return any(p and os.path.abspath(p).startswith(root) for p in paths)


def build(seed: int = 0, batches_seen: int = 1234):
  """The original RQVAE (paper configuration, 4 s) with every tensor random, in eval mode.

  Beyond PyTorch's random init, BatchNorm affine parameters and running statistics and the
  PReLU slopes are drawn too, so that no tensor keeps a default value that would hide a
  mapping error (a swapped mean/var, a slope that is 0.1 everywhere). Every BatchNorm has
  seen `batches_seen` training batches, as in a checkpoint of a training run.
  """
  import torch
  with original_code() as rq:
    import config as original_config
    torch.manual_seed(seed)
    model = rq.RQVAE(original_config.Configuration())
  gen = torch.Generator().manual_seed(seed + 1)
  uniform = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(shape, generator=gen)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm1d):
        n = module.num_features
        module.weight.copy_(uniform(n, 0.5, 1.5))
        module.bias.copy_(uniform(n, -0.2, 0.2))
        module.running_mean.copy_(uniform(n, -0.3, 0.3))
        module.running_var.copy_(uniform(n, 0.5, 2.0))
        module.num_batches_tracked.fill_(batches_seen)
      elif isinstance(module, torch.nn.PReLU):
        module.weight.copy_(uniform(module.weight.shape, 0.02, 0.3))
  return model.eval()


def calibrate_codebooks(model, mixture, seed: int = 0, jitter: float = 1.0):
  """Codebooks that quantize the model's own frames like a trained residual VQ does.

  Xavier-normal codes (std 0.02) are far smaller than the encoder's frames, so every stage
  would choose among near-equal distances: a test of float32 ties, not of the import. Here
  stage s draws its codes from the frames of stage s's residual on `mixture` plus Gaussian
  jitter of the residual's own scale, and the next stage quantizes what is left: the
  quantization error then shrinks by ~15% a stage, and the nearest and second-nearest codes
  of a frame differ by ~3% in distance (median), as after k-means on training frames. (With
  much less jitter the residual falls to the encoder's float32 noise within a few stages
  and the last stages' codes are decided by that noise.)
  """
  import torch
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    residual = model.encoder(mixture)[0].reshape(-1, model.latent_dim)  # (B * T, D)
    for codebook in model.codebooks:
      k = codebook.weight.shape[0]
      picks = residual[torch.as_tensor(rng.integers(0, residual.shape[0], k))]
      noise = torch.as_tensor(rng.normal(size=picks.shape), dtype=torch.float32)
      codebook.weight.copy_(picks + jitter * residual.std() * noise)
      idx = torch.cdist(residual, codebook.weight).argmin(dim=1)
      residual = residual - codebook.weight[idx]
  return model


def lightning_checkpoint(model, path: str, global_step: int, ema=None) -> None:
  """Writes `model` as the original's LitAutoencoder checkpoint would hold it.

  Lightning's layout: the module's state dict under `state_dict` with the `AE.` prefix, the
  training counters, a small optimizer state, and `hyper_parameters` = an AttributeDict
  holding the original's `Configuration` object (pickled by reference to its class, as
  `save_hyperparameters(config)` does). `ema`, a torch_ema ExponentialMovingAverage of the
  codebooks, is stored under `ema` as some checkpoints of the original carry it.
  """
  import torch
  dummy = torch.nn.Parameter(torch.ones(3))
  opt = torch.optim.Adam([dummy], lr=1e-3)
  dummy.sum().backward()
  opt.step()
  lightning_data = types.ModuleType('lightning.fabric.utilities.data')
  attribute_dict = type('AttributeDict', (dict,), {'__module__': lightning_data.__name__})
  lightning_data.AttributeDict = attribute_dict
  parts = lightning_data.__name__.split('.')
  fake = {'.'.join(parts[:i]): types.ModuleType('.'.join(parts[:i])) for i in range(1, len(parts))}
  fake[lightning_data.__name__] = lightning_data
  fake = {name: module for name, module in fake.items() if name not in sys.modules}
  with original_code():
    import config as original_config
    sys.modules.update(fake)
    try:
      ckpt = {
          'epoch': 3, 'global_step': global_step, 'pytorch-lightning_version': '2.1.3',
          'state_dict': {f'AE.{k}': v for k, v in model.state_dict().items()},
          'loops': {'fit_loop': {'state_dict': {}, 'epoch_progress': {'total': {'ready': 4}}}},
          'callbacks': {}, 'optimizer_states': [opt.state_dict()], 'lr_schedulers': [],
          'hparams_name': 'kwargs',
          'hyper_parameters': attribute_dict(config=original_config.Configuration()),
      }
      if ema is not None:
        ckpt['ema'] = ema.state_dict()
      torch.save(ckpt, path)
    finally:
      for name in fake:
        del sys.modules[name]


def forward(model, mixture):
  """Eval-mode encoder frames z_e (B, T, D), codes (B, T, Q) and stems (B, S, N) as numpy,
  from one call of the original's own forward (its quantize is wrapped to keep the codes)."""
  import torch
  seen = {}
  quantize = model.quantize

  def keep(z_e, num_quant, is_train):
    seen['z_e'] = z_e
    out = quantize(z_e, num_quant, is_train)
    seen['codes'] = out[1]
    return out

  model.quantize = keep
  try:
    with torch.no_grad():
      stems, _ = model(mixture, False, 0)
  finally:
    del model.quantize
  codes = seen['codes'].reshape(model.num_quantizers, mixture.shape[0], -1).permute(1, 2, 0)
  return seen['z_e'].numpy(), codes.numpy(), stems.numpy()
