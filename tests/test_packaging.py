"""The installable distribution: the wheel's contents, the console scripts run from another
folder, the bundled configs by name, and one flag spelling.

The wheel is built from a copy of the project's files (nothing is written into the working
tree) with the test venv's setuptools and installed with `pip --target`, no dependencies:
the test venv already has them, so this takes seconds and no network.
"""
import json
import os
import shutil
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import soundfile as sf

from rqvae_jax import bundled, cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('rqvae-separate', 'rqvae-train', 'rqvae-eval')


def _pip(*args, cwd=None):
  out = subprocess.run([sys.executable, '-m', 'pip', *args, '-q', '--disable-pip-version-check'],
                       capture_output=True, text=True, timeout=120, cwd=cwd)
  assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """The project built as a wheel and installed into a folder of its own."""
  pytest.importorskip('setuptools')
  root = tmp_path_factory.mktemp('install')
  src = root / 'src'
  src.mkdir()
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(REPO, name), src / name)
  for name in ('rqvae_jax', 'configs', 'data'):
    shutil.copytree(os.path.join(REPO, name), src / name,
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  _pip('wheel', '--no-deps', '--no-build-isolation', '--no-index', '-w', str(root / 'dist'),
       str(src))
  wheel, = (root / 'dist').glob('rqvae_jax-*.whl')
  _pip('install', '--no-deps', '--no-index', '--target', str(root / 'site'), str(wheel))
  elsewhere = root / 'elsewhere'
  (elsewhere / 'data').mkdir(parents=True)       # a user's own `data` package, which the
  (elsewhere / 'data' / '__init__.py').write_text('raise ImportError("not ours")\n')  # must not shadow
  env = dict(os.environ, PYTHONPATH=str(root / 'site'))
  return types.SimpleNamespace(wheel=wheel, site=root / 'site', bin=root / 'site' / 'bin',
                               cwd=elsewhere, env=env)


def _run(installed, *command, timeout=60):
  return subprocess.run(list(command), cwd=installed.cwd, env=installed.env,
                        capture_output=True, text=True, timeout=timeout)


def test_wheel_claims_no_generic_top_level_names(installed):
  names = zipfile.ZipFile(installed.wheel).namelist()
  assert {n.split('/')[0] for n in names} == {'rqvae_jax', installed.wheel.name.split('-py')[0]
                                              + '.dist-info'}
  for path in ('rqvae_jax/configs/rqvae.py', 'rqvae_jax/data/slakh.py',
               'rqvae_jax/data/tfds/builders.py', 'rqvae_jax/separate_cli.py',
               'rqvae_jax/native/lstm_cpu.cc'):          # compiled on first use
    assert path in names
  assert not [n for n in names if n.startswith(('tests/', 'benchmarks/'))]
  info = installed.wheel.name.split('-py')[0] + '.dist-info/'
  entry_points = zipfile.ZipFile(installed.wheel).read(info + 'entry_points.txt').decode()
  for script in SCRIPTS:
    assert f'{script} = rqvae_jax.' in entry_points
  meta = zipfile.ZipFile(installed.wheel).read(info + 'METADATA').decode()
  assert 'Requires-Python: >=3.11' in meta
  runtime = [line.split(':', 1)[1].strip().split(';')[0].lower() for line in meta.splitlines()
             if line.startswith('Requires-Dist:') and 'extra ==' not in line]
  runtime = {r.split('>')[0].split('<')[0].split('=')[0].split('[')[0].strip() for r in runtime}
  assert {'jax', 'flax', 'pyyaml', 'soundfile', 'pillow'} <= runtime
  assert not runtime & {'pytest', 'psutil', 'librosa', 'tensorflow-datasets', 'torch'}
  for extra in ('cuda', 'tfds', 'dev'):
    assert f'Provides-Extra: {extra}' in meta


def test_installed_commands_run_from_another_folder(installed):
  for script in SCRIPTS:
    out = _run(installed, str(installed.bin / script), '--help')
    assert out.returncode == 0, out.stderr[-2000:]
    assert '--workdir' in out.stdout + out.stderr, script
  separate_help = _run(installed, str(installed.bin / 'rqvae-separate'), '--help').stdout
  for option in ('--out', '--filename', '--int24', '--float32', '--flac', '--clip-mode',
                 '--two-stems', '--segment', '--overlap', '--shifts', '--batch-size',
                 '--device', 'MP3', 'ffmpeg'):
    assert option in separate_help, option
  # The installed package finds its own data and configs, by name, whatever the folder holds.
  probe = ('import json, rqvae_jax; from rqvae_jax import bundled; print(json.dumps(['
           'rqvae_jax.__file__, bundled.data_module("slakh").__name__, '
           'bundled.get_config("rqvae:smoke").variant, bundled.resolve_config("configs/rqvae.py:demo")]))')
  out = _run(installed, sys.executable, '-c', probe)
  assert out.returncode == 0, out.stderr[-2000:]
  where, slakh, variant, resolved = json.loads(out.stdout)
  assert where.startswith(str(installed.site)) and slakh == 'rqvae_jax.data.slakh'
  assert variant == 'smoke'
  assert resolved == str(installed.site / 'rqvae_jax' / 'configs' / 'rqvae.py') + ':demo'
  out = _run(installed, str(installed.bin / 'rqvae-train'), '--workdir', 'w', '--config',
             'nonesuch:demo')
  assert out.returncode == 1 and 'neither a file nor a bundled config' in out.stderr


def test_installed_rqvae_separate_writes_the_demucs_layout_in_16_bit(installed, smoke_run,
                                                                      tmp_path):
  """rqvae-separate -o OUT --workdir DIR song.wav from another folder: OUT/<model>/song/
  {bass,drums,guitar,piano}.wav, 16-bit PCM at the song's rate, length and channels."""
  _, workdir = smoke_run
  rate, seconds = 44100, 9.3
  t = np.arange(int(rate * seconds)) / rate
  song = np.stack([0.3 * np.sin(2 * np.pi * 110 * t), 0.2 * np.sin(2 * np.pi * 440 * t)], -1)
  path = tmp_path / 'song.wav'
  sf.write(path, song, rate, subtype='PCM_16')
  out = _run(installed, str(installed.bin / 'rqvae-separate'), '-o', str(tmp_path / 'sep'),
             '--workdir', workdir, '-d', 'cpu', str(path), timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  folder = tmp_path / 'sep' / os.path.basename(workdir) / 'song'
  stems = {}
  for stem in ('bass', 'drums', 'guitar', 'piano'):
    info = sf.info(str(folder / f'{stem}.wav'))
    assert (info.samplerate, info.channels, info.frames) == (rate, 2, len(t))
    assert info.subtype == 'PCM_16'
    stems[stem] = sf.read(str(folder / f'{stem}.wav'), dtype='float64')[0]
    # Separated audio, channel by channel: not silence, and the two channels differ.
    assert np.sqrt(np.mean(stems[stem] ** 2)) > 1e-3
    assert np.abs(stems[stem][:, 0] - stems[stem][:, 1]).max() > 1e-3
  assert sorted(os.listdir(folder)) == ['bass.wav', 'drums.wav', 'guitar.wav', 'piano.wav']
  names = list(stems)
  assert all(not np.allclose(stems[a], stems[b], atol=1e-4)                  # four stems
             for i, a in enumerate(names) for b in names[i + 1:])
  # The reported residual, 10 log10(|input - sum of stems|^2 / |input|^2), is the model's
  # float stems'; the 16-bit files give the same figure unless a stem had to be rescaled.
  x = sf.read(str(path), dtype='float64')[0]
  residual = 10 * np.log10(np.sum((x - sum(stems.values())) ** 2) / np.sum(x ** 2))
  reported = float(out.stdout.split('stems sum to the input within ')[1].split(' dB')[0])
  if 'turned down' not in out.stdout:
    assert abs(residual - reported) < 0.06, (residual, out.stdout)


def test_bundled_packages_in_a_clone_are_the_top_level_ones():
  """From the repository (tests, train.py, python -m data.x) library code gets the very
  modules a caller imports as `data.x`: one copy, so state and monkeypatches are shared."""
  from data import slakh
  import configs.rqvae
  assert bundled.data_module('slakh') is slakh
  assert bundled.configs_module() is configs.rqvae
  assert bundled.config_names() == ['prior', 'rqvae']   # RQ-VAE and the RQ-Transformer prior
  assert bundled.get_config('rqvae:smoke').variant == 'smoke'
  assert bundled.get_config(os.path.join(REPO, 'configs', 'rqvae.py') + ':demo').variant == 'demo'
  with pytest.raises(ValueError, match=r"'nonesuch' is neither a file nor a bundled config "
                                       r'\(names: prior, rqvae\)'):
    bundled.resolve_config('nonesuch:demo')


def test_one_flag_spelling_for_every_command():
  """Dashes everywhere, underscores accepted: absl commands get underscores, argparse ones
  dashes; values, config fields and what follows -- are left alone."""
  argv = ['prog', '--allow-changed=data.root', '--config.optim.plateau_min_delta=0.1',
          '--config', 'rqvae:smoke', '--work-dir', 'my-run', '-v', '--', '--keep-me']
  assert cli.absl_argv(argv) == [
      'prog', '--allow_changed=data.root', '--config.optim.plateau_min_delta=0.1', '--config',
      bundled.config_file('rqvae') + ':smoke', '--work_dir', 'my-run', '-v', '--', '--keep-me']
  assert cli.absl_argv(['p', '--config=rqvae.py:demo'])[1] == (
      '--config=' + bundled.config_file('rqvae') + ':demo')
  assert cli.absl_argv(['p', '--config=configs/rqvae.py:demo'])[1] == (   # a path that exists
      '--config=configs/rqvae.py:demo')                                 # (tests run in the repo)
  assert cli.argparse_argv(['--batch_size', '3', '--in_flight=1', 'my_song.wav', '-1e-3']) == [
      '--batch-size', '3', '--in-flight=1', 'my_song.wav', '-1e-3']
