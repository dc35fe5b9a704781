"""Resuming a run: which config fields may change, and restoring before the config is saved.

A workdir's checkpoint is only meaningful with the config that produced it. Fields that
shape the state (model, quantizer, the optimiser's transform chain) must match or the
restore fails; fields that give the data its meaning (sample rate, stems, root, segment,
seed, batch) must match or the run silently continues on other data (and separation later
resamples to the wrong rate). So every field is compared, except those listed in
`ALLOWED_TO_CHANGE`, which only steer how long and how verbosely training goes on, or how
eval/separate run later. A field can also be accepted by name (train.py --allow_changed),
for a user who knows it is safe, e.g. data.root after moving the same data.

The saved config.json is replaced only after the checkpoint was restored, so a failed resume
leaves the workdir as eval and separate need it.
"""
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import ml_collections

from rqvae_jax import checkpoints as ckpt_lib

# Field (or section, with every field under it) -> why changing it on resume is safe.
ALLOWED_TO_CHANGE: Dict[str, str] = {
    'num_train_steps': 'train longer or shorter (a cosine decay is stretched to the new end)',
    'log_every_steps': 'console and TensorBoard logging only',
    'eval_every_steps': 'when validation runs; the state does not depend on it',
    'checkpoint_every_steps': 'when checkpoints are written',
    'keep_checkpoints': 'how many checkpoints are kept',
    'num_audio_examples': 'TensorBoard audio examples only',
    'num_eval_batches': 'how many validation windows are scored',
    'optim.lr': 'the learning rate is applied in the step, not stored in the state',
    'optim.decay': 'the schedule is a function of the step',
    'optim.final_lr_fraction': 'the schedule is a function of the step',
    'optim.warmup_steps': 'the schedule is a function of the step',
    'optim.plateau_factor': 'the plateau rule reads it at each evaluation',
    'optim.plateau_min_delta': 'the plateau rule reads it at each evaluation',
    'optim.early_stop_patience': 'read at each evaluation',
    'data.num_parallel_reads': 'reading throughput only',
    'data.prefetch_batches': 'reading throughput only',
    'data.synthetic.cache_dir': 'where the (seeded, identical) synthetic set is cached',
    'model.conv_impl': 'the same convolutions computed in another form (blocks.conv)',
    'inference': 'separation settings, used by eval and separate, not by training',
    'eval': 'evaluation protocol settings of eval.py, not used by training',
}


def is_allowed(key: str, extra: Sequence[str] = ()) -> bool:
  """Whether `key` ('optim.lr') is in ALLOWED_TO_CHANGE or `extra`, itself or by section."""
  names = list(ALLOWED_TO_CHANGE) + [e.strip() for e in extra if e.strip()]
  return any(key == n or key.startswith(n + '.') for n in names)


def resume_differences(saved: ml_collections.ConfigDict, given: ml_collections.ConfigDict,
                       allow: Sequence[str] = ()) -> List[str]:
  """The fields that differ and may not: 'data.sample_rate: checkpoint has 22050, config
  has 44100'."""
  a = ckpt_lib._flatten(saved.to_dict() if hasattr(saved, 'to_dict') else saved)  # pylint: disable=protected-access
  b = ckpt_lib._flatten(given.to_dict() if hasattr(given, 'to_dict') else given)  # pylint: disable=protected-access
  diffs = []
  for key in sorted(set(a) | set(b)):
    if is_allowed(key, allow):
      continue
    x, y = a.get(key, '<missing>'), b.get(key, '<missing>')
    if x != y:
      diffs.append(f'{key}: checkpoint has {x!r}, config has {y!r}')
  return diffs


def check_resume(saved, given, workdir: str, allow: Sequence[str] = ()) -> None:
  """Raises a ValueError naming every field that differs and may not change on resume."""
  diffs = resume_differences(saved, given, allow)
  if diffs:
    raise ValueError(
        f'Cannot resume {workdir} with this config; these fields differ from the run '
        'that wrote its checkpoints:\n  ' + '\n  '.join(diffs) + '\nResume with the first '
        f'run\'s --config and overrides (saved in {workdir}/{ckpt_lib.CONFIG_FILE}), use a '
        'new --workdir, or, if a field is safe to change (e.g. data.root after moving the '
        'same data), pass --allow_changed=FIELD. Fields that may always change: '
        + ', '.join(ALLOWED_TO_CHANGE) + '.')


def restore_or_start(config: ml_collections.ConfigDict, workdir: str,
                     checkpointer: ckpt_lib.Checkpointer, make_state: Callable[[], object],
                     is_main: bool, allow: Sequence[str] = ()) -> Tuple[object, int]:
  """(state, start step): the latest checkpoint restored, or a fresh `make_state()` at step 0,
  after the config check against a saved config.json; then (main process only) config.json
  is written.

  The check comes before `make_state`, so a changed field fails in a second, before any
  compilation.

  Raises:
    ValueError: a changed field (nothing restored, config.json unchanged) or a checkpoint
      that does not restore into this config's state (config.json unchanged).
  """
  try:          # a workdir belongs to one run, even one stopped before its first checkpoint
    check_resume(ckpt_lib.load_config(workdir), config, workdir, allow)
  except FileNotFoundError:
    pass                            # a new workdir (or checkpoints alone: the restore decides)
  step: Optional[int] = checkpointer.latest_step()
  if step is None:
    state = make_state()
  else:
    try:
      state, _, step = checkpointer.restore('latest', make_state())
    except Exception as e:  # pylint: disable=broad-except   (Orbax raises many kinds)
      first = (str(e).strip().splitlines() or [''])[0]
      raise ValueError(
          f'The checkpoint at step {step} in {workdir} does not restore into this config\'s '
          f'state ({type(e).__name__}: {first}). {ckpt_lib.CONFIG_FILE} was left unchanged; '
          'resume with the saved config, or start a new --workdir.') from e
    print(f'Resumed from {workdir} at step {step}.', file=sys.stderr)
  if is_main:
    ckpt_lib.save_config(workdir, config)
  return state, int(step or 0)
