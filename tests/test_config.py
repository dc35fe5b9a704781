"""Config variants: the fields where the paper and the original code differ, and old workdirs."""
import json

import pytest

from configs.rqvae import get_config
from rqvae_jax import checkpoints as ckpt_lib


def test_paper_and_original_fidelity_fields():
  paper, original = get_config('paper'), get_config('original')
  for cfg in (paper, original):
    # The only published total mel weight is the code's; "alpha = 1" is the log-term weight.
    assert cfg.loss.mel_weight == 1e-6 and cfg.loss.mel_log_weight == 1.0
    assert cfg.model.torch_init is True                    # PyTorch's nn.Linear init
  # Shift augmentation is our choice; the released config trains on a fixed 4 s grid.
  assert paper.data.shift_augmentation is True
  assert original.data.shift_augmentation is False
  assert (paper.model.quantizer.usage_decay, paper.model.quantizer.dead_threshold) == (0.97, 2.0)
  assert (original.model.quantizer.usage_decay,
          original.model.quantizer.dead_threshold) == (0.93, 1.0)
  for variant in ('demo', 'smoke'):                        # inherited
    assert get_config(variant).model.torch_init is True


@pytest.mark.parametrize('variant', ['paper', 'smoke'])
def test_workdir_saved_before_torch_init_loads_with_flax_init(tmp_path, variant):
  """A config.json without model.torch_init was trained with Flax's dense init: absent means
  False, not today's default; a saved value wins either way."""
  cfg = get_config(variant)
  ckpt_lib.save_config(str(tmp_path), cfg)
  assert ckpt_lib.load_config(str(tmp_path)).model.torch_init is True
  path = tmp_path / ckpt_lib.CONFIG_FILE
  saved = json.loads(path.read_text())
  del saved['model']['torch_init']
  path.write_text(json.dumps(saved))
  loaded = ckpt_lib.load_config(str(tmp_path))
  assert loaded.model.torch_init is False
  assert tuple(loaded.model.channels) == tuple(cfg.model.channels)
  # Loading it and saving it again keeps False (the run's own value from now on).
  ckpt_lib.save_config(str(tmp_path / 'again'), loaded)
  assert ckpt_lib.load_config(str(tmp_path / 'again')).model.torch_init is False


def test_cpu_hour_workdir_saved_before_the_wider_mask_head_loads_as_it_was_trained(tmp_path):
  """`cpu_hour` now widens the mask head; a workdir saved before those fields existed had the
  demo's head (channels[-1] wide, no per-bin network) and must load as that."""
  cfg = get_config('cpu_hour')
  assert cfg.model.mask_hidden > cfg.model.channels[-1] and cfg.model.mask_bin_features > 0
  assert cfg.model.mask_bin_layers > 0
  assert cfg.model.mask_bin_dilate_time and cfg.optim.param_ema_decay > 0
  ckpt_lib.save_config(str(tmp_path), cfg)
  path = tmp_path / ckpt_lib.CONFIG_FILE
  saved = json.loads(path.read_text())
  del saved['model']['mask_hidden'], saved['model']['mask_bin_features']
  del saved['model']['mask_bin_layers'], saved['model']['mask_bin_dilate_time']
  del saved['optim']['param_ema_decay'], saved['inference']['use_ema_params']
  path.write_text(json.dumps(saved))
  loaded = ckpt_lib.load_config(str(tmp_path))
  assert (loaded.model.mask_hidden, loaded.model.mask_bin_features) == (0, 0)
  assert loaded.model.mask_bin_layers == 0
  assert loaded.model.mask_bin_dilate_time is False and loaded.optim.param_ema_decay == 0.0
  assert loaded.inference.use_ema_params is True


def test_cpu_hour_workdir_saved_with_the_800_point_mask_stft_keeps_it(tmp_path):
  """`cpu_hour` now masks a 1600-point STFT with a 12-wide per-bin network; a workdir trained
  before (800 points, 8 wide, both saved in config.json) must load with its own values, or
  its checkpoint would not fit the model built from the config."""
  cfg = get_config('cpu_hour')
  assert (cfg.model.mask_fft, cfg.model.mask_bin_features) == (1600, 12)
  cfg.model.mask_fft, cfg.model.mask_bin_features = 800, 8
  ckpt_lib.save_config(str(tmp_path), cfg)
  loaded = ckpt_lib.load_config(str(tmp_path))
  assert (loaded.model.mask_fft, loaded.model.mask_bin_features) == (800, 8)
