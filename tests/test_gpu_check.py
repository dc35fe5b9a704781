"""The GPU check (benchmarks/gpu_check.sh): its dry mode end to end on the CPU, and the
section runner's budgets, errors and incremental JSON (no timing asserts)."""
import json
import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


def test_dry_mode_runs_every_section_and_writes_one_json(tmp_path):
  out = tmp_path / 'check' / 'gpu_check.json'
  # The budgets only guard against a hang: a busy 2-core machine compiles 10x slower.
  env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_BUDGET_SCALE='10')
  proc = subprocess.run(['bash', 'benchmarks/gpu_check.sh', '--dry', '--budget', '3000',
                         '--out', str(out)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  doc = json.loads(out.read_text())
  assert doc['mode'] == 'dry' and doc['finished'] is True
  sections = doc['sections']
  assert list(sections) == ['environment', 'gpu_tests', 'choice', 'train', 'separate',
                            'short_training']
  for name, result in sections.items():
    assert result['status'] == 'ok', (name, result.get('error'), result.get('traceback'))
  # Partial results were printed as they came: one JSON line per section, in order.
  printed = [next(iter(json.loads(line))) for line in proc.stdout.splitlines()
             if line.startswith('{"') and not line.startswith('{"finished"')]
  assert printed == list(sections)

  env_ = sections['environment']
  assert env_['platform'] == 'cpu' and env_['jax'] and env_['jaxlib'] and env_['cpu_model']
  assert isinstance(env_['cpu_flags'], list)

  # The GPU tests are collected and skipped on the CPU; none failed, both kinds are there.
  tests = sections['gpu_tests']
  assert tests['counts']['failed'] == tests['counts']['error'] == 0
  assert tests['counts']['skipped'] == len(tests['tests']) > 10
  names = ' '.join(tests['tests'])
  assert 'test_cudnn_matches_scan_on_gpu' in names
  assert 'test_conv_forms_match_lax_conv_on_device' in names

  choice = sections['choice']
  conv, lstm = choice['conv_fwd_bwd_s'], choice['lstm_fwd_bwd_s']
  assert set(conv) == {'matmul', 'xla'} and choice['conv_impl'] == min(conv, key=conv.get)
  assert set(lstm) == {'scan'} and choice['lstm_impl'] == 'scan'     # no cuDNN on a CPU
  assert doc['choice'] == {'conv_impl': choice['conv_impl'], 'lstm_impl': 'scan'}

  train = sections['train']
  for dtype in ('float32', 'bfloat16'):
    r = train[dtype]
    assert r['conv_impl'] == choice['conv_impl'] and r['lstm_impl'] == 'scan'
    assert r['steps_per_s'] > 0 and _finite(r['loss_after_steps'])
    assert r['hours_for_60k_steps'] == pytest.approx(60_000 / r['steps_per_s'] / 3600, rel=0.02)
  assert train['bf16_speedup'] > 0

  sep = sections['separate']
  for dtype in ('float32', 'bfloat16'):
    r = sep[dtype]
    assert r['song_real_time_factor'] == pytest.approx(1 / r['song_audio_s_per_s'], rel=0.02)
    assert r['chunk_real_time_factor'] > 0

  run = sections['short_training']
  assert run['completed_steps'] == 4 and run['last_step_validated'] == 4
  assert [v['step'] for v in run['validations']] == [2, 4]
  assert _finite(run['val_sisdri_mean_last'])


def test_sections_record_errors_timeouts_and_the_deadline(tmp_path, capsys):
  path = tmp_path / 'out.json'
  report = gpu_check.Report(str(path), {'mode': 'test'})
  assert json.loads(path.read_text())['sections'] == {}
  deadline = time.time() + 60

  def fine(partial):
    return {'value': 1}

  def broken(partial):
    partial['before'] = 2
    raise RuntimeError('no device')

  def slow(partial):
    partial['first_number'] = 3        # what a section had measured when time ran out
    time.sleep(5)

  assert gpu_check.run_section(report, 'fine', fine, 10, deadline)['status'] == 'ok'
  after_one = json.loads(path.read_text())     # rewritten after each section
  assert after_one['sections']['fine']['value'] == 1
  err = gpu_check.run_section(report, 'broken', broken, 10, deadline)
  assert err['status'] == 'error' and 'RuntimeError: no device' in err['error']
  assert err['before'] == 2
  t = time.time()
  late = gpu_check.run_section(report, 'slow', slow, 0.3, deadline)
  assert time.time() - t < 3
  assert late['status'] == 'timeout' and late['first_number'] == 3
  skipped = gpu_check.run_section(report, 'after_deadline', fine, 10, time.time() + 1)
  assert skipped['status'] == 'skipped'
  doc = json.loads(path.read_text())
  assert [doc['sections'][n]['status'] for n in ('fine', 'broken', 'slow', 'after_deadline')] == \
      ['ok', 'error', 'timeout', 'skipped']
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith('{')]
  assert [next(iter(l)) for l in lines] == ['fine', 'broken', 'slow', 'after_deadline']


def test_script_refuses_bad_arguments():
  proc = subprocess.run(['bash', 'benchmarks/gpu_check.sh', '--dry'], cwd=REPO,
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 64 and '--out FILE.json is required' in proc.stderr
  proc = subprocess.run(['bash', 'benchmarks/gpu_check.sh', '--frobnicate'], cwd=REPO,
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 64 and 'unknown argument --frobnicate' in proc.stderr


def _probe_wheel(folder):
  """A minimal pure-Python wheel (module rqvae_probe), as `pip download` would leave one."""
  import zipfile
  folder.mkdir()
  path = folder / 'rqvae_probe-1.0-py3-none-any.whl'
  info = 'rqvae_probe-1.0.dist-info'
  files = {'rqvae_probe.py': 'CARRIED = True\n',
           f'{info}/METADATA': 'Metadata-Version: 2.1\nName: rqvae-probe\nVersion: 1.0\n',
           f'{info}/WHEEL': ('Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n'
                             'Tag: py3-none-any\n')}
  files[f'{info}/RECORD'] = ''.join(f'{name},,\n' for name in [*files, f'{info}/RECORD'])
  with zipfile.ZipFile(path, 'w') as z:
    for name, text in files.items():
      z.writestr(name, text)
  return path


def _fake_python3(folder, body=''):
  """`python3` on PATH: the real interpreter, except that it claims a GPU when probed."""
  folder.mkdir()
  script = folder / 'python3'
  script.write_text('#!/bin/sh\n'
                    'case "$2" in *default_backend*) exit 0 ;; esac\n'
                    f'{body}exec {sys.executable} "$@"\n')
  script.chmod(0o755)
  return folder


def test_gpu_mode_runs_on_the_machines_python_with_the_carried_wheels(tmp_path):
  """A lent GPU machine has no internet and no .venv, but its own python3 with JAX: the
  script picks that one (the probe is faked here), installs the carried wheels beside it,
  and runs the sections under it (only `environment` here, on the CPU)."""
  out = tmp_path / 'out' / 'gpu_check.json'
  bin_dir = _fake_python3(tmp_path / 'bin')
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHON', 'PYTHONPATH')}
  env.update(PATH=f'{bin_dir}:{env["PATH"]}', GPU_CHECK_WHEELS=str(tmp_path / 'whl'))
  _probe_wheel(tmp_path / 'whl')
  proc = subprocess.run(['bash', 'benchmarks/gpu_check.sh', '--out', str(out), '--sections',
                         'environment', '--budget', '600'],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  doc = json.loads(out.read_text())
  install = doc['sections']['environment']['install']
  assert "the machine's python3" in install['python'] and install['returncode'] == 0
  site = install['python'].rsplit('installed into ', 1)[1]
  assert os.path.exists(os.path.join(site, 'rqvae_probe.py'))
  assert doc['sections']['environment']['status'] == 'ok'
  assert set(doc['sections']['environment']['packages']) >= {'flax', 'numpy'}


def test_gpu_mode_names_a_missing_module_and_runs_nothing(tmp_path):
  """A Python without a module the check needs: exit 2, a JSON that says so, no section."""
  out = tmp_path / 'gpu_check.json'
  fake = _fake_python3(tmp_path / 'bin', body=(
      'case "$2" in *ml_collections*) echo "ModuleNotFoundError: No module named '
      "'soxr'\" >&2; exit 1 ;; esac\n")) / 'python3'
  env = dict(os.environ, PYTHON=str(fake))
  proc = subprocess.run(['bash', 'benchmarks/gpu_check.sh', '--out', str(out)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
  assert 'lacks a module the check needs' in proc.stdout + proc.stderr
  doc = json.loads(out.read_text())
  assert doc['finished'] is False and doc['sections'] == {}
  assert "No module named 'soxr'" in doc['install']['log_tail']
  assert 'gpu_wheels.sh' in doc['install']['log_tail']


def test_choice_keeps_the_forms_that_run_and_records_the_others(monkeypatch):
  """A form that fails on the device (cuDNN's RNN on an untried JAX, say) is recorded, not
  chosen, and does not fail the section; if none runs, the section fails. (Times faked: the
  median of each candidate is its number.)"""
  def fake_median(fn, reps):
    return fn()
  monkeypatch.setattr(gpu_check, '_median_time', fake_median)

  def broken_build():
    raise NotImplementedError('no cuDNN RNN here')

  def broken_call():
    def call():
      raise ValueError('bad shapes')
    return call
  partial = {}
  best = gpu_check.time_each({'slow': lambda: lambda: 0.5, 'cudnn': broken_build,
                              'fast': lambda: lambda: 0.125, 'other': broken_call},
                             3, partial, 'lstm_s')
  assert best == 'fast' and partial['lstm_s'] == {'slow': 0.5, 'fast': 0.125}
  assert partial['lstm_s_errors'] == {'cudnn': 'NotImplementedError: no cuDNN RNN here',
                                      'other': 'ValueError: bad shapes'}
  with pytest.raises(RuntimeError, match='every candidate failed'):
    gpu_check.time_each({'cudnn': broken_build}, 2, {}, 'lstm_s')
