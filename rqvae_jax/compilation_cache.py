"""A persistent XLA compilation cache, so a second start skips most of the compile time."""
import os

import jax


def enable(path: str = '') -> str:
  """Turns on JAX's on-disk cache at `path`, $RQVAE_JAX_CACHE or ~/.cache/rqvae_jax/xla."""
  path = path or os.environ.get('RQVAE_JAX_CACHE') or os.path.expanduser('~/.cache/rqvae_jax/xla')
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path
