"""Several processes, for real: two JAX processes on localhost (gloo CPU collectives) train
the smoke config through `training.train_and_evaluate`, then resume it, and must match one
process holding the same two-device mesh: the same global batches, losses and parameters.

Each process is `tests/distributed_worker.py`; the coordinator and gloo listen on 127.0.0.1
only, on a free port, and every subprocess has a timeout.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import smoke_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900     # each process; about 1-2 min of CPU each, far more on a busy machine
STEPS = (2, 4)                    # train to step 2, then resume to step 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _worker(tmp_path, name, extra):
  out = tmp_path / f'{name}.json'
  command = [sys.executable, '-m', 'tests.distributed_worker', '--small-graph',
             '--steps', ','.join(map(str, STEPS)), '--synthetic-dir', str(tmp_path / 'synthetic'),
             '--out', str(out), *extra]
  log = open(tmp_path / f'{name}.log', 'w')
  return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), out, log


def _finish(procs):
  results = []
  try:
    for proc, out, log in procs:
      proc.wait(timeout=TIMEOUT_S)
      log.close()
      text = open(log.name).read()
      assert proc.returncode == 0, text[-4000:]
      results.append((json.loads(out.read_text()), dict(np.load(str(out) + '.npz')), text))
  finally:
    for proc, _, _ in procs:
      if proc.poll() is None:
        proc.kill()
  return results


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('distributed')
  from data import synthetic
  cfg = smoke_config(tmp)                      # generated once, before the processes start
  synthetic.ensure_synthetic(cfg.data)
  port = _free_port()
  mp = [_worker(tmp, f'process{i}', ['--workdir', str(tmp / 'two_processes'),
                                     '--coordinator', f'127.0.0.1:{port}',
                                     '--num-processes', '2', '--process-id', str(i)])
        for i in range(2)]
  single = _worker(tmp, 'single', ['--workdir', str(tmp / 'one_process'), '--local-devices', '2'])
  results = _finish(mp + [single])
  return results[:2], results[2], tmp


def _used_reads(result, seed=0, steps=STEPS[-1]):
  """{(step, global index): crc32} of the examples read for steps 0..steps-1 (the stream
  reads ahead: later steps are prefetched, as far as the reader got, and never used)."""
  return {(step, index): crc for s, step, index, crc in result['reads']
          if s == seed and step < steps}


def test_two_processes_read_their_shards_of_the_same_global_batches(runs):
  (p0, p1), single, _ = runs
  assert [r[0]['process_index'] for r in (p0, p1)] == [0, 1]
  assert all(r[0]['process_count'] == 2 and r[0]['device_count'] == 2 for r in (p0, p1))
  assert single[0]['process_count'] == 1 and single[0]['device_count'] == 2
  reads = [_used_reads(r[0]) for r in (p0, p1)]
  reference = _used_reads(single[0])
  local = 1                                    # smoke batch 2 over two processes
  for i, own in enumerate(reads):
    # Process i reads global examples i*B_local .. (i+1)*B_local - 1 of every step, no other.
    assert sorted(own) == [(s, i * local + j) for s in range(STEPS[-1]) for j in range(local)]
  assert set(reads[0]).isdisjoint(reads[1])
  assert {**reads[0], **reads[1]} == reference  # the same windows, to the byte
  assert len(reference) == STEPS[-1] * 2
  # k-means reads its mixtures in every process (each computes the same codebooks).
  kmeans = [sorted(_used_reads(r[0], seed=7919, steps=1).items()) for r in (p0, p1, single)]
  assert kmeans[0] == kmeans[1] == kmeans[2] and len(kmeans[0]) == 4   # kmeans_examples


def test_two_processes_match_one_process_and_resume(runs):
  (p0, p1), single, tmp = runs
  for r in (p0, p1, single):
    assert r[0]['step'] == STEPS[-1]
    assert 'at step 2.' in r[2]               # the second train_and_evaluate restored step 2
  losses = [{s['step']: s['train/loss/total'] for s in r[0]['scalars'] if 'train/loss/total' in s}
            for r in (p0, p1, single)]
  assert sorted(losses[2]) == list(range(1, STEPS[-1] + 1))
  assert losses[0] == losses[1]                # one global loss, logged by both processes
  for step, loss in losses[2].items():
    assert losses[0][step] == pytest.approx(loss, rel=1e-5), step
  val0, val_single = p0[0]['val'], single[0]['val']
  assert [v['step'] for v in val0] == [v['step'] for v in val_single] == list(STEPS)
  for a, b in zip(val0, val_single):
    assert a['val/sisdri_mean'] == pytest.approx(b['val/sisdri_mean'], abs=1e-3)
  assert p1[0]['val'] == []                     # only the main process writes the workdir's files
  # Replicated parameters: identical in both processes, and equal to one process's.
  assert set(p0[1]) == set(p1[1]) == set(single[1]) and len(single[1]) > 20
  for key, value in single[1].items():
    np.testing.assert_array_equal(p0[1][key], p1[1][key], err_msg=key)
    np.testing.assert_allclose(p0[1][key], value, rtol=1e-4, atol=1e-5, err_msg=key)
  # Both runs checkpointed steps 2 and 4 into one workdir.
  for name in ('two_processes', 'one_process'):
    assert sorted(os.listdir(tmp / name / 'checkpoints')) == ['2', '4']
