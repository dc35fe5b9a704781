"""`python demo.py`, the README's main command, end to end on the smoke variant: it trains,
evaluates, breaks the separation down by path, separates a song, and says where it all is."""
import json
import os
import subprocess
import sys

import soundfile as sf


def test_demo_runs_end_to_end_and_writes_what_it_prints(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / 'demo'
  env = dict(os.environ, HOME=str(tmp_path))          # the synthetic cache goes under tmp
  proc = subprocess.run([sys.executable, 'demo.py', '--variant', 'smoke', '--workdir',
                         str(workdir)], cwd=repo, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isdir(tmp_path / '.cache' / 'rqvae_jax' / 'synthetic')
  out = proc.stdout
  assert 'test SI-SDRi over non-silent stems: model' in out and 'per stem' in out
  metrics = json.load(open(workdir / 'eval' / 'test' / 'metrics.json'))
  assert metrics['windows_kept'] > 0
  line = next(l for l in out.splitlines() if 'test SI-SDRi over non-silent stems' in l)
  printed = float(line.split('model ')[1].split(' dB')[0])
  assert abs(printed - metrics['model']['nonsilent']['mean']) < 0.006
  paths = json.load(open(workdir / 'path_breakdown.json'))
  assert set(paths['nonsilent']) >= {'full', 'unquantized', 'skips_only', 'codes_only',
                                      'all_zero'}
  assert os.path.isfile(workdir / 'val_sisdri.png')
  stems_dir = workdir / 'separated' / 'demo_song'
  song = sf.info(str(workdir / 'demo_song.wav'))
  for stem in ('bass', 'drums', 'guitar', 'piano'):
    info = sf.info(str(stems_dir / f'{stem}.wav'))
    assert (info.samplerate, info.channels, info.frames) == (44100, 2, song.frames)
