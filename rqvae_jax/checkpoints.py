"""Orbax checkpoints in a workdir: the last k by step, the best by validation SI-SDRi, the config.

Layout of a workdir:
  config.json          the run's full config (eval and separate read it)
  checkpoints/<step>/  the last `keep` states (Orbax writes to a temporary folder and renames
                       it when complete, so a run killed mid-save resumes from the previous one)
  best/<step>/         the state with the best validation SI-SDRi so far

Saves run in the background. A failed one (a full disk) is raised by `check_saves`, which
training calls after every step, as a `CheckpointSaveError` naming the folder and its free
space; the earlier checkpoints stay. The unfinished temporary folders a crash or a failed
save leaves are removed when training starts (`remove_unfinished`).
"""
import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Tuple, Union

import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = 'config.json'
TMP_MARK = '.orbax-checkpoint-tmp'       # in the names of Orbax's unfinished save folders


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to path via a temporary file and a rename: a reader (or a crash) never
  sees half a file, and the previous version stays until the new one is complete."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(workdir, exist_ok=True)
  write_text_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved; a clear error for an empty or foreign workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{workdir!r} holds no rqvae-jax run ({CONFIG_FILE} is missing). Point --workdir at a '
        'folder written by `python train.py --workdir DIR`.')
  with open(path) as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(_fill_defaults(saved))


# Fields whose default changed the behaviour when they were introduced: a config saved
# before them gets the value that reproduces what that run did, not today's default.
# (section, field) -> value when absent.
ABSENT_MEANS = {
    ('model', 'torch_init'): False,     # Dense layers had Flax's init before the field
    ('model', 'skip_mode'): 'add',      # skips were plain sums before the field
    ('model', 'output_kernel'): 0,      # the output layer mirrored the first kernel
    ('model', 'output_head'): 'waveform',  # every model was a waveform decoder before the field
    ('model', 'bottleneck'): 'rvq',     # every model was a residual VQ before the field
    ('loss', 'stft_weight'): 0.0,       # no STFT term before the field
    ('model', 'mask_hidden'): 0,        # the mask head was channels[-1] wide before the field
    ('model', 'mask_bin_features'): 0,  # and had no per-bin network
    ('model', 'mask_bin_layers'): 0,    # nor convolutions inside it
    ('model', 'mask_bin_dilate_time'): False,
    ('optim', 'param_ema_decay'): 0.0,  # no average of the weights
    ('inference', 'use_ema_params'): True,
    ('inference', 'shifts'): 1,         # one separation pass before the field
    ('data', 'remix_fraction'): 0.0,    # no remixing augmentation before the field
    ('data', 'stem_gain_range'): (1.0, 1.0),
}


def _fill_defaults(saved: Dict[str, Any]) -> Dict[str, Any]:
  """The saved fields over the current defaults of the saved variant.

  A workdir written before a field existed (e.g. `inference.in_flight`) still loads: the
  field takes its default, which keeps the earlier behaviour, except the fields of
  `ABSENT_MEANS`, whose earlier behaviour is not today's default (absent `model.torch_init`
  means False: that run's dense layers had Flax's init). Saved values always win.
  """
  if 'model' not in saved:               # not an RQ-VAE config (the prior's): as saved
    return saved
  saved = _absent_means(saved)
  from rqvae_jax import bundled  # pylint: disable=g-import-not-at-top
  rqvae = bundled.configs_module()
  variant = saved.get('variant', 'paper')
  if variant not in rqvae.VARIANTS:
    return saved

  def merge(default, override):
    out = dict(default)
    for key, value in override.items():
      if isinstance(value, dict) and isinstance(out.get(key), dict):
        out[key] = merge(out[key], value)
      else:
        out[key] = value
    return out

  return merge(rqvae.get_config(variant).to_dict(), saved)


def _absent_means(saved: Dict[str, Any]) -> Dict[str, Any]:
  """`saved` with the ABSENT_MEANS values of the fields it lacks (sections it has only)."""
  out = dict(saved)
  for (section, field), value in ABSENT_MEANS.items():
    if isinstance(out.get(section), dict) and field not in out[section]:
      out[section] = {**out[section], field: value}
  return out


def _flatten(d: Any, prefix: str = '') -> Dict[str, Any]:
  if isinstance(d, (dict, ml_collections.ConfigDict)):
    out = {}
    for k in d.keys():
      out.update(_flatten(d[k], f'{prefix}{k}.'))
    return out
  if isinstance(d, list):
    d = tuple(d)
  return {prefix[:-1]: d}


def config_differences(saved: ml_collections.ConfigDict, given: ml_collections.ConfigDict,
                       sections: Tuple[str, ...] = ('model',)) -> List[str]:
  """Fields of `sections` whose values differ: 'model.channels: saved (..) != given (..)'."""
  diffs = []
  for section in sections:
    a = _flatten(saved.get(section, {}), f'{section}.')
    b = _flatten(given.get(section, {}), f'{section}.')
    for key in sorted(set(a) | set(b)):
      if a.get(key, '<missing>') != b.get(key, '<missing>'):
        diffs.append(f'{key}: checkpoint has {a.get(key, "<missing>")!r}, '
                     f'config has {b.get(key, "<missing>")!r}')
  return diffs


def check_config_matches(saved, given) -> None:
  diffs = config_differences(saved, given)
  if diffs:
    raise ValueError('The config does not match the checkpoint\'s model:\n  ' + '\n  '.join(diffs)
                     + '\nDrop --config to use the saved one, or fix these fields.')


class CheckpointSaveError(OSError):
  """A background checkpoint save failed (typically a full disk)."""


def free_space(path: str) -> str:
  """'12.3 GiB free of 100.0 GiB' for the disk holding `path` (or why it is unknown)."""
  try:
    usage = shutil.disk_usage(path)
  except OSError as e:
    return f'free space unknown ({e})'
  return f'{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB'


def remove_unfinished(directory: str) -> List[str]:
  """Removes Orbax's unfinished save folders (<step>.orbax-checkpoint-tmp...) in
  `directory`; returns their names. Finished checkpoints are never touched."""
  if not os.path.isdir(directory):
    return []
  removed = sorted(n for n in os.listdir(directory) if TMP_MARK in n)
  for name in removed:
    path = os.path.join(directory, name)
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      os.remove(path)
  return removed


def _fields_not_saved(manager, step: int, abstract_state) -> List[str]:
  """Top-level fields of a dataclass state that the checkpoint of `step` does not hold."""
  if not dataclasses.is_dataclass(abstract_state):
    return []
  # Read from the step's folder: a reader's manager has no handler for 'state' before its
  # first restore, so manager.item_metadata would not describe it.
  handler = ocp.StandardCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(str(manager.directory)) / str(step) / 'state')
  finally:
    handler.close()
  keys = set(getattr(tree, 'tree', tree).keys())
  return [f.name for f in dataclasses.fields(abstract_state) if f.name not in keys]


class Checkpointer:
  """Saves/restores the train state: `checkpoints/` keeps the last k, `best/` the best one.

  With `cleanup` (the training process that owns the workdir), unfinished save folders are
  removed first. Readers (eval, separate) leave them: a run may be saving right now.
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               cleanup: bool = False):
    self.workdir = workdir
    root = os.path.abspath(workdir)
    self.dirs = {'checkpoints': os.path.join(root, 'checkpoints'),
                 'best': os.path.join(root, 'best')}
    if cleanup:
      for name, directory in self.dirs.items():
        removed = remove_unfinished(directory)
        if removed:
          print(f'Removed unfinished checkpoint folders in {directory} (a save cut short by '
                f'a crash or a full disk): {", ".join(removed)}.', file=sys.stderr)
    common = dict(enable_async_checkpointing=async_save, create=True)
    # Each manager gets its own barrier names: with several processes both may save the same
    # step at once, and Orbax names its commit barrier after the step alone, so without a
    # prefix the second save finds "_async_write_complete.<step>" already in use and fails.
    barriers = lambda name: ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
    self.latest = ocp.CheckpointManager(
        self.dirs['checkpoints'],
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, multiprocessing_options=barriers('checkpoints'), **common))
    self.best = ocp.CheckpointManager(
        self.dirs['best'],
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m['val_sisdri'], best_mode='max',
            keep_checkpoints_without_metrics=False,
            multiprocessing_options=barriers('best'), **common))
    self._saving = {}        # manager name -> step of its last save, until checked

  @staticmethod
  def _args(state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

  def _managers(self):
    return (('checkpoints', self.latest), ('best', self.best))

  def _failed(self, name: str, manager, error: BaseException,
              starting_step: Optional[int] = None) -> CheckpointSaveError:
    """The error for `name`'s failed save: the one in flight, else `starting_step` (a save
    that Orbax failed before returning)."""
    step = self._saving.pop(name, starting_step)
    directory = self.dirs[name]
    kept = sorted(manager.all_steps())
    where = os.path.join(directory, str(step)) if step is not None else directory
    # The partial folder is left to the next start's cleanup: Orbax's other writer threads
    # may still be writing into it now.
    return CheckpointSaveError(
        f'Saving the checkpoint of step {step} to {where} failed: {error}. The disk has '
        f'{free_space(directory)}. The earlier checkpoints there ({kept or "none"}) are '
        'intact: free some space and run the same command again to resume from the latest '
        'one (the unfinished folder is removed then).')

  def check_saves(self) -> None:
    """Raises CheckpointSaveError as soon as a background save has failed (cheap: it only
    looks at finished saves, never waits for one in progress)."""
    for name, manager in self._managers():
      if name not in self._saving or manager.is_saving_in_progress():
        continue
      try:
        manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except   (whatever the writer raised)
        raise self._failed(name, manager, e) from e
      self._saving.pop(name, None)

  def _save(self, name: str, manager, step: int, **kwargs) -> None:
    try:
      manager.save(step, **kwargs)    # waits for the previous save, which may raise
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, CheckpointSaveError):
        raise
      raise self._failed(name, manager, e, starting_step=step) from e
    self._saving[name] = step

  def save(self, step: int, state, meta: Dict[str, Any]) -> None:
    if step not in self.latest.all_steps():
      self.check_saves()
      self._save('checkpoints', self.latest, step, args=self._args(state, meta))

  def save_if_best(self, step: int, state, meta: Dict[str, Any], val_sisdri: float) -> None:
    self.check_saves()
    self._save('best', self.best, step, args=self._args(state, meta),
               metrics={'val_sisdri': float(val_sisdri)})

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def resolve(self, which: Union[str, int]) -> Tuple[ocp.CheckpointManager, int]:
    """'latest', 'best' or a step number -> (manager, step), with clear errors."""
    if which == 'best':
      manager, step = self.best, self.best.best_step()
      if step is None:  # no validation yet: fall back to the latest state
        manager, step = self.latest, self.latest.latest_step()
    elif which == 'latest':
      manager, step = self.latest, self.latest.latest_step()
    else:
      step = int(which)
      manager = self.latest if step in self.latest.all_steps() else self.best
      if step not in manager.all_steps():
        raise FileNotFoundError(
            f'No checkpoint at step {step} in {self.workdir}; available: '
            f'{sorted(set(self.latest.all_steps()) | set(self.best.all_steps()))}.')
    if step is None:
      raise FileNotFoundError(f'{self.workdir!r} has no checkpoint yet: train first '
                              '(python train.py --workdir ...).')
    return manager, step

  def restore(self, which: Union[str, int], abstract_state):
    """Returns (state, meta, step).

    A checkpoint saved before a state field existed (e.g. `params_ema`) restores when the
    field is a scalar placeholder in `abstract_state` (the feature is off for that run's
    config): the field is filled with zeros. A missing field that should hold weights is a
    clear error, not a structure mismatch.
    """
    manager, step = self.resolve(which)
    missing = _fields_not_saved(manager, step, abstract_state)
    target = abstract_state
    if missing:
      wanted = [n for n in missing if getattr(getattr(abstract_state, n), 'shape', None) != ()]
      if wanted:
        raise ValueError(
            f'The checkpoint of step {step} in {self.workdir} has no {", ".join(wanted)}: it '
            'was saved by a run without it (an earlier version, or the option off). Restore '
            'it with the option off (e.g. --config.optim.param_ema_decay=0).')
      target = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(
          abstract_state) if f.name not in missing}
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    state = out.state
    if missing:
      zeros = {n: jnp.zeros((), getattr(abstract_state, n).dtype) for n in missing}
      state = abstract_state.replace(**state, **zeros)
    return state, out.meta, step

  def wait(self) -> None:
    """Waits for the saves in progress; a failed one raises CheckpointSaveError."""
    for name, manager in self._managers():
      try:
        manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        raise self._failed(name, manager, e) from e
      self._saving.pop(name, None)

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def restore_once(workdir: str, which: Union[str, int], abstract_state):
  """(state, meta, step) of one checkpoint of `workdir` ('best', 'latest' or a step), for
  readers that restore once and go (separation, the codec, the export, the prior): the
  checkpointer is closed before returning, also when the restore fails."""
  checkpointer = Checkpointer(workdir)
  try:
    return checkpointer.restore(which, abstract_state)
  finally:
    checkpointer.close()
