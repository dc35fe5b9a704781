"""Training: a pure jitted `train_step` and `eval_step`, k-means init, and `train_and_evaluate`.

The state (`rqvae_jax.train_state.TrainState`) holds everything a resumed run needs (params,
BatchNorm statistics, codebook usage, optimiser state, the EMA of the codebooks, the rng, the
step and the plateau schedule), so a run restarted from a checkpoint continues bit for bit:
the data stream is a function of (seed, step, process) and the step is a pure function of
(state, batch).
"""
import functools
import math
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rqvae_jax import augment
from rqvae_jax import bottleneck
from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import losses
from rqvae_jax import metrics as metrics_lib
from rqvae_jax import parallel
from rqvae_jax import quantizer as qz
from rqvae_jax import resume
from rqvae_jax import summaries
from rqvae_jax import train_state as state_lib
from rqvae_jax import validation
from rqvae_jax.model import RQVAE, next_valid_length, normalize

MUTABLE = ['batch_stats', qz.STATS]
_REMIX_STREAM = 0x5E11            # fold_in constant of the augmentation's key


def codebook_summaries(counts, usage, threshold) -> Dict[str, jax.Array]:
  return {'perplexity': metrics_lib.perplexity(counts), 'used_codes': metrics_lib.used_codes(counts),
          'dead_codes': metrics_lib.dead_codes(usage, threshold)}


def train_step(state: state_lib.TrainState, batch: jax.Array, *,
               config: ml_collections.ConfigDict
               ) -> Tuple[state_lib.TrainState, Dict[str, jax.Array]]:
  """One update on a batch of stems (B, N, S): forward, loss parts, grads, Adam, usage EMA,
  dead-code restart every `restart_every` steps, codebook EMA, and a NaN/inf guard that
  keeps the old state (and counts the skip) instead of poisoning it."""
  model = RQVAE(config.model)
  qcfg = config.model.quantizer
  rng, dropout_rng, restart_rng = jax.random.split(state.rng, 3)
  if augment.enabled(config.data):    # its own key: runs without it keep their random stream
    batch = augment.remix(batch, jax.random.fold_in(state.rng, _REMIX_STREAM), config.data)
  mixture = jnp.sum(batch, axis=-1)
  target = normalize(batch, config.model)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats,
                 qz.STATS: state.codebook_stats}
    (estimate, aux), new_vars = model.apply(variables, mixture, train=True,
                                            rngs={'dropout': dropout_rng}, mutable=MUTABLE)
    loss, parts = losses.total_loss(target, normalize(estimate, config.model), aux, config.loss,
                                    config.data.sample_rate)
    if config.loss.get('sisdr_weight', 0.0):
      parts['sisdr'] = losses.sisdr_loss(batch, estimate, config.data.silence_threshold)
      loss = loss + config.loss.sisdr_weight * parts['sisdr']
      parts['total'] = loss
    if config.loss.stft_weight:
      parts['stft'] = losses.multiresolution_stft_loss(
          target, normalize(estimate, config.model), config.loss.stft_window_powers,
          config.loss.stft_log_floor)
      loss = loss + config.loss.stft_weight * parts['stft']
      parts['total'] = loss
    return loss, (parts, new_vars, aux)

  (loss, (parts, new_vars, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  lr = state_lib.learning_rate(state.step, state.lr_scale, config.optim, config.num_train_steps)
  has_codes = bottleneck.has_codes(config.model)   # Gaussian: no codebooks, usage or restarts
  num_q = qcfg.num_quantizers if has_codes else 0

  def updated():
    """The next params, BatchNorm statistics, code usage, optimizer state, codebook EMA and
    weight average, and the codes restarted per stage."""
    optimizer = state_lib.make_optimizer(config.optim)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, jax.tree_util.tree_map(lambda u: -lr * u, updates))
    codebook_stats, ema = state.codebook_stats, state.codebook_ema
    restarted = jnp.zeros((num_q,), jnp.int32)
    if has_codes:
      codebooks = params['quantizer']['codebooks']
      usage = new_vars[qz.STATS]['quantizer']['usage']
      ema = qcfg.codebook_ema_decay * state.codebook_ema + (1 - qcfg.codebook_ema_decay) * codebooks

      def restart(args):
        codebooks, usage, ema = args
        new_cb, new_usage, dead = qz.restart_dead_codes(codebooks, usage, aux['residuals'],
                                                        restart_rng, qcfg.dead_threshold)
        return new_cb, new_usage, jnp.where(dead[..., None], new_cb, ema), jnp.sum(dead, axis=-1)

      def keep(args):
        return (*args, jnp.zeros((num_q,), jnp.int32))

      do_restart = (qcfg.restart_every > 0) & ((state.step + 1) % max(qcfg.restart_every, 1) == 0)
      codebooks, usage, ema, restarted = jax.lax.cond(do_restart, restart, keep,
                                                      (codebooks, usage, ema))
      params = {**params, 'quantizer': {**params['quantizer'], 'codebooks': codebooks}}
      codebook_stats = {'quantizer': {'usage': usage}}
    params_ema = state.params_ema
    if state_lib.keeps_param_ema(state):
      params_ema = state_lib.update_params_ema(state.params_ema, params, state.step,
                                               config.optim.param_ema_decay)
    return (params, new_vars['batch_stats'], codebook_stats, opt_state, ema, params_ema,
            restarted)

  def unchanged():
    return (state.params, state.batch_stats, state.codebook_stats, state.opt_state,
            state.codebook_ema, state.params_ema, jnp.zeros((num_q,), jnp.int32))

  # The NaN/inf guard: a non-finite loss or gradient keeps the old state (and counts the
  # skip). As a branch, not a select of new and old per array: selecting read both copies of
  # every weight, both Adam moments and the codebook EMA each step, ~35 ms of a ~0.59 s paper
  # step on the 2-core EPYC (2026-12-07).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  (params, batch_stats, codebook_stats, opt_state, ema, params_ema,
   restarted) = jax.lax.cond(finite, updated, unchanged)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats,
      codebook_stats=codebook_stats, opt_state=opt_state, codebook_ema=ema,
      params_ema=params_ema, rng=rng, nan_skips=state.nan_skips + (~finite).astype(jnp.int32))
  out = {**{f'loss/{k}': v for k, v in parts.items()}, 'grad_norm': grad_norm, 'lr': lr,
         'skipped': (~finite).astype(jnp.float32)}
  if has_codes:
    out['restarted_codes'] = restarted
    out.update(codebook_summaries(aux['counts'], codebook_stats['quantizer']['usage'],
                                  qcfg.dead_threshold))
  return new_state, out


def eval_step(state: state_lib.TrainState, batch: jax.Array, *,
              config: ml_collections.ConfigDict) -> Dict[str, jax.Array]:
  """Validation on stems (B, N, S) with the EMA codebooks: estimates, loss, SI-SDRi per stem."""
  model = RQVAE(config.model)
  mixture = jnp.sum(batch, axis=-1)
  # Validation windows (data.eval_window_samples) need not be a length the model maps to
  # itself: pad with silence to the next one and crop the estimate.
  length = mixture.shape[1]
  padded = jnp.pad(mixture, ((0, 0), (0, next_valid_length(length, config.model) - length)))
  estimate, aux = model.apply(state.variables(use_ema=True), padded, train=False)
  estimate = estimate[:, :length]
  loss, _ = losses.total_loss(normalize(batch, config.model), normalize(estimate, config.model),
                              aux, config.loss, config.data.sample_rate)
  return {'estimate': estimate, 'loss': loss,
          'sisdri': metrics_lib.si_sdr_improvement(batch, estimate, mixture),
          'active': metrics_lib.active_stem_mask(batch, config.data.silence_threshold),
          **({'counts': aux['counts']} if 'counts' in aux else {})}


def kmeans_frames(state: state_lib.TrainState, mixtures: np.ndarray,
                  config: ml_collections.ConfigDict, rng: jax.Array) -> np.ndarray:
  """Encoder frames z_e (M * T, D) of mixtures (M, N) as a training forward quantizes them.

  Training mode, like the original's `compute_centroids`: BatchNorm normalises with batch
  statistics and dropout is on. In eval mode the running statistics at initialisation
  (mean 0, var 1) leave the frames ~12x narrower than those training then quantizes, so the
  k-means codes would sit in a corner of the frames' cloud. The mixtures are encoded in
  ceil(M / batch_size) near-equal chunks of at most `config.batch_size` (batch statistics
  over about a training batch, without a tiny last chunk); the updated running statistics
  are discarded.
  """
  model = RQVAE(config.model)

  @jax.jit
  def encode(variables, x, key):
    (z_e, _), _ = model.apply(variables, x, train=True, rngs={'dropout': key},
                              mutable=['batch_stats'], method=RQVAE.encode_frames)
    return z_e

  variables = state.variables()
  num_chunks = -(-len(mixtures) // max(int(config.batch_size), 1))
  chunks = np.array_split(np.asarray(mixtures, np.float32), num_chunks)
  frames = np.concatenate([np.asarray(encode(variables, chunk, jax.random.fold_in(rng, i)))
                           for i, chunk in enumerate(chunks)])
  return frames.reshape(-1, frames.shape[-1])


def kmeans_initialize(state: state_lib.TrainState, mixtures: np.ndarray,
                      config: ml_collections.ConfigDict) -> state_lib.TrainState:
  """Codebooks from k-means on encoder frames of training mixtures (B, N) (the paper's init).

  The frames come from a training-mode forward (`kmeans_frames`); the state's BatchNorm
  statistics are left as they were.
  """
  qcfg = config.model.quantizer
  if qcfg.kmeans_stages == 'none' or not bottleneck.has_codes(config.model):
    return state
  rng, key, dropout_key = jax.random.split(state.rng, 3)
  frames = kmeans_frames(state, mixtures, config, dropout_key)
  codebooks = qz.kmeans_init_codebooks(state.params['quantizer']['codebooks'], frames, key,
                                       stages=qcfg.kmeans_stages, num_iters=qcfg.kmeans_iters,
                                       seeding=qcfg.kmeans_seeding)
  params = {**state.params, 'quantizer': {**state.params['quantizer'], 'codebooks': codebooks}}
  # params_ema keeps its codebooks: they are never used (the EMA variables take codebook_ema).
  return state.replace(params=params, codebook_ema=jnp.copy(codebooks), rng=rng,
                       opt_state=state_lib.make_optimizer(config.optim).init(params))


def plateau_update(state: state_lib.TrainState, val_sisdri: float,
                   optim: ml_collections.ConfigDict) -> state_lib.TrainState:
  """The original's schedule: halve the lr when validation SI-SDRi improved by < min_delta
  since the previous evaluation; count evaluations without a new best for early stopping."""
  improved = val_sisdri - float(state.last_val) >= optim.plateau_min_delta
  new_best = val_sisdri > float(state.best_val)
  return state.replace(
      lr_scale=jnp.asarray(float(state.lr_scale) * (1.0 if improved else optim.plateau_factor),
                           jnp.float32),
      last_val=jnp.asarray(val_sisdri, jnp.float32),
      best_val=jnp.asarray(max(val_sisdri, float(state.best_val)), jnp.float32),
      bad_evals=jnp.asarray(0 if new_best else int(state.bad_evals) + 1, jnp.int32))


class Progress:
  """Console progress: step, loss, steps/s, audio-seconds/s and ETA, every `every` steps."""

  def __init__(self, total: int, start: int, audio_seconds_per_step: float):
    self.total, self.start, self.audio = total, start, audio_seconds_per_step
    self.t0, self.last_t, self.last_step = time.time(), time.time(), start

  def rates(self, step: int) -> Tuple[float, float]:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_t, 1e-9)
    self.last_t, self.last_step = now, step
    return rate, rate * self.audio

  def line(self, step: int, loss: float, rate: float) -> str:
    eta = (self.total - step) / rate if rate > 0 else float('inf')
    eta_s = time.strftime('%H:%M:%S', time.gmtime(eta)) if math.isfinite(eta) else '?'
    return (f'step {step}/{self.total}  loss {loss:.4f}  {rate:.2f} steps/s  '
            f'{rate * self.audio:.1f} audio-s/s  ETA {eta_s}')


def _mean_metrics(history: List[Dict[str, jax.Array]]) -> Dict[str, np.ndarray]:
  stacked = jax.device_get(history)
  return {k: np.mean([h[k] for h in stacked], axis=0) for k in stacked[0]}


def _scalars(prefix: str, values: Dict[str, np.ndarray]) -> Dict[str, float]:
  out = {}
  for k, v in values.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[f'{prefix}{k}'] = float(v)
    else:
      for i, x in enumerate(v):
        out[f'{prefix}{k}/stage{i:02d}'] = float(x)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_changed: Sequence[str] = ()) -> state_lib.TrainState:
  """Trains (resuming from the workdir's latest checkpoint), validates, logs and checkpoints.

  A resume compares the config with the saved one (rqvae_jax.resume: every field but those
  allowed to change, plus `allow_changed`) before anything is restored, and writes
  config.json only after the restore succeeded.
  """
  from rqvae_jax import bundled
  pipeline, slakh = bundled.data_module('pipeline'), bundled.data_module('slakh')

  mesh = parallel.make_mesh()
  local_batch = parallel.check_batch_size(config.batch_size, mesh)
  is_main = jax.process_index() == 0

  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints, cleanup=is_main)
  state, start = resume.restore_or_start(
      config, workdir, checkpointer,
      lambda: state_lib.create_train_state(config, jax.random.PRNGKey(config.seed)), is_main,
      allow_changed)

  root = pipeline.resolve_root(config.data)
  train_tracks = slakh.scan(root, 'train', config.data, verbose=is_main).kept
  val_tracks = slakh.scan(root, 'validation', config.data, verbose=is_main).kept
  val_batches = validation.validation_batches(val_tracks, config, local_batch)
  faults = pipeline.ReadFaults()       # unreadable training stems: retried, then skipped
  if start == 0:
    qcfg = config.model.quantizer
    if qcfg.kmeans_stages != 'none' and bottleneck.has_codes(config.model):
      t = time.time()
      kstream = pipeline.train_batches(config.data, train_tracks, qcfg.kmeans_examples,
                                       seed=config.seed + 7919, start_step=0, faults=faults)
      state = kmeans_initialize(state, next(kstream).sum(-1), config)
      print(f'k-means init of codebooks ({qcfg.kmeans_stages}) from {qcfg.kmeans_examples} '
            f'mixtures in {time.time() - t:.1f} s.', file=sys.stderr)

  repl = parallel.replicated(mesh)
  state = parallel.replicate(state, mesh)
  p_train_step = jax.jit(functools.partial(train_step, config=config),
                         in_shardings=(repl, parallel.data_sharded(mesh)),
                         out_shardings=(repl, repl), donate_argnums=(0,))
  p_eval_step = jax.jit(functools.partial(eval_step, config=config))

  writer = summaries.metric_writer(workdir, just_logging=not is_main)
  if start == 0:
    writer.write_hparams({k: v for k, v in _flatten_config(config).items()})
  stream = pipeline.train_batches(config.data, train_tracks, local_batch, seed=config.seed,
                                  start_step=start, process_index=jax.process_index(),
                                  process_count=jax.process_count(), faults=faults)
  batches = parallel.prefetch_to_mesh(stream, mesh, size=config.data.prefetch_batches)
  audio_seconds = config.batch_size * config.data.segment_samples / config.data.sample_rate
  progress = Progress(config.num_train_steps, start, audio_seconds)
  history: List[Dict[str, jax.Array]] = []

  for step in range(start + 1, config.num_train_steps + 1):
    state, step_metrics = p_train_step(state, next(batches))
    history.append(step_metrics)
    checkpointer.check_saves()          # a failed background save stops the run at once
    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      means = _mean_metrics(history)
      history = []
      rate, audio_rate = progress.rates(step)
      scalars = _scalars('train/', means)
      scalars.update({'train/steps_per_s': rate, 'train/audio_s_per_s': audio_rate,
                      'train/nan_skips_total': float(jax.device_get(state.nan_skips)),
                      **faults.scalars()})
      writer.write_scalars(step, scalars)
      if is_main:
        print(progress.line(step, float(means['loss/total']), rate), file=sys.stderr, flush=True)
    last = step == config.num_train_steps
    if step % config.eval_every_steps == 0 or last:
      val, example = validation.validate(state, p_eval_step, val_batches, mesh, config)
      # plateau_update's new scalars are host-local arrays: put them back on the mesh (on
      # several processes a checkpoint cannot hold a host-local array).
      state = parallel.replicate(plateau_update(state, val['val/sisdri_mean'], config.optim),
                                 mesh)
      val['val/lr_scale'] = float(state.lr_scale)
      writer.write_scalars(step, val)
      if is_main:
        validation.write_examples(writer, step, example, config)
        validation.record_validation(workdir, step, val, config.data.stems)
        print('  '.join(f'{k} {v:.3f}' for k, v in val.items()), file=sys.stderr, flush=True)
      checkpointer.save_if_best(step, state, _meta(step, config, val), val['val/sisdri_mean'])
      stop = (config.optim.early_stop_patience
              and int(state.bad_evals) >= config.optim.early_stop_patience)
      if stop:
        print(f'Early stopping at step {step}: no better validation SI-SDRi in '
              f'{config.optim.early_stop_patience} evaluations.', file=sys.stderr)
    else:
      stop = False
    if step % config.checkpoint_every_steps == 0 or last or stop:
      checkpointer.save(step, state, _meta(step, config))
    if stop:
      break
  writer.flush()
  checkpointer.wait()
  checkpointer.close()
  return state


def _meta(step: int, config, val: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
  return {'step': int(step), 'config_hash': state_lib.config_hash(config),
          'variant': config.variant, 'val': val or {}}


def _flatten_config(config) -> Dict[str, Any]:
  flat = ckpt_lib._flatten(config.to_dict())
  return {k: (str(v) if isinstance(v, (tuple, list)) else v) for k, v in flat.items()}
