"""Exports a workdir's model as a state dict for the original PyTorch RQ-VAE.

  python -m rqvae_jax.export_original --workdir DIR OUT.pt [--checkpoint best]
                                      [--codebooks ema|params] [--prefix AE.]

OUT.pt loads into the original with `model.load_state_dict(torch.load(OUT.pt,
weights_only=True), strict=True)`: RQVAE's keys by default, `--prefix AE.` for a
LitAutoencoder. It is written without torch (rqvae_jax.torch_format). The codebooks are the
EMA copy by default, the ones eval and separate use (`inference.use_ema_codebooks`), as the
original's own checkpoints hold its EMA codebooks; every BatchNorm's num_batches_tracked is
the workdir's step. Only the original architecture exports (`configs/rqvae.py:original` or
`paper`): a config whose layers or normalisation differ is refused, naming the field.
"""
import collections
import sys
from typing import Callable, Dict, Union

from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import import_original
from rqvae_jax import original_layout as layout
from rqvae_jax import torch_format
from rqvae_jax import train_state


def state_dict_of(workdir: str, checkpoint: Union[str, int] = 'best', codebooks: str = 'ema',
                  prefix: str = '') -> 'collections.OrderedDict':
  """The original's state dict (NumPy arrays) of a workdir's checkpoint, with its step."""
  import jax
  if codebooks not in ('ema', 'params'):
    raise ValueError(f"codebooks must be 'ema' or 'params', got {codebooks!r}.")
  config = ckpt_lib.load_config(workdir)
  layout.check_architecture(config.model)
  import_original.check_normalisation(config)
  state, step = train_state.restore_train_state(workdir, config, checkpoint)
  variables = jax.device_get(state.variables(use_ema=codebooks == 'ema'))
  flat = layout.to_state_dict(variables, config.model, step=int(step))
  return collections.OrderedDict((prefix + k, v) for k, v in flat.items())


def export_workdir(workdir: str, out_path: str, checkpoint: Union[str, int] = 'best',
                   codebooks: str = 'ema', prefix: str = '',
                   log: Callable[[str], None] = print) -> Dict[str, int]:
  """Writes OUT as a torch state dict; returns the number of tensors written."""
  state_dict = state_dict_of(workdir, checkpoint, codebooks, prefix)
  torch_format.save(state_dict, out_path)
  log(f'Wrote {out_path}: {len(state_dict)} tensors ({codebooks} codebooks), for the '
      f"original's load_state_dict(strict=True){' with keys under ' + prefix if prefix else ''}.")
  return {'tensors': len(state_dict)}


def main(argv):
  from absl import flags
  f = flags.FLAGS
  if len(argv) != 2:
    raise SystemExit('Usage: python -m rqvae_jax.export_original --workdir DIR OUT.pt')
  try:
    export_workdir(f.workdir, argv[1], f.checkpoint, f.codebooks, f.prefix,
                   log=lambda s: print(s, file=sys.stderr))
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'export_original: {e}') from None


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'Workdir to export (config.json and checkpoints).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.")
  flags.DEFINE_enum('codebooks', 'ema', ['ema', 'params'],
                    "'ema': the EMA codebooks eval/separate use; 'params': the trained ones.")
  flags.DEFINE_string('prefix', '', "Key prefix: '' for RQVAE, 'AE.' for a LitAutoencoder.")
  flags.mark_flags_as_required(['workdir'])
  from rqvae_jax import cli
  app.run(main, argv=cli.absl_argv(sys.argv))   # --dashed-flags, --config rqvae:original
