"""A codec-mode workdir without training, for the codec and prior tests.

Initialising the RQ-VAE (even jitted) costs ~15 s on this CPU, so the state is built from
its shapes (`jax.eval_shape`) with seeded random weights: encode/decode identities hold for
any weights, and the prior only needs some fixed codec.
"""
import jax
import jax.numpy as jnp
import numpy as np

from rqvae_jax import checkpoints as ckpt_lib
from tests.conftest import SMALL_GRAPH, smoke_config


def codec_config(root):
  """The smoke config, three conv blocks, no skips, 400-sample (16-frame) chunks (hop 25),
  encoded 16 chunks per call."""
  cfg = smoke_config(root, **{'model.skip_connections': False, **SMALL_GRAPH})
  cfg.variant = 'codec'
  cfg.inference.chunk_samples = 400
  cfg.inference.batch_size = 16          # the ~550 chunks of the train split in 35 calls
  cfg.data.segment_samples = 2000
  return cfg


def random_state(cfg, seed: int = 0):
  """A TrainState of cfg's shapes: weights N(0, 0.3^2)/sqrt(fan-in), BatchNorm identity."""
  from rqvae_jax import train_state
  abstract = train_state.abstract_train_state(cfg)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'var' in name.split('.')[-1] or name.endswith("['var']"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if not jnp.issubdtype(leaf.dtype, jnp.floating) or 'batch_stats' in name or 'mean' in name:
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = leaf.shape[-2] if len(leaf.shape) >= 2 else 1
    return jnp.asarray(0.3 * rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

  params = jax.tree_util.tree_map_with_path(fill, abstract.params)
  stats = jax.tree_util.tree_map_with_path(fill, abstract.batch_stats)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  return zeros.replace(params=params, batch_stats=stats,
                       codebook_ema=params['quantizer']['codebooks'],
                       rng=jax.random.PRNGKey(seed))


def write_codec_workdir(cfg, workdir: str, seed: int = 0) -> None:
  ckpt_lib.save_config(workdir, cfg)
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  checkpointer.save(0, random_state(cfg, seed), {'step': 0})
  checkpointer.close()
