"""Imports a checkpoint of the original PyTorch RQ-VAE into a workdir that eval and separate use.

  python -m rqvae_jax.import_original CKPT --workdir DIR [--config configs/rqvae.py:original]

CKPT is a PyTorch Lightning `.ckpt` of the original code (its `state_dict` keys under `AE.`)
or a plain state dict `.pt`/`.pth` (keys with or without `AE.`). It is read without
executing pickled code (rqvae_jax.torch_format) and without torch. Every tensor is mapped
(rqvae_jax.original_layout); a missing, extra, non-tensor or misshapen entry is an error
naming it. The workdir gets the config (by default the `original` variant, whose
normalisation is the original's z-score of int16-scale audio) and one Orbax train state in
the layout training writes, so `eval.py --workdir DIR` and `python -m rqvae_jax.separate
--workdir DIR` read it unchanged.

Codebooks: the original validates with an EMA (decay 0.99) of its codebooks and saves its
checkpoints inside `ema.average_parameters()`, so the `AE.codebooks.*` of a checkpoint it
wrote are already the EMA weights. A checkpoint that also carries the torch_ema state under
a top-level `ema` key (`shadow_params`: the 12 codebooks) gets that EMA as the codebooks
eval and separate use (`codebook_ema`), with `AE.codebooks.*` as the training weights.
"""
import dataclasses
import os
import sys
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import original_layout as layout
from rqvae_jax import torch_format

ORIGINAL_MEAN, ORIGINAL_STD = 122.759, 2359.9309   # the original's constants.MEAN / STD
ORIGINAL_SAMPLE_RATE = 22050
PREFIX = 'AE.'


@dataclasses.dataclass
class OriginalCheckpoint:
  """What a checkpoint file holds for the model: the state dict (keys without `AE.`), the
  EMA codebooks (Q, K, D) if it has a separate copy, the Lightning global step, its kind."""
  state_dict: Dict[str, Any]
  ema_codebooks: Optional[np.ndarray]
  global_step: Optional[int]
  kind: str


def read_checkpoint(path: str, num_quantizers: int) -> OriginalCheckpoint:
  """Reads a Lightning checkpoint or a plain state dict (see the module doc)."""
  obj = torch_format.load(path)
  if not isinstance(obj, dict):
    raise layout.LayoutError(f'{path} holds a {type(obj).__name__}, not a state dict or a '
                             'Lightning checkpoint.')
  lightning = isinstance(obj.get('state_dict'), dict)
  raw = obj['state_dict'] if lightning else obj
  state_dict = {(k[len(PREFIX):] if isinstance(k, str) and k.startswith(PREFIX) else k): v
                for k, v in raw.items()}
  ema = _ema_codebooks(obj.get('ema'), num_quantizers) if lightning else None
  step = obj.get('global_step') if lightning else None
  return OriginalCheckpoint(state_dict, ema, step if isinstance(step, int) else None,
                            'Lightning checkpoint' if lightning else 'state dict')


def _ema_codebooks(ema: Any, num_quantizers: int) -> Optional[np.ndarray]:
  """The torch_ema state's shadow parameters as (Q, K, D) codebooks, or None without one."""
  if ema is None:
    return None
  shadow = ema.get('shadow_params') if isinstance(ema, dict) else None
  if (not isinstance(shadow, (list, tuple)) or len(shadow) != num_quantizers
      or not all(isinstance(a, np.ndarray) and a.ndim == 2 for a in shadow)
      or len({a.shape for a in shadow}) != 1):
    raise layout.LayoutError(
        f"The checkpoint's 'ema' entry is not a torch_ema state of the {num_quantizers} "
        "codebooks (a dict whose 'shadow_params' is a list of (codes, dim) tensors).")
  return np.stack([np.asarray(a, np.float32) for a in shadow])


def check_normalisation(config: ml_collections.ConfigDict) -> None:
  """The original's weights expect its input scale: (32768 x - 122.759) / 2359.9309 at 22050 Hz."""
  m = config.model
  if (not np.isclose(m.norm_offset, ORIGINAL_MEAN / 32768.0, rtol=1e-9, atol=0)
      or not np.isclose(m.norm_scale, ORIGINAL_STD / 32768.0, rtol=1e-9, atol=0)):
    raise layout.LayoutError(
        f'model.norm_offset/norm_scale are {m.norm_offset}/{m.norm_scale}; weights of the '
        f'original expect {ORIGINAL_MEAN}/32768 and {ORIGINAL_STD}/32768 (its z-score of '
        'int16-scale audio). Use --config configs/rqvae.py:original.')
  if config.data.sample_rate != ORIGINAL_SAMPLE_RATE:
    raise layout.LayoutError(f'data.sample_rate is {config.data.sample_rate}; the original '
                             f'model runs at {ORIGINAL_SAMPLE_RATE} Hz.')


def build_state(config: ml_collections.ConfigDict, variables: Mapping, step: int,
                ema_codebooks: Optional[np.ndarray] = None, abstract=None):
  """A TrainState holding imported variables, as training would have saved it: Adam's
  moments zero, codebook usage zero (no usage statistics survive in the original's
  checkpoints), the codebook EMA the given one or the codebooks, the plateau state fresh."""
  from rqvae_jax import train_state
  abstract = abstract if abstract is not None else train_state.abstract_train_state(config)
  params = jax.tree_util.tree_map(jnp.asarray, variables['params'])
  codebooks = params['quantizer']['codebooks']
  if ema_codebooks is not None and ema_codebooks.shape != codebooks.shape:
    raise layout.LayoutError(f'The EMA codebooks are {ema_codebooks.shape}, the codebooks '
                             f'{tuple(codebooks.shape)}.')
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  state = abstract.replace(
      step=jnp.asarray(step, jnp.int32), params=params,
      batch_stats=jax.tree_util.tree_map(jnp.asarray, variables['batch_stats']),
      codebook_stats=jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                            abstract.codebook_stats),
      opt_state=train_state.make_optimizer(config.optim).init(params),
      codebook_ema=jnp.asarray(ema_codebooks if ema_codebooks is not None else codebooks),
      params_ema=train_state.initial_params_ema(config, params),
      rng=jax.random.split(jax.random.PRNGKey(config.seed))[1], lr_scale=f32(1.0),
      last_val=f32(-jnp.inf), best_val=f32(-jnp.inf), bad_evals=jnp.asarray(0, jnp.int32),
      nan_skips=jnp.asarray(0, jnp.int32))
  unset = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(state)
           if isinstance(leaf, jax.ShapeDtypeStruct)]
  shapes = lambda t: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), t)
  if unset or shapes(state) != shapes(abstract):
    raise AssertionError('build_state does not fill the training state it imports into '
                         f'(TrainState changed?); unset: {unset[:5]}.')
  return state


@dataclasses.dataclass
class Imported:
  """A checkpoint mapped to a train state, with the meta data the workdir records."""
  state: Any
  step: int
  meta: Dict[str, Any]


def convert(path: str, config: ml_collections.ConfigDict,
            log: Callable[[str], None] = print) -> Imported:
  """Reads and maps a checkpoint of the original (no files written); logs where the
  codebooks and the normalisation come from."""
  from rqvae_jax import train_state
  layout.check_architecture(config.model)
  check_normalisation(config)
  ckpt = read_checkpoint(path, config.model.quantizer.num_quantizers)
  abstract = train_state.abstract_train_state(config)
  variables, bn_step = layout.to_variables(
      ckpt.state_dict, config.model,
      {'params': abstract.params, 'batch_stats': abstract.batch_stats})
  step = ckpt.global_step if ckpt.global_step is not None else bn_step
  log(f'{path}: {ckpt.kind}, {len(ckpt.state_dict)} tensors mapped, step {step}.')
  if ckpt.ema_codebooks is not None:
    source = 'ema'
    log("Codebooks: the EMA copy (checkpoint['ema'].shadow_params) for evaluation and "
        'separation; AE.codebooks.* as the training weights.')
  else:
    source = 'state_dict'
    log('Codebooks: AE.codebooks.* (no separate EMA copy; the original saves checkpoints '
        'with its EMA codebooks swapped in, so these are the EMA weights it validated).')
  m = config.model
  log(f'Normalisation: (x - {m.norm_offset:.6g}) / {m.norm_scale:.6g} per stem on audio in '
      f'[-1, 1], i.e. the original\'s (x - {ORIGINAL_MEAN}) / {ORIGINAL_STD} on int16-scale '
      'samples; kept in config.json.')
  state = build_state(config, variables, step, ckpt.ema_codebooks, abstract)
  meta = {'step': int(step), 'config_hash': train_state.config_hash(config),
          'variant': config.variant, 'val': {}, 'imported_from': os.path.abspath(path),
          'codebooks': source}
  return Imported(state, int(step), meta)


def write_workdir(workdir: str, config: ml_collections.ConfigDict, imported: Imported) -> None:
  """config.json and the state as training's latest checkpoint (`best` stays empty, so
  eval and separate, asking for 'best', fall back to it)."""
  ckpt_lib.save_config(workdir, config)
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  checkpointer.save(imported.step, imported.state, imported.meta)
  checkpointer.wait()
  checkpointer.close()


def import_checkpoint(path: str, workdir: str, config: ml_collections.ConfigDict,
                      log: Callable[[str], None] = print) -> Imported:
  """`convert`, then `write_workdir` into a folder that holds no run yet."""
  if os.path.exists(os.path.join(workdir, ckpt_lib.CONFIG_FILE)) or os.path.isdir(
      os.path.join(workdir, 'checkpoints')):
    raise FileExistsError(f'{workdir!r} already holds a run; import into a new folder.')
  imported = convert(path, config, log)
  write_workdir(workdir, config, imported)
  log(f'Wrote {workdir}: evaluate with `python eval.py --workdir {workdir}`, separate with '
      f'`python -m rqvae_jax.separate --workdir {workdir} song.wav`.')
  return imported


def main(argv):
  from absl import flags
  if len(argv) != 2:
    raise SystemExit('Usage: python -m rqvae_jax.import_original CKPT --workdir DIR '
                     '[--config configs/rqvae.py:original]')
  config = flags.FLAGS.config
  if config is None:
    from rqvae_jax import bundled
    config = bundled.get_config('rqvae:original')
  try:
    import_checkpoint(argv[1], flags.FLAGS.workdir, config,
                      log=lambda s: print(s, file=sys.stderr))
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    raise SystemExit(f'import_original: {e}') from None


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  flags.DEFINE_string('workdir', None, 'New workdir to write (config.json and checkpoint).')
  config_flags.DEFINE_config_file('config', None, 'Config (default: configs/rqvae.py:original); '
                                  'override fields with --config.data.root=... etc.')
  flags.mark_flags_as_required(['workdir'])
  from rqvae_jax import cli
  app.run(main, argv=cli.absl_argv(sys.argv))   # --dashed-flags, --config rqvae:original
