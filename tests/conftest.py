"""Shared fixtures: a persistent compilation cache for the session and one trained smoke run;
and running a script on two fake CPU devices."""
import json
import os
import subprocess
import sys

import jax
import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


@pytest.fixture(scope='session', autouse=True)
def _compilation_cache(tmp_path_factory):
  """Identical programs compiled by several tests (each train_and_evaluate call jits its own
  step) are compiled once."""
  from rqvae_jax import compilation_cache
  path = os.environ.get('RQVAE_TEST_XLA_CACHE')
  if not path and os.environ.get('PYTEST_XDIST_WORKER'):
    # pytest-xdist (make test: one worker per core): the workers' temporary folders share a
    # parent, and one cache there lets a program compiled by one worker serve the others.
    path = str(tmp_path_factory.getbasetemp().parent / 'xla_cache')
    # No size limit (JAX's file lock comes with one, but its eviction scan then fails on the
    # entries that the CLI subprocesses write without one). An entry read while another
    # process still writes it fails to decompress, and JAX compiles instead (a warning).
  path = path or str(tmp_path_factory.mktemp('xla_cache'))
  compilation_cache.enable(path)
  os.environ['RQVAE_JAX_CACHE'] = path   # subprocesses (CLI tests) share it
  yield


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def two_cpu_devices_env() -> dict:
  """The environment of a subprocess whose JAX sees two CPU devices (one process)."""
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2')


def run_on_two_cpu_devices(script: str) -> dict:
  """Runs `script` (str.format'ed with repo=the checkout) in a fresh Python on two CPU
  devices; returns the JSON object its last line of output prints."""
  proc = subprocess.run([sys.executable, '-c', script.format(repo=REPO)],
                        env=two_cpu_devices_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# For tests that compile the train step only to check plumbing (data parallelism, the
# benchmark's JSON): the smoke model's layer kinds with three conv blocks, one LSTM layer and
# one mel scale, about half the graph to compile. Dotted keys, as --config.x.y overrides.
SMALL_GRAPH = {'model.channels': (4, 8, 16), 'model.kernels': (3, 7, 7),
               'model.strides': (1, 5, 5), 'model.lstm_layers': 1,
               'loss.mel_window_powers': (6,)}


def smoke_config(root, **overrides):
  """The smoke config with its synthetic data under `root` and dotted overrides."""
  from configs.rqvae import get_config
  cfg = get_config('smoke')
  cfg.data.synthetic.cache_dir = str(root / 'synthetic')
  for key, value in overrides.items():
    node = cfg
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return cfg


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """(config, workdir) of a finished 4-step smoke training run (validated, checkpointed)."""
  from rqvae_jax import training
  root = tmp_path_factory.mktemp('smoke_run')
  cfg = smoke_config(root)
  workdir = str(root / 'workdir')
  training.train_and_evaluate(cfg, workdir)
  return cfg, workdir
