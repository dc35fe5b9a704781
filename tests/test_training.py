"""Training: the step lowers the loss, skips NaN batches, resumes bit-exactly, data-parallel."""
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.rqvae import get_config
from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import train_state
from rqvae_jax import training
from rqvae_jax import validation
from tests.conftest import SMALL_GRAPH, smoke_config, two_cpu_devices_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(cfg, seed=0, length=None):
  rng = np.random.default_rng(seed)
  t = np.arange(length or cfg.data.segment_samples) / cfg.data.sample_rate
  freqs = np.array([55.0, 200.0, 330.0, 520.0])
  stems = 0.2 * np.sin(2 * np.pi * freqs * t[:, None] + rng.uniform(0, 6, size=(2, 1, 4)))
  return jnp.asarray(stems + 0.01 * rng.normal(size=stems.shape), jnp.float32)


@pytest.fixture(scope='module')
def step_fn():
  cfg = get_config('smoke')
  cfg.model.quantizer.restart_every = 3
  cfg.loss.mel_weight = 1e-6          # the original code's weight: the time MSE leads
  cfg.optim.lr = 1e-2                 # a visible decrease within 8 steps of a tiny model
  return cfg, jax.jit(functools.partial(training.train_step, config=cfg))


def test_steps_lower_the_loss_and_restart_codes(step_fn):
  cfg, step = step_fn
  state = train_state.create_train_state(cfg, jax.random.PRNGKey(0))
  batch = _batch(cfg)
  losses, restarted = [], []
  for _ in range(8):
    state, m = step(state, batch)
    losses.append(float(m['loss/total']))
    restarted.append(int(np.sum(m['restarted_codes'])))
  assert losses[-1] < 0.95 * losses[0], losses
  assert sum(b < a for a, b in zip(losses, losses[1:])) >= 6, losses
  assert int(state.step) == 8 and int(state.nan_skips) == 0
  # Restarts happen on steps 3 and 6 only (restart_every=3), and some codes were dead.
  assert [i + 1 for i, r in enumerate(restarted) if r] and all(
      r == 0 for i, r in enumerate(restarted) if (i + 1) % 3)
  assert m['perplexity'].shape == (cfg.model.quantizer.num_quantizers,)


def test_remixing_trains_on_the_remixed_batch_from_the_state_key(step_fn):
  """With data.remix_fraction on, a step equals the plain step on
  augment.remix(batch, fold_in(state.rng, _REMIX_STREAM)): the augmentation is wired in
  before the loss, and its key comes from the train state (so resume keeps the stream)."""
  from rqvae_jax import augment
  cfg, step = step_fn
  remixing = cfg.copy_and_resolve_references()
  remixing.data.remix_fraction = 1.0
  remixing.data.stem_gain_range = (0.5, 1.5)
  state = train_state.create_train_state(cfg, jax.random.PRNGKey(0))
  batch = _batch(cfg)
  _, plain = step(state, batch)
  _, remixed = jax.jit(functools.partial(training.train_step, config=remixing))(state, batch)
  manual = augment.remix(batch, jax.random.fold_in(state.rng, training._REMIX_STREAM),
                         remixing.data)
  _, expected = step(state, manual)
  assert abs(float(remixed['loss/total']) - float(plain['loss/total'])) > 1e-4
  np.testing.assert_allclose(float(remixed['loss/total']), float(expected['loss/total']),
                             rtol=1e-5)


def test_nan_batch_is_skipped_and_counted(step_fn):
  cfg, step = step_fn
  state = train_state.create_train_state(cfg, jax.random.PRNGKey(0))
  state, _ = step(state, _batch(cfg))
  before = jax.device_get(state)
  bad = _batch(cfg).at[0, 10, 1].set(jnp.nan)
  state, m = step(state, bad)
  assert float(m['skipped']) == 1.0 and int(state.nan_skips) == 1 and int(state.step) == 2
  for a, b in zip(jax.tree_util.tree_leaves(before.params), jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(before.codebook_stats['quantizer']['usage'],
                                state.codebook_stats['quantizer']['usage'])
  state, m = step(state, _batch(cfg, 1))   # training goes on after the bad batch
  assert float(m['skipped']) == 0.0 and np.isfinite(float(m['loss/total']))


def test_eval_step_pads_windows_of_any_length():
  cfg = get_config('smoke')
  state = train_state.create_train_state(cfg, jax.random.PRNGKey(0))
  n = cfg.data.segment_samples + 99                 # not a length the conv stack maps back
  stems = _batch(cfg, length=n)
  out = jax.jit(functools.partial(training.eval_step, config=cfg))(state, stems)
  assert out['estimate'].shape == stems.shape
  assert np.isfinite(float(out['loss'])) and np.all(np.isfinite(np.asarray(out['sisdri'])))


def test_plateau_halves_lr_and_counts_bad_evals():
  cfg = get_config('smoke')
  state = train_state.create_train_state(cfg, jax.random.PRNGKey(0))
  state = training.plateau_update(state, 3.0, cfg.optim)    # first evaluation: improved from -inf
  assert float(state.lr_scale) == 1.0
  state = training.plateau_update(state, 3.04, cfg.optim)   # +0.04 dB < 0.05: halve
  assert float(state.lr_scale) == 0.5 and int(state.bad_evals) == 0
  state = training.plateau_update(state, 2.0, cfg.optim)
  assert float(state.lr_scale) == 0.25 and int(state.bad_evals) == 1
  assert float(state.best_val) == pytest.approx(3.04)


def test_learning_rate_warmup_and_cosine_decay():
  optim = get_config('smoke').optim
  optim.lr, optim.warmup_steps = 1e-3, 10
  lr = lambda step, scale=1.0: float(train_state.learning_rate(step, scale, optim, 110))
  assert lr(0) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-3)
  assert lr(500) == pytest.approx(1e-3)                       # 'constant' after warm-up
  optim.decay, optim.final_lr_fraction = 'cosine', 0.1
  assert lr(10) == pytest.approx(1e-3)
  assert lr(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))   # half-way: cos(pi / 2) = 0
  assert lr(110) == pytest.approx(1e-4) and lr(1000) == pytest.approx(1e-4)
  assert lr(60, 0.5) == pytest.approx(0.5 * lr(60))           # the plateau scale multiplies
  optim.decay = 'linear'
  with pytest.raises(ValueError, match='cosine'):
    lr(0)


def _params(workdir):
  cfg = ckpt_lib.load_config(workdir)
  abstract = train_state.create_train_state(cfg, jax.random.PRNGKey(0))
  state, meta, step = ckpt_lib.Checkpointer(workdir).restore('latest', abstract)
  return state, meta, step


def test_resume_matches_uninterrupted_run(tmp_path, smoke_run):
  cfg, full = smoke_run
  full = type(tmp_path)(full)
  part = tmp_path / 'part'
  cfg_half = smoke_config(tmp_path, num_train_steps=2)
  cfg_half.data.synthetic.cache_dir = cfg.data.synthetic.cache_dir
  training.train_and_evaluate(cfg_half, str(part))
  assert ckpt_lib.Checkpointer(str(part)).latest_step() == 2
  # What `kill -9` in the middle of saving step 3 leaves on disk: Orbax's unfinished temporary
  # folder with truncated files (a finished save is renamed to `3/` at the very end).
  ckpts = part / 'checkpoints'
  partial = ckpts / '3.orbax-checkpoint-tmp-1795600000000000'
  shutil.copytree(ckpts / '2', partial)
  files = [p for p in partial.rglob('*') if p.is_file()]
  assert files
  for f in files:
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 3])
  assert ckpt_lib.Checkpointer(str(part)).latest_step() == 2
  cfg = smoke_config(tmp_path)
  cfg.data.synthetic.cache_dir = cfg_half.data.synthetic.cache_dir
  training.train_and_evaluate(cfg, str(part))      # resumes at 2, finishes at 4
  assert not [n for n in os.listdir(ckpts) if 'tmp' in n]   # the partial save was removed
  a, meta_a, step_a = _params(str(full))
  b, _, step_b = _params(str(part))
  assert step_a == step_b == 4 and meta_a['config_hash']
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=1e-6)
  # TensorBoard events and the config are in the workdir; the best checkpoint exists.
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(full))
  assert json.load(open(full / 'config.json'))['variant'] == 'smoke'
  # best/ holds the step with the highest validation SI-SDRi of the run's history.
  history = [json.loads(line) for line in open(full / validation.VAL_HISTORY)]
  assert [h['step'] for h in history] == [2, 4]
  best = max(history, key=lambda h: h['val/sisdri_mean'])['step']
  assert ckpt_lib.Checkpointer(str(full)).resolve('best')[1] == best


def test_config_mismatch_names_fields(tmp_path):
  cfg = smoke_config(tmp_path)
  ckpt_lib.save_config(str(tmp_path / 'w'), cfg)
  other = smoke_config(tmp_path)
  other.model.channels = (4, 8, 8, 16, 32)
  other.model.quantizer.codebook_size = 64
  with pytest.raises(ValueError, match=r'model\.channels.*\n.*model\.quantizer\.codebook_size'):
    training.train_and_evaluate(other, str(tmp_path / 'w'))


def test_config_of_an_older_workdir_gets_new_fields_as_defaults(tmp_path):
  cfg = smoke_config(tmp_path)
  cfg.inference.overlap = 0.25
  ckpt_lib.save_config(str(tmp_path), cfg)
  path = tmp_path / ckpt_lib.CONFIG_FILE
  saved = json.loads(path.read_text())
  del saved['inference']['in_flight']            # written before the field existed
  saved['model']['extra_field'] = 7              # a field these defaults do not know
  path.write_text(json.dumps(saved))
  loaded = ckpt_lib.load_config(str(tmp_path))
  assert loaded.inference.in_flight == get_config('smoke').inference.in_flight
  assert loaded.inference.overlap == 0.25 and loaded.model.extra_field == 7
  assert tuple(loaded.model.channels) == tuple(cfg.model.channels)


def test_train_cli_rejects_unknown_override(tmp_path):
  out = subprocess.run([sys.executable, 'train.py', '--config', 'configs/rqvae.py:smoke',
                        '--workdir', str(tmp_path), '--config.optim.learning_rate=1'],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert 'learning_rate' in out.stderr


def test_train_cli_trains_then_refuses_a_changed_resume_in_one_line(smoke_run, tmp_path):
  """python train.py end to end (the smoke run's programs: compiled once, cached), then the
  same command with another data.sample_rate: one error line naming the field, exit 1."""
  cfg, _ = smoke_run
  workdir = tmp_path / 'w'
  command = [sys.executable, 'train.py', '--config', 'configs/rqvae.py:smoke',
             '--workdir', str(workdir), '--config.num_train_steps=2',
             f'--config.data.synthetic.cache_dir={cfg.data.synthetic.cache_dir}']
  out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert ckpt_lib.Checkpointer(str(workdir)).latest_step() == 2
  assert ckpt_lib.load_config(str(workdir)).num_train_steps == 2
  out = subprocess.run(command + ['--config.data.sample_rate=44100'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert 'data.sample_rate: checkpoint has 22050, config has 44100' in out.stderr
  assert ckpt_lib.load_config(str(workdir)).data.sample_rate == 22050


_TWO_DEVICES = r'''
import functools, json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, {repo!r})
from configs.rqvae import get_config
from rqvae_jax import parallel, train_state, training
cfg = get_config('smoke')
cfg.batch_size = 4
cfg.model.quantizer.restart_every = 0   # one step, no restart: only reduction order differs
# Adam's first step is ~lr * sign(g), which turns float noise in exactly-zero gradients (e.g.
# a bias followed by a training-mode BatchNorm) into +-lr. eps=1 makes the step ~lr * g, so
# the comparison checks the gradients and the update itself.
cfg.optim.eps = 1.0
cfg.update_from_flattened_dict({small_graph!r})   # compiled twice: keep the graph small
rng = np.random.default_rng(0)
batch = (0.1 * rng.normal(size=(4, cfg.data.segment_samples, 4))).astype(np.float32)
assert jax.device_count() == 2, jax.devices()
for n in (1, 2):
  mesh = parallel.make_mesh(jax.devices()[:n])
  repl = parallel.replicated(mesh)
  state = jax.device_put(train_state.create_train_state(cfg, jax.random.PRNGKey(0)), repl)
  before = jax.device_get(state.params)
  step = jax.jit(functools.partial(training.train_step, config=cfg),
                 in_shardings=(repl, parallel.data_sharded(mesh)), out_shardings=(repl, repl))
  state, m = step(state, parallel.shard_batch(batch, mesh))
  delta = jax.tree_util.tree_map(
      lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
      jax.device_get(state.params), before)
  leaves = {{jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(delta)}}
  np.savez({out!r} + f'{{n}}.npz', **leaves)
  print(json.dumps({{'devices': len(mesh.devices.flat), 'loss': float(m['loss/total'])}}))
'''


def test_two_devices_match_one_device(tmp_path):
  # One process with two fake CPU devices runs the step on a 1-device and a 2-device mesh.
  env = two_cpu_devices_env()
  out = tmp_path / 'params'
  script = _TWO_DEVICES.format(repo=REPO, out=str(out), small_graph=SMALL_GRAPH)
  proc = subprocess.run([sys.executable, '-c', script],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = {}
  for line in proc.stdout.strip().splitlines()[-2:]:
    info = json.loads(line)
    n = info['devices']
    results[n] = (info['loss'], dict(np.load(f'{out}{n}.npz')))
  assert set(results) == {1, 2}
  # Same global batch, same math; only the reduction order of the collectives differs.
  assert results[1][0] == pytest.approx(results[2][0], rel=1e-5)
  one, two = results[1][1], results[2][1]
  assert set(one) == set(two) and len(one) > 50
  # The parameter updates agree to 1% of the largest update (float32 reduction order).
  scale = max(float(np.max(np.abs(v))) for v in one.values())
  assert scale > 0
  for key in one:
    np.testing.assert_allclose(one[key], two[key], rtol=1e-2, atol=1e-2 * scale, err_msg=key)


def test_kmeans_uses_training_mode_frames_and_keeps_batch_stats(monkeypatch):
  """k-means fits the frames a training forward quantizes (batch statistics, dropout), not the
  eval-mode ones, whose running statistics at init make them much narrower."""
  cfg = get_config('smoke')
  state = train_state.create_train_state(cfg, jax.random.PRNGKey(0))
  mixtures = np.concatenate([np.asarray(_batch(cfg, seed)).sum(-1) for seed in (0, 1)])
  assert len(mixtures) == 2 * cfg.batch_size
  seen = {}
  original_init = training.qz.kmeans_init_codebooks

  def spy(codebooks, frames, *args, **kwargs):
    seen['frames'] = np.asarray(frames)
    return original_init(codebooks, frames, *args, **kwargs)

  monkeypatch.setattr(training.qz, 'kmeans_init_codebooks', spy)
  before = jax.device_get(state)
  after = training.kmeans_initialize(state, mixtures, cfg)

  # What train_step quantizes: the first stage's input of a training forward on a training
  # batch of other mixtures, with batch statistics.
  model = training.RQVAE(cfg.model)
  (_, aux), _ = jax.jit(lambda v, x, r: model.apply(
      v, x, train=True, rngs={'dropout': r}, mutable=training.MUTABLE))(
          state.variables(), np.asarray(_batch(cfg, 2)).sum(-1), jax.random.PRNGKey(3))
  eval_frames = model.apply(state.variables(), mixtures, method=training.RQVAE.encode_frames)[0]
  d = cfg.model.channels[-1]
  # Width of the frames' cloud: per-channel std over frames, averaged over channels (the
  # overall std is dominated by the channels' constant offsets, which k-means does not mind).
  spread = lambda frames: float(np.mean(np.std(np.asarray(frames).reshape(-1, d), axis=0)))
  train_std = spread(np.asarray(aux['residuals'])[:, :, 0])
  eval_std, kmeans_std = spread(eval_frames), spread(seen['frames'])
  assert seen['frames'].shape == (len(mixtures) * aux['codes'].shape[1], d)
  assert abs(kmeans_std / train_std - 1) < 0.2, (kmeans_std, train_std, eval_std)
  assert train_std > 2 * eval_std, (kmeans_std, train_std, eval_std)

  # The running statistics are the state's, unchanged; only the first codebook was fitted.
  for a, b in zip(jax.tree_util.tree_leaves(before.batch_stats),
                  jax.tree_util.tree_leaves(jax.device_get(after.batch_stats))):
    np.testing.assert_array_equal(a, b)
  cb_before = before.params['quantizer']['codebooks']
  cb_after = np.asarray(after.params['quantizer']['codebooks'])
  assert not np.allclose(cb_after[0], cb_before[0])
  np.testing.assert_array_equal(cb_after[1:], cb_before[1:])


@pytest.fixture(scope='module')
def smoke_validation(tmp_path_factory):
  """(config, validation tracks, protocol windows) of the smoke config's synthetic data."""
  from data import pipeline, slakh, windows as windows_lib
  cfg = smoke_config(tmp_path_factory.mktemp('smoke_validation'))
  tracks = slakh.scan(pipeline.resolve_root(cfg.data), 'validation', cfg.data).kept
  return cfg, tracks, windows_lib.eval_windows(tracks, cfg.data)


def test_validation_batches_zero_means_every_window(smoke_validation):
  cfg, tracks, ev = smoke_validation
  cfg.num_eval_batches = 0
  batch_size = 7
  assert ev.num_kept % batch_size, 'the test needs a padded last batch'
  batches = list(validation.validation_batches(tracks, cfg, batch_size))
  assert len(batches) == -(-ev.num_kept // batch_size)
  stems = np.concatenate([b for b, _ in batches])
  valid = np.concatenate([v for _, v in batches])
  assert stems.shape == (len(batches) * batch_size, cfg.data.eval_window_samples, 4)
  assert valid.sum() == ev.num_kept and valid[:ev.num_kept].all()   # padding: the tail only
  from data import pipeline
  for i in (0, ev.num_kept - 1):
    t, start = ev.windows[i]
    np.testing.assert_array_equal(stems[i], pipeline.load_stems(
        tracks[t], start, cfg.data.eval_window_samples, cfg.data.stems))
  cfg.num_eval_batches = 1                  # a subset: one batch spread over the split
  (subset, subset_valid), = list(validation.validation_batches(tracks, cfg, batch_size))
  assert subset.shape[0] == batch_size and subset_valid.all()


def test_validate_leaves_padded_rows_out_of_the_means(smoke_validation):
  from rqvae_jax import parallel
  cfg, tracks, ev = smoke_validation
  cfg.num_eval_batches = 0
  batch_size = 7                            # 24 windows: the last batch has 4 padded rows
  state = train_state.create_train_state(cfg, jax.random.PRNGKey(0))
  p_eval_step = jax.jit(functools.partial(training.eval_step, config=cfg))
  mesh = parallel.make_mesh(jax.devices()[:1])
  batches = list(validation.validation_batches(tracks, cfg, batch_size))
  result, _ = validation.validate(state, p_eval_step, batches, mesh, cfg)

  # By hand, over the real windows only: mean SI-SDRi per stem over non-silent references.
  real = np.concatenate([b[v] for b, v in batches])
  assert len(real) == ev.num_kept
  out = jax.jit(functools.partial(training.eval_step, config=cfg))(state, real)
  sisdri, active = np.asarray(out['sisdri']), np.asarray(out['active'], bool)
  np.testing.assert_array_equal(active, ev.active)
  per_stem = [sisdri[active[:, s], s].mean() for s in range(4) if active[:, s].any()]
  np.testing.assert_allclose(result['val/sisdri_mean'], np.mean(per_stem), rtol=1e-5)
  # Counting the padded rows (the old behaviour) would give another mean.
  last, last_valid = batches[-1]
  assert (~last_valid).sum() >= 2
  pad_out = p_eval_step(state, last)
  all_sisdri = np.concatenate([sisdri, np.asarray(pad_out['sisdri'])[~last_valid]])
  all_active = np.concatenate([active, np.asarray(pad_out['active'], bool)[~last_valid]])
  naive = np.mean([all_sisdri[all_active[:, s], s].mean() for s in range(4)
                   if all_active[:, s].any()])
  assert abs(naive - result['val/sisdri_mean']) > 1e-3, (naive, result)

  # Whatever the padded rows hold, the result is the same.
  loud = [(b, v) for b, v in batches[:-1]] + [
      (np.where(last_valid[:, None, None], last, 3.0 * last[::-1]), last_valid)]
  again, _ = validation.validate(state, p_eval_step, loud, mesh, cfg)
  for key in result:
    if key != 'val/loss':
      np.testing.assert_allclose(again[key], result[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize('head', ['mask', 'waveform'])
def test_demo_recipe_overfits_two_fixed_windows(head):
  """The whole gradient path (normalisation, skips, quantizer with k-means, the demo's loss:
  time MSE + commitment + SI-SDR term, cosine schedule) can separate two fixed windows:
  mean SI-SDRi over their non-silent stems climbs past 12 dB within 150 steps, with the
  demo's mask head and with the paper's waveform decoder. A broken path (no gradient
  through the straight-through estimator, a wrong output scale, a loss that ignores a
  stem) stalls near 0 dB."""
  from data import synthetic
  from rqvae_jax import metrics
  cfg = get_config('demo')
  cfg.model.output_head = head
  cfg.model.channels = (8, 16, 32, 32, 32)          # the demo's layers, narrower
  cfg.model.lstm_layers = 1
  cfg.model.quantizer.codebook_size = 64
  cfg.optim.lr = 5e-3                               # 15 dB at step 150 here (12 needed)
  cfg.data.segment_samples = 10000
  cfg.num_train_steps = 150
  cfg.data.synthetic.min_seconds = cfg.data.synthetic.max_seconds = 4.0
  track = synthetic.generate_track(0, 3, 'train', cfg.data)
  stems = np.stack([track[s] for s in cfg.data.stems], -1)
  batch = jnp.asarray(np.stack([stems[s:s + 10000] for s in (22050, 55000)]))
  active = np.asarray(metrics.active_stem_mask(batch, cfg.data.silence_threshold))
  assert active.sum() >= 5                           # at least 5 stems to separate
  state = train_state.create_train_state(cfg, jax.random.PRNGKey(0))
  state = training.kmeans_initialize(state, np.asarray(batch.sum(-1)), cfg)
  step = jax.jit(functools.partial(training.train_step, config=cfg))
  evaluate = jax.jit(functools.partial(training.eval_step, config=cfg))
  first = np.asarray(evaluate(state, batch)['sisdri'])[active].mean()
  for _ in range(cfg.num_train_steps):
    state, m = step(state, batch)
  assert 'loss/sisdr' in m and np.isfinite(float(m['loss/total']))
  last = np.asarray(evaluate(state, batch)['sisdri'])[active].mean()
  assert first < 5.0 and last > 12.0, (first, last)


def test_failed_async_save_is_raised_at_once_with_path_and_free_space(tmp_path, monkeypatch):
  """A save that fails in the background (here: ENOSPC from the writer) is raised by the
  next check_saves (training calls it after every step), naming the folder and the free
  space; the earlier checkpoint survives and the next start removes the partial folder."""
  import errno
  import time
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'w'), keep=3)
  state = {'w': jnp.arange(1000.0)}
  ck.save(1, state, {'step': 1})
  ck.wait()

  async def disk_full(self, item, directory):
    raise OSError(errno.ENOSPC, 'No space left on device', str(directory))

  monkeypatch.setattr(jch.JsonCheckpointHandler, '_save_fn', disk_full)
  deadline = time.time() + 60
  with pytest.raises(ckpt_lib.CheckpointSaveError) as raised:
    ck.save(2, state, {'step': 2})      # usually returns and fails in the background
    while time.time() < deadline:
      ck.check_saves()
      time.sleep(0.05)
  message = str(raised.value)
  assert f"step 2 to {tmp_path / 'w' / 'checkpoints' / '2'} failed" in message
  assert 'No space left' in message and 'GiB free of' in message and '([1])' in message
  monkeypatch.undo()
  ck.close()
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'w'), cleanup=True)    # the next start
  assert os.listdir(tmp_path / 'w' / 'checkpoints') == ['1']       # partial folder removed
  restored, meta, step = ck.restore('latest', state)
  assert step == 1 and meta == {'step': 1}
  ck.close()


def test_save_failing_before_it_returns_names_its_own_step(tmp_path, monkeypatch):
  """A save that fails at once (no earlier save in flight) is reported as that step's, with
  its folder, and the earlier checkpoint is named as intact."""
  import errno
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'w'), keep=3)
  state = {'w': jnp.arange(10.0)}
  ck.save(1, state, {'step': 1})
  ck.wait()

  def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(ck.latest, 'save', disk_full)
  with pytest.raises(ckpt_lib.CheckpointSaveError) as raised:
    ck.save(2, state, {'step': 2})
  message = str(raised.value)
  assert f"step 2 to {tmp_path / 'w' / 'checkpoints' / '2'} failed" in message
  assert 'No space left' in message and '([1])' in message
  monkeypatch.undo()
  ck.close()


def test_unfinished_save_folders_are_removed_when_training_starts(tmp_path):
  w = tmp_path / 'w'
  ck = ckpt_lib.Checkpointer(str(w))
  ck.save(1, {'x': jnp.ones(3)}, {'step': 1})
  ck.wait()
  ck.close()
  for folder in ('checkpoints/2.orbax-checkpoint-tmp-1795600000000000',
                 'checkpoints/3.orbax-checkpoint-tmp', 'best/1.orbax-checkpoint-tmp'):
    (w / folder / 'state').mkdir(parents=True)
  ckpt_lib.Checkpointer(str(w)).close()               # readers (eval, separate) leave them
  assert len(os.listdir(w / 'checkpoints')) == 3
  ckpt_lib.Checkpointer(str(w), cleanup=True).close()
  assert os.listdir(w / 'checkpoints') == ['1'] and os.listdir(w / 'best') == []


def test_checkpointer_resolve_fallbacks(tmp_path):
  """'best' falls back to the latest state before any validation; a step is looked up in
  checkpoints/ then best/; what is missing is a clear error listing what exists."""
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'w'), keep=1)
  state = {'x': jnp.zeros(3)}
  for which in ('best', 'latest'):
    with pytest.raises(FileNotFoundError, match='has no checkpoint yet'):
      ck.resolve(which)
  ck.save(2, state, {'step': 2})
  ck.wait()
  assert ck.resolve('best') == (ck.latest, 2)            # no validation yet: the latest
  ck.save_if_best(2, state, {'step': 2}, 3.0)
  ck.wait()
  ck.save(4, {'x': jnp.ones(3)}, {'step': 4})
  ck.save_if_best(4, {'x': jnp.ones(3)}, {'step': 4}, 1.0)      # worse: best stays at 2
  ck.wait()
  assert ck.resolve('best') == (ck.best, 2) and ck.resolve('latest') == (ck.latest, 4)
  assert ck.resolve(2) == (ck.best, 2) and ck.resolve('4') == (ck.latest, 4)   # keep=1
  np.testing.assert_array_equal(ck.restore(2, state)[0]['x'], np.zeros(3))
  with pytest.raises(FileNotFoundError, match=r'No checkpoint at step 3 .*available: \[2, 4\]'):
    ck.resolve(3)
  ck.close()


def test_the_two_checkpoint_managers_use_distinct_barrier_names(tmp_path):
  """With several processes, checkpoints/ and best/ often save the same step at once; Orbax
  names its commit barriers after the step folder, so without distinct prefixes the second
  save fails ('Barrier _async_write_complete.2 is already ongoing', seen in
  tests/test_distributed.py on a loaded machine)."""
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'w'))
  prefixes = [m._options.multiprocessing_options.barrier_sync_key_prefix   # pylint: disable=protected-access
              for _, m in ck._managers()]                                  # pylint: disable=protected-access
  assert all(prefixes) and len(set(prefixes)) == 2, prefixes
  ck.close()


def test_polyak_average_of_the_weights_follows_its_formula_and_feeds_validation(step_fn):
  """With optim.param_ema_decay on, each step sets params_ema <- d * params_ema + (1 - d) *
  params with d = min(decay, (1 + t) / (10 + t)) at step t (NumPy check over every leaf);
  variables(use_ema=True) then holds the average (codebooks: the codebook EMA), and
  param_ema=False or use_ema=False the raw weights. Off, the field is a scalar placeholder."""
  cfg, _ = step_fn
  cfg = cfg.copy_and_resolve_references()
  cfg.update_from_flattened_dict(SMALL_GRAPH)    # a plumbing check: half the graph to compile
  cfg.optim.param_ema_decay = 0.5
  step = jax.jit(functools.partial(training.train_step, config=cfg))
  state = train_state.create_train_state(cfg, jax.random.PRNGKey(0))
  assert train_state.keeps_param_ema(state)
  batch = _batch(cfg)
  ema = jax.tree_util.tree_map(np.asarray, state.params_ema)
  for t in range(12):
    state, _ = step(state, batch)
    d = min(0.5, (1.0 + t) / (10.0 + t))
    ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * np.asarray(p), ema,
                                 state.params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         jax.tree_util.tree_map(np.asarray, state.params_ema), ema)
  v = state.variables(use_ema=True)
  enc = lambda p: np.asarray(jax.tree_util.tree_leaves(p['encoder'])[0])
  np.testing.assert_allclose(enc(v['params']), enc(ema), rtol=1e-5, atol=1e-6)
  assert not np.allclose(enc(v['params']), enc(state.params))     # the average differs
  np.testing.assert_array_equal(v['params']['quantizer']['codebooks'], state.codebook_ema)
  for raw in (state.variables(use_ema=True, param_ema=False), state.variables()):
    np.testing.assert_array_equal(enc(raw['params']), enc(state.params))
  # What separate and the codec restore: the config's inference section picks the same.
  inference = cfg.inference.copy_and_resolve_references()
  np.testing.assert_array_equal(enc(state.inference_variables(inference)['params']),
                                enc(v['params']))
  inference.use_ema_params = False
  np.testing.assert_array_equal(enc(state.inference_variables(inference)['params']),
                                enc(state.params))
  off = train_state.create_train_state(step_fn[0], jax.random.PRNGKey(0))   # decay 0: off
  assert not train_state.keeps_param_ema(off) and off.params_ema.shape == ()


def test_checkpoint_saved_before_params_ema_restores_with_it_off(tmp_path, step_fn):
  """A TrainState saved before the params_ema field existed (its other fields only) restores
  into today's state with the field a zero placeholder; asked for weights it cannot give
  (the average on), the restore names the field and the fix."""
  cfg, _ = step_fn
  state = train_state.create_train_state(cfg, jax.random.PRNGKey(0))
  old = {f: getattr(state, f) for f in state.__dataclass_fields__ if f != 'params_ema'}
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'w'))
  ck.save(3, old, {'step': 3})
  ck.wait()
  ck.close()
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'w'))        # a reader, as eval and separate are
  abstract = train_state.abstract_train_state(cfg)
  restored, meta, step = ck.restore('latest', abstract)
  assert step == 3 and meta['step'] == 3 and float(restored.params_ema) == 0.0
  np.testing.assert_array_equal(restored.codebook_ema, state.codebook_ema)
  on = cfg.copy_and_resolve_references()
  on.optim.param_ema_decay = 0.99
  abstract_on = train_state.abstract_train_state(on)
  with pytest.raises(ValueError, match=r'no params_ema.*param_ema_decay=0'):
    ck.restore('latest', abstract_on)
  ck.close()


def test_restore_train_state_reads_a_workdirs_checkpoint(tmp_path, step_fn):
  """What separation, the codec and the export start from: (state, step) of 'latest', of
  'best' (no validation yet: the latest) and of a step; an empty workdir is a clear error."""
  cfg, _ = step_fn
  with pytest.raises(FileNotFoundError, match='has no checkpoint yet'):
    train_state.restore_train_state(str(tmp_path / 'empty'), cfg, 'best')
  state = train_state.create_train_state(cfg, jax.random.PRNGKey(1))
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'w'))
  ck.save(5, state, {'step': 5})
  ck.wait()
  ck.close()
  for which in ('latest', 'best', 5):
    restored, step = train_state.restore_train_state(str(tmp_path / 'w'), cfg, which)
    assert step == 5
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored.params),
                           jax.device_get(state.params))
    np.testing.assert_array_equal(restored.codebook_ema, state.codebook_ema)
