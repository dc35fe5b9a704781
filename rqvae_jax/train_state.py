"""The training state: one explicit pytree, how it starts, its optimiser and its averages.

Everything that reads or writes a run's state (training, validation, separation, the codec,
checkpoint import) needs `TrainState` and `create_train_state`; only training needs the step
and the loop, which stay in `rqvae_jax.training`. Keeping the state here lets separation load
a checkpoint without importing the training loop (clu, the data pipeline).
"""
import functools
import hashlib
from typing import Any, Dict, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rqvae_jax import bottleneck
from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import quantizer as qz
from rqvae_jax.model import RQVAE


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  codebook_stats: Any
  opt_state: Any
  codebook_ema: jax.Array        # EMA of params['quantizer']['codebooks'], used to validate
  #                                (a Gaussian bottleneck has no codebooks: a placeholder 0)
  params_ema: Any                # Polyak average of params (optim.param_ema_decay > 0) for
  #                                validation and separation; off: a placeholder 0
  rng: jax.Array
  lr_scale: jax.Array            # plateau schedule: multiplied by plateau_factor on a plateau
  last_val: jax.Array            # validation SI-SDRi at the previous evaluation
  best_val: jax.Array
  bad_evals: jax.Array           # consecutive evaluations without improvement (early stop)
  nan_skips: jax.Array           # updates skipped because the loss or a gradient was not finite

  def variables(self, use_ema: bool = False, param_ema: bool = True) -> Dict[str, Any]:
    """The model's variables. With `use_ema` (validation, separation) the codebooks are
    their EMA and, where the run keeps one and `param_ema`, the other weights are their
    Polyak average."""
    params = self.params
    if use_ema and param_ema and keeps_param_ema(self):
      params = self.params_ema
    if use_ema and 'codebooks' in params.get('quantizer', {}):
      params = {**params, 'quantizer': {**params['quantizer'], 'codebooks': self.codebook_ema}}
    return {'params': params, 'batch_stats': self.batch_stats, qz.STATS: self.codebook_stats}

  def inference_variables(self, inference: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The variables separation and the codec run with, as the config's `inference` section
    chooses them (`use_ema_codebooks`, `use_ema_params`)."""
    return self.variables(use_ema=bool(inference.use_ema_codebooks),
                          param_ema=bool(inference.use_ema_params))


def config_hash(config: ml_collections.ConfigDict) -> str:
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:12]


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam's direction (with optional clipping and decoupled weight decay); the learning rate
  is applied in the step from the state's schedule, so the plateau rule can change it."""
  if optim.optimizer not in ('adam', 'adamw'):
    raise ValueError(f"optim.optimizer must be 'adam' or 'adamw', got {optim.optimizer!r}.")
  parts = []
  if optim.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
  if optim.weight_decay:
    parts.append(optax.add_decayed_weights(optim.weight_decay))
  return optax.chain(*parts)


def learning_rate(step, lr_scale, optim: ml_collections.ConfigDict, total_steps: int):
  """lr * plateau scale * linear warm-up * decay ('constant', or 'cosine' from the end of the
  warm-up down to `final_lr_fraction` of lr at `total_steps`)."""
  warmup = jnp.minimum(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
  decay_kind = optim.decay
  if decay_kind == 'constant':
    decay = 1.0
  elif decay_kind == 'cosine':
    span = max(int(total_steps) - int(optim.warmup_steps), 1)
    frac = jnp.clip((step - optim.warmup_steps) / span, 0.0, 1.0)
    final = optim.final_lr_fraction
    decay = final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  else:
    raise ValueError(f"optim.decay must be 'constant' or 'cosine', got {decay_kind!r}.")
  return optim.lr * lr_scale * warmup * decay


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
  model = RQVAE(config.model)
  init_rng, state_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, config.data.segment_samples), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))({'params': init_rng}, dummy)
  params = variables['params']
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  codes = bottleneck.has_codes(config.model)
  return TrainState(
      step=jnp.asarray(0, jnp.int32), params=params, batch_stats=variables['batch_stats'],
      codebook_stats=variables.get(qz.STATS, {}),
      opt_state=make_optimizer(config.optim).init(params),
      codebook_ema=jnp.copy(params['quantizer']['codebooks']) if codes else f32(0.0),
      params_ema=initial_params_ema(config, params), rng=state_rng, lr_scale=f32(1.0),
      last_val=f32(-jnp.inf), best_val=f32(-jnp.inf), bad_evals=jnp.asarray(0, jnp.int32),
      nan_skips=jnp.asarray(0, jnp.int32))


def abstract_train_state(config: ml_collections.ConfigDict) -> TrainState:
  """The shapes and dtypes of `create_train_state(config, ...)`, nothing computed: the
  target every checkpoint restore (training, separation, the codec, import) reads into."""
  return jax.eval_shape(lambda: create_train_state(config, jax.random.PRNGKey(0)))


def restore_train_state(workdir: str, config: ml_collections.ConfigDict,
                        checkpoint: Union[str, int] = 'best') -> Tuple[TrainState, int]:
  """(state, step) of a workdir's checkpoint ('best', 'latest' or a step), read into
  `config`'s shapes: what separation, the codec and the export start from. The checkpointer
  is closed before returning, also when the restore fails (checkpoints.restore_once)."""
  state, _, step = ckpt_lib.restore_once(workdir, checkpoint, abstract_train_state(config))
  return state, step


def keeps_param_ema(state) -> bool:
  """Whether `state.params_ema` holds weights (not the scalar placeholder of a run without)."""
  return getattr(state.params_ema, 'shape', None) != ()


def initial_params_ema(config: ml_collections.ConfigDict, params) -> Any:
  """The Polyak average's start: a copy of `params`, or the placeholder 0 when it is off."""
  if config.optim.get('param_ema_decay', 0.0) > 0:
    return jax.tree_util.tree_map(jnp.copy, params)
  return jnp.asarray(0.0, jnp.float32)


def update_params_ema(params_ema, params, step, decay: float):
  """One step of the weights' Polyak average: decay min(`decay`, (1 + t) / (10 + t)) at step t
  (TensorFlow's ExponentialMovingAverage with num_updates), so early in a run the average
  follows the fast-moving weights (it spans ~t / 9 steps) instead of the initialisation."""
  t = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, params_ema, params)
