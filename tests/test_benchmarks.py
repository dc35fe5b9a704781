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
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                        text=True)
  if head.returncode == 0:                            # a git checkout: the commit it measured
    assert result['code'].split('+')[0] == head.stdout.strip()
  else:
    assert result['code'] == 'unknown'


def test_lstm_speed_times_every_implementation_it_has():
  from rqvae_jax import native  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.lstm_speed', '--batches', '1,2',
                         '--unrolls', '1,2', '--reps', '1', '--frames', '7', '--hidden', '8'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (result['T'], result['H']) == (7, 8)
  for b in ('B=1', 'B=2'):
    assert set(result['jax_fwd_bwd_s'][b]) == {'unroll=1', 'unroll=2'}
    for times in result['jax_fwd_bwd_s'][b].values():
      assert times['wall'] > 0 and times['cpu'] > 0
  if native.find_compiler() is not None:            # the CPU kernel builds here
    assert set(result['jax_native_fwd_bwd_s']) == {'B=1', 'B=2'}
    assert all(v['wall'] > 0 for v in result['jax_native_fwd_bwd_s'].values())
  if 'torch_fwd_bwd_s' in result:                   # the original's venv exists here
    assert set(result['jax_over_torch']) == {'B=1', 'B=2'}


def test_rounds_alternate_ours_and_the_original_and_quote_median_ratios():
  """--rounds: each round pairs one of our runs with one of the original's, in that order,
  and the quoted ratio is the median over rounds (one slow minute does not decide it)."""
  from benchmarks import run
  calls = []
  ours = iter([{'step_s_median': 2.0, 'separate_audio_s_per_s': 10.0,
                'separate_in_flight_audio_s_per_s': 12.0},
               {'step_s_median': 1.0, 'separate_audio_s_per_s': 20.0,
                'separate_in_flight_audio_s_per_s': 24.0}])
  originals = iter([{'train_step_s': 3.0, 'separate_audio_s_per_s': 10.0},
                    {'train_step_s': 3.0, 'separate_audio_s_per_s': 10.0}])
  rounds = run.alternate_rounds(2, lambda: calls.append('ours') or next(ours),
                                lambda: calls.append('original') or next(originals))
  assert calls == ['ours', 'original', 'ours', 'original']
  assert [r['train_speedup_vs_original'] for r in rounds] == [1.5, 3.0]
  assert [r['separate_speedup_vs_original'] for r in rounds] == [1.0, 2.0]
  assert [r['separate_in_flight_speedup_vs_original'] for r in rounds] == [1.2, 2.4]
  first = {'train_speedup_vs_original': 1.0, 'separate_speedup_vs_original': 0.5}
  assert run.median_ratios([first] + rounds) == {
      'train_speedup_vs_original': 1.5, 'separate_speedup_vs_original': 1.0,
      'separate_in_flight_speedup_vs_original': 1.8}
  # An original run that failed has no figures: no ratio from that round.
  assert run.speed_ratios({'step_s_median': 2.0}, {'error': 'bench.sh not found'}) == {}
