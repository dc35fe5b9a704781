"""Training the RQ-Transformer prior on a trained codec's codes: `train_prior`.

Codes are computed once per split and cached in the prior's workdir (`codes/<split>.npz`,
keyed by the codec's config and codebook hashes): the codec is frozen, so the codes of a
track never change, and encoding every training track once costs about as much as a few
hundred steps' worth of on-the-fly encoder forwards (README: Prior). Tracks come from the
codec's data config through the same scan as its training (`data/slakh.py`); a training
window is `context_frames` consecutive frames at a random frame of a track chosen in
proportion to its length, a pure function of (seed, step), so a resumed run sees the same
stream.

The state (params, Adam state, weight EMA, rng, step) is saved with Orbax in DIR/checkpoints
(the project's Checkpointer) and resumed by running the same command; config.json is
compared on resume (rqvae_jax/resume.py). TensorBoard: train/nll, NLL per depth, bits per
frame, lr; val/ the same with the EMA weights. At the end the test split's NLL (bits per
code, per depth, per frame) goes to DIR/metrics.json.
"""
import functools
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import codec as codec_lib
from rqvae_jax import prior as prior_lib
from rqvae_jax import resume
from rqvae_jax import summaries
from rqvae_jax import train_state

LN2 = math.log(2.0)
METRICS_FILE = 'metrics.json'


@flax.struct.dataclass
class PriorState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any                  # EMA of params (validated, tested and sampled)
  rng: jax.Array


def load_codec(config) -> codec_lib.Codec:
  if not config.autoencoder_workdir:
    raise ValueError('The prior needs a trained codec: pass --config.autoencoder_workdir=DIR '
                     '(a workdir of python train.py --config configs/rqvae.py:codec).')
  return codec_lib.Codec.from_workdir(config.autoencoder_workdir, config.autoencoder_checkpoint)


def make_model(config, codec_config) -> prior_lib.RQTransformer:
  q = codec_config.model.quantizer
  return prior_lib.RQTransformer(config.transformer, q.num_quantizers, q.codebook_size,
                                 codec_config.model.channels[-1])


def create_state(config, model, codebooks, rng) -> PriorState:
  """The step-0 state, built in one jitted program (an eager Flax init and optimizer init
  would compile every op on its own: seconds on this CPU)."""
  use = codebooks if config.transformer.embed_init == 'codebooks' else None

  def make(rng, use):
    init_rng, rng = jax.random.split(rng)
    params = prior_lib.init_params(model, init_rng, use)
    opt_state = train_state.make_optimizer(config.optim).init(params)
    return PriorState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=opt_state,
                      ema=jax.tree_util.tree_map(jnp.copy, params), rng=rng)

  return jax.jit(make)(rng, use)


def split_codes(codec: codec_lib.Codec, split: str, workdir: str) -> List[np.ndarray]:
  """Codes (T_i, Q) of every kept track of `split`, encoded once and cached in the workdir."""
  from rqvae_jax import bundled   # pylint: disable=g-import-not-at-top
  pipeline, slakh = bundled.data_module('pipeline'), bundled.data_module('slakh')
  path = os.path.join(workdir, 'codes', f'{split}.npz')
  key = f'{codec.config_hash}-{codec.codebook_hash}'
  if os.path.exists(path):
    with np.load(path) as f:
      if str(f['key']) == key:
        return np.split(f['codes'], f['offsets'][1:-1])
  data = codec.config.data
  tracks = slakh.scan(pipeline.resolve_root(data), split, data, verbose=False).kept
  t = time.time()
  codes = [codec.encode(slakh.load_track(tr, data.stems).sum(-1)) for tr in tracks]
  seconds = sum(tr.num_frames for tr in tracks) / data.sample_rate
  print(f'Encoded the {split} split ({len(tracks)} tracks, {seconds / 60:.1f} min of audio) '
        f'in {time.time() - t:.1f} s; cached in {path}.', file=sys.stderr)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  offsets = np.cumsum([0] + [len(c) for c in codes])
  np.savez(path, codes=np.concatenate(codes), offsets=offsets, key=key)
  return codes


def train_windows(codes: Sequence[np.ndarray], batch: int, length: int, seed: int,
                  step: int) -> np.ndarray:
  """(batch, length, Q) windows for `step`: tracks drawn in proportion to their length."""
  usable = [c for c in codes if len(c) >= length]
  if not usable:
    raise ValueError(f'No track has {length} code frames (transformer.context_frames); '
                     'lower it or use longer tracks.')
  weights = np.array([len(c) - length + 1 for c in usable], np.float64)
  rng = np.random.default_rng([seed, step])
  picks = rng.choice(len(usable), size=batch, p=weights / weights.sum())
  starts = [rng.integers(0, len(usable[i]) - length + 1) for i in picks]
  return np.stack([usable[i][s:s + length] for i, s in zip(picks, starts)]).astype(np.int32)


def eval_windows(codes: Sequence[np.ndarray], length: int, limit: int = 0) -> np.ndarray:
  """Non-overlapping windows over the split's tracks, spread evenly when `limit` cuts."""
  windows = [c[s:s + length] for c in codes for s in range(0, len(c) - length + 1, length)]
  if limit and len(windows) > limit:
    windows = [windows[i] for i in np.linspace(0, len(windows) - 1, limit).astype(int)]
  return np.stack(windows).astype(np.int32)


def train_step(state: PriorState, codes, *, model, config):
  rng, dropout_rng = jax.random.split(state.rng)

  def loss_fn(params):
    logits = model.apply({'params': params}, codes, deterministic=False,
                         rngs={'dropout': dropout_rng})
    return prior_lib.nll(logits, codes)

  (loss, per_depth), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  lr = train_state.learning_rate(state.step, 1.0, config.optim, config.num_train_steps)
  optimizer = train_state.make_optimizer(config.optim)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state.params, updates)
  decay = config.ema_decay
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema, params)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rng=rng)
  return new, {'nll': loss, 'nll_depth': per_depth, 'lr': lr}


def nll_over(model, params, windows: np.ndarray, batch: int) -> np.ndarray:
  """Per-depth mean NLL (nats) over windows (N, T, Q), in batches of `batch` (the last one
  zero-padded and its padding dropped: one compiled program for every split)."""
  fn = _jitted(model, None, 'nll')
  total = np.zeros(windows.shape[-1])
  for i in range(0, len(windows), batch):
    part = windows[i:i + batch]
    full = np.concatenate([part, np.zeros((batch - len(part),) + part.shape[1:], part.dtype)])
    total += np.asarray(fn(params, jnp.asarray(full)))[:len(part)].sum(axis=0)
  return total / len(windows)


def _window_nll(model, params, codes):
  """(B, Q): each window's mean NLL per depth."""
  logits = model.apply({'params': params}, codes)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, codes[..., None], axis=-1)[..., 0].mean(axis=1)


_JITTED = {}


def _jitted(model, config, kind: str):
  """The jitted train step or window NLL of a model (and config), shared by the calls of a
  process with equal settings, so a resumed run in the same process (the tests) traces and
  compiles nothing again. Keyed by value: a Flax module with a ConfigDict is unhashable."""
  key = (kind, model.config.to_json_best_effort(sort_keys=True), model.num_quantizers,
         model.codebook_size, model.code_dim,
         config.to_json_best_effort(sort_keys=True) if config is not None else None)
  if key not in _JITTED:
    if kind == 'train':
      _JITTED[key] = jax.jit(functools.partial(train_step, model=model, config=config),
                             donate_argnums=(0,))
    else:
      _JITTED[key] = jax.jit(functools.partial(_window_nll, model))
  return _JITTED[key]


def nll_summary(per_depth_nats: np.ndarray) -> Dict[str, Any]:
  bits = np.asarray(per_depth_nats) / LN2
  return {'nll_nats_per_code': float(np.mean(per_depth_nats)),
          'bits_per_code': float(bits.mean()), 'bits_per_code_per_depth': bits.tolist(),
          'bits_per_frame': float(bits.sum())}


def _scalars(prefix: str, per_depth: np.ndarray) -> Dict[str, float]:
  out = {f'{prefix}nll': float(np.mean(per_depth)),
         f'{prefix}bits_per_frame': float(np.sum(per_depth) / LN2)}
  out.update({f'{prefix}nll_depth/{d:02d}': float(v) for d, v in enumerate(per_depth)})
  return out


def train_prior(config: ml_collections.ConfigDict, workdir: str,
                allow_changed: Sequence[str] = ()) -> Dict[str, Any]:
  """Trains (resuming), validates, checkpoints, then writes the test NLL to metrics.json."""
  codec = load_codec(config)
  model = make_model(config, codec.config)
  codebooks = codec.variables['params']['quantizer']['codebooks']
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints, cleanup=True)
  state, start = resume.restore_or_start(
      config, workdir, checkpointer,
      lambda: create_state(config, model, codebooks, jax.random.PRNGKey(config.seed)), True,
      allow_changed)
  length = int(config.transformer.context_frames)
  train_codes = split_codes(codec, 'train', workdir)
  val = eval_windows(split_codes(codec, 'validation', workdir), length, config.num_eval_windows)
  step_fn = _jitted(model, config, 'train')
  writer = summaries.metric_writer(workdir)
  t0, history = time.time(), []
  for step in range(start + 1, config.num_train_steps + 1):
    batch = train_windows(train_codes, config.batch_size, length, config.seed, step)
    state, m = step_fn(state, jnp.asarray(batch))
    history.append(m)
    last = step == config.num_train_steps
    if step % config.log_every_steps == 0 or last:
      per_depth = np.mean([np.asarray(h['nll_depth']) for h in history], axis=0)
      scalars = _scalars('train/', per_depth)
      scalars['train/lr'] = float(history[-1]['lr'])
      rate = (step - start) / (time.time() - t0)
      scalars['train/steps_per_s'] = rate
      writer.write_scalars(step, scalars)
      history = []
      print(f'step {step}/{config.num_train_steps}  nll {scalars["train/nll"]:.4f}  '
            f'bits/frame {scalars["train/bits_per_frame"]:.2f}  {rate:.2f} steps/s',
            file=sys.stderr, flush=True)
    if step % config.eval_every_steps == 0 or last:
      val_nll = nll_over(model, state.ema, val, config.batch_size)
      writer.write_scalars(step, _scalars('val/', val_nll))
      print(f'  val nll {np.mean(val_nll):.4f} (EMA weights, {len(val)} windows)',
            file=sys.stderr, flush=True)
    if step % config.checkpoint_every_steps == 0 or last:
      checkpointer.save(step, state, {'step': step, 'config_hash': train_state.config_hash(config)})
    checkpointer.check_saves()
  writer.flush()
  checkpointer.wait()
  checkpointer.close()
  return evaluate_prior(config, workdir, state, model, codec)


def evaluate_prior(config, workdir: str, state: PriorState, model, codec) -> Dict[str, Any]:
  """Test NLL of the EMA weights over every non-overlapping test window -> metrics.json."""
  length = int(config.transformer.context_frames)
  test = eval_windows(split_codes(codec, 'test', workdir), length)
  q = codec.config.model.quantizer
  result = {'split': 'test', 'windows': int(len(test)), 'frames_per_window': length,
            'step': int(state.step), 'weights': 'ema',
            'uniform_bits_per_code': math.log2(q.codebook_size),
            **nll_summary(nll_over(model, state.ema, test, config.batch_size))}
  ckpt_lib.write_text_atomic(os.path.join(workdir, METRICS_FILE), json.dumps(result, indent=1))
  print(f'test: {result["bits_per_code"]:.3f} bits per code (uniform '
        f'{result["uniform_bits_per_code"]:.0f}), {result["bits_per_frame"]:.2f} bits per frame, '
        f'per depth {", ".join(f"{b:.2f}" for b in result["bits_per_code_per_depth"])}',
        file=sys.stderr)
  return result


def restore(workdir: str, checkpoint='latest'):
  """(config, model, state, codec) of a trained prior workdir."""
  config = ckpt_lib.load_config(workdir)
  if not str(config.get('variant', '')).startswith('prior:'):
    raise ValueError(f'{workdir} is not a prior workdir (variant {config.get("variant")!r}): '
                     'point --workdir at a folder written by train_prior.py.')
  codec = load_codec(config)
  model = make_model(config, codec.config)
  codebooks = codec.variables['params']['quantizer']['codebooks']
  abstract = jax.eval_shape(lambda: create_state(config, model, codebooks,
                                                 jax.random.PRNGKey(0)))
  state, _, _ = ckpt_lib.restore_once(workdir, checkpoint, abstract)
  return config, model, state, codec
