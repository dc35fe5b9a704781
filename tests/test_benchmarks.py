"""The benchmark suite's quick mode: one JSON object with its fields, finite (no timing asserts)."""
import json
import math
import os
import subprocess
import sys

from tests.conftest import SMALL_GRAPH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_prints_complete_json(tmp_path):
  out_file = tmp_path / 'results.jsonl'
  # The quick mode checks the JSON: a bigger graph would only add compile time.
  overrides = [arg for key, value in SMALL_GRAPH.items() for arg in ('--set', f'{key}={value!r}')]
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.run', '--quick', *overrides,
                         '--out', str(out_file)],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert json.loads(out_file.read_text().strip().splitlines()[-1]) == result
  for key in ('device_kind', 'device_count', 'jax', 'jaxlib', 'config', 'batch'):
    assert key in result
  for key in ('compile_s', 'step_s_median', 'step_s_min', 'step_s_max', 'train_audio_s_per_s',
              'separate_audio_s_per_s', 'separate_in_flight_audio_s_per_s', 'song_audio_s_per_s',
              'peak_host_mib',
              'data_examples_per_s'):
    assert isinstance(result[key], (int, float)) and math.isfinite(result[key]), key
    assert result[key] >= 0, key
  assert result['step_s_min'] <= result['step_s_median'] <= result['step_s_max']
