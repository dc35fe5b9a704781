"""Resuming with a changed config: refused field by field, config.json kept until a restore."""
import shutil

import pytest

from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import resume
from rqvae_jax import separate
from rqvae_jax import training


def _set(config, key, value):
  config = config.copy_and_resolve_references()
  node = config
  *path, last = key.split('.')
  for p in path:
    node = node[p]
  node[last] = value
  return config


@pytest.fixture
def workdir(smoke_run, tmp_path):
  """A copy of the finished smoke run (step 4), so tests may try to resume it."""
  return str(shutil.copytree(smoke_run[1], tmp_path / 'w'))


def test_changed_state_or_data_fields_are_refused_and_config_kept(smoke_run, workdir, tmp_path):
  cfg = smoke_run[0]
  before = open(f'{workdir}/config.json').read()
  for key, value in (('optim.grad_clip_norm', 1.0),     # another optimiser state structure
                     ('data.sample_rate', 44100),        # other data: silently wrong before
                     ('data.root', str(tmp_path)),
                     ('batch_size', 4)):
    with pytest.raises(ValueError, match=rf'{key}: checkpoint has .*, config has '
                                         r'(?s:.*)--allow_changed'):
      training.train_and_evaluate(_set(cfg, key, value), workdir)
    assert open(f'{workdir}/config.json').read() == before, key
  separate.Separator.from_workdir(workdir, 'latest')     # eval and separate still restore it


def test_a_failed_restore_leaves_config_json_as_it_was(smoke_run, workdir):
  before = open(f'{workdir}/config.json').read()
  changed = _set(smoke_run[0], 'optim.grad_clip_norm', 1.0)
  with pytest.raises(ValueError, match='step 4 .* does not restore .*config.json was left '
                                       'unchanged'):
    training.train_and_evaluate(changed, workdir, allow_changed=['optim.grad_clip_norm'])
  assert open(f'{workdir}/config.json').read() == before


def test_listed_fields_may_change_and_are_saved_after_the_restore(smoke_run, workdir):
  changed = _set(_set(smoke_run[0], 'optim.lr', 5e-4), 'log_every_steps', 7)
  changed = _set(changed, 'inference.overlap', 0.25)
  training.train_and_evaluate(changed, workdir)          # already at its last step
  saved = ckpt_lib.load_config(workdir)
  assert (saved.optim.lr, saved.log_every_steps, saved.inference.overlap) == (5e-4, 7, 0.25)


def test_allowed_fields_are_documented_and_matched_by_section():
  assert resume.is_allowed('inference.chunk_samples') and resume.is_allowed('optim.lr')
  assert not resume.is_allowed('optim.lr_scale') and not resume.is_allowed('model.channels')
  assert resume.is_allowed('data.root', ['data.root'])
  assert all(why for why in resume.ALLOWED_TO_CHANGE.values())
