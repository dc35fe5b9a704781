"""Data parallelism: a 1-D device mesh over all processes' devices, sharded batches.

The same code runs on one CPU device, on several local devices and on several processes:
the state is replicated, the batch is split along the `data` axis, and `jit` inserts the
collectives (BatchNorm statistics and gradients are those of the global batch).
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def maybe_initialize_distributed() -> None:
  """Calls jax.distributed.initialize() when a multi-process environment is configured.

  Recognised: JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES, JAX_PROCESS_ID) or the
  cluster environments JAX detects itself (SLURM, Open MPI, TPU pods) via RQVAE_DISTRIBUTED=1.
  """
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ.get('JAX_NUM_PROCESSES', '1')),
        process_id=int(os.environ.get('JAX_PROCESS_ID', '0')))
  elif os.environ.get('RQVAE_DISTRIBUTED') == '1':
    jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with the data axis over `devices` (default: all devices of all processes)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """Every leaf of `tree` replicated over the mesh (the train state's placement).

  Leaves already replicated on the mesh are kept. On several processes the others go
  through host memory: `jax.device_put` of a process-local jax.Array onto a sharding that
  spans other processes' devices builds an array whose local shard is itself the global
  array (jax 0.10), which Orbax then cannot save. Every process must hold the same values
  (the same seed, the same checkpoint), as for any replicated array.
  """
  sharding = replicated(mesh)
  multi = jax.process_count() > 1

  def put(x):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    return jax.device_put(np.asarray(x) if multi else x, sharding)

  return jax.tree_util.tree_map(put, tree)


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
  """Returns the per-process batch; the global batch must split evenly over devices."""
  devices = mesh.devices.size
  if global_batch % devices:
    raise ValueError(f'batch_size {global_batch} is not divisible by the {devices} devices of the '
                     f'mesh; use a multiple of {devices} (--config.batch_size=...).')
  return global_batch // jax.process_count()


def shard_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process's rows -> one global array sharded over the mesh's data axis."""
  return jax.make_array_from_process_local_data(data_sharded(mesh), local_batch)


def prefetch_to_mesh(batches, mesh: Mesh, size: int = 2):
  """Shards the next `size` host batches onto the devices in a background thread, so the
  host-to-device copy overlaps the running step."""
  import queue
  import threading

  q: 'queue.Queue' = queue.Queue(maxsize=size)
  sentinel = object()

  def producer():
    try:
      for b in batches:
        q.put(shard_batch(b, mesh))
    except BaseException as e:  # surfaced in the consumer
      q.put(e)
      return
    q.put(sentinel)

  threading.Thread(target=producer, daemon=True).start()
  while True:
    item = q.get()
    if item is sentinel:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
