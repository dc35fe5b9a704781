"""rqvae-separate's Demucs-style options, each on a stand-in separator (no model: fast, and
every expected output computable by hand): sample formats, FLAC, clipping, --filename,
--two-stems, --shifts, --segment, the parser, -d and the input formats."""
import dataclasses
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import soundfile as sf

from rqvae_jax import audio, chunking, cli, separate, separate_cli, stem_files

STEMS = ('bass', 'drums', 'guitar', 'piano')


@dataclasses.dataclass
class Gains:
  """Quacks like separate.Separator: stem s = gains[s] * chunk, times a ramp over the chunk
  with `ramp` (so the result depends on where the chunk grid falls)."""
  config: ml_collections.ConfigDict
  chunk: int = 2205
  gains: tuple = (0.1, 0.2, 0.3, 0.4)
  ramp: bool = False

  def separate_stems(self, batch):
    stems = batch[..., None] * np.asarray(self.gains, np.float32)
    if self.ramp:
      stems = stems * np.linspace(0.5, 1.5, batch.shape[1], dtype=np.float32)[None, :, None]
    return stems


def _sep(**kwargs):
  config = ml_collections.ConfigDict({
      'data': {'sample_rate': 22050, 'stems': STEMS},
      'inference': {'overlap': 0.5, 'batch_size': 3, 'in_flight': 2, 'chunk_samples': 2205}})
  return Gains(config, **kwargs)


def _song(tmp_path, rate=44100, seconds=1.3, scale=0.5, name='song.wav'):
  t = np.arange(int(rate * seconds)) / rate
  x = scale * np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], -1)
  path = str(tmp_path / name)
  sf.write(path, x, rate, subtype='FLOAT')
  return path


def _separate(sep, path, out, fmt=None, **kwargs):
  return separate.separate_file(sep, path, str(out), STEMS, show_progress=False, fmt=fmt,
                                **kwargs)


def _exact(sep, path, tmp_path, **kwargs):
  """The stems as float32 arrays, as the model made them."""
  r = _separate(sep, path, tmp_path / 'exact', **kwargs)
  return {s: sf.read(f, dtype='float64', always_2d=True)[0] for s, f in r['files'].items()}


@pytest.mark.parametrize('subtype,container,scale,dtype,shift', [
    ('PCM_16', 'WAV', 32768, 'int16', 0), ('PCM_24', 'WAV', 8388608, 'int32', 8),
    ('PCM_16', 'FLAC', 32768, 'int16', 0), ('PCM_24', 'FLAC', 8388608, 'int32', 8)])
def test_integer_formats_hold_the_rounded_stems(tmp_path, subtype, container, scale, dtype,
                                                shift):
  """Default 16-bit WAV, --int24, --flac, --flac --int24: each file holds round(x * 2^(b-1))
  of the float stem (lossless FLAC included)."""
  sep, path = _sep(), _song(tmp_path)
  exact = _exact(sep, path, tmp_path)
  fmt = stem_files.OutputFormat(subtype=subtype, container=container)
  r = _separate(sep, path, tmp_path / 'out', fmt)
  for stem, file in r['files'].items():
    assert file == str(tmp_path / 'out' / 'song' / f'{stem}.{container.lower()}')
    info = sf.info(file)
    assert (info.subtype, info.format, info.samplerate) == (subtype, container, 44100)
    held = sf.read(file, dtype=dtype, always_2d=True)[0].astype(np.int64) >> shift
    np.testing.assert_array_equal(held, np.round(exact[stem] * scale).astype(np.int64))
    assert r['encoded'][stem] == {'gain': 1.0, 'clipped': 0}
  assert sorted(os.listdir(tmp_path / 'out')) == ['song']       # no scratch left behind


def test_float32_keeps_the_model_samples(tmp_path):
  sep, path = _sep(), _song(tmp_path)
  exact = _exact(sep, path, tmp_path)
  r = _separate(sep, path, tmp_path / 'out', stem_files.OutputFormat(subtype='FLOAT'))
  for stem, file in r['files'].items():
    assert sf.info(file).subtype == 'FLOAT'
    np.testing.assert_array_equal(sf.read(file, dtype='float64', always_2d=True)[0], exact[stem])


def test_clip_modes(tmp_path):
  """A stem beyond full scale: rescale turns that stem down as a whole to peak 1/1.01 (like
  Demucs), clamp clips its samples, none keeps them (float32 only)."""
  sep, path = _sep(gains=(0.1, 0.2, 3.0, 0.4)), _song(tmp_path)   # guitar peaks at 1.5
  exact = _exact(sep, path, tmp_path)
  peak = np.abs(exact['guitar']).max()
  rescaled = _separate(sep, path, tmp_path / 'r', stem_files.OutputFormat())
  gain = rescaled['encoded']['guitar']['gain']
  assert gain == pytest.approx(1 / (1.01 * peak)) and rescaled['encoded']['bass']['gain'] == 1.0
  held = sf.read(rescaled['files']['guitar'], dtype='int16', always_2d=True)[0]
  e32 = exact['guitar'].astype(np.float32)
  np.testing.assert_array_equal(held, np.round(e32 * np.float32(gain) * np.float32(32768)))
  assert 'guitar turned down 3.6 dB to fit' in stem_files.describe(rescaled['encoded'],
                                                                  stem_files.OutputFormat())
  clamped = _separate(sep, path, tmp_path / 'c', stem_files.OutputFormat(clip_mode='clamp'))
  assert clamped['encoded']['guitar']['clipped'] == np.count_nonzero(np.abs(exact['guitar']) > 1)
  held = sf.read(clamped['files']['guitar'], dtype='float64', always_2d=True)[0]
  np.testing.assert_allclose(held, np.clip(exact['guitar'], -1, 32767 / 32768), atol=2 ** -15)
  kept = _separate(sep, path, tmp_path / 'n', stem_files.OutputFormat('FLOAT', clip_mode='none'))
  assert np.abs(sf.read(kept['files']['guitar'])[0]).max() == pytest.approx(peak)
  for fmt, message in ((stem_files.OutputFormat(clip_mode='none'), 'only --float32'),
                       (stem_files.OutputFormat('FLOAT', 'FLAC'), 'FLAC stores integer'),
                       (stem_files.OutputFormat(clip_mode='tanh'), '--clip-mode must be')):
    with pytest.raises(ValueError, match=message):
      _separate(sep, path, tmp_path / 'bad', fmt)


def test_filename_template_and_its_checks(tmp_path):
  sep, path = _sep(), _song(tmp_path, name='my song.wav')
  fmt = stem_files.OutputFormat(filename='{stem}/{track}.{trackext}.{ext}')
  r = _separate(sep, path, tmp_path / 'out', fmt)
  assert r['files'] == {s: str(tmp_path / 'out' / s / 'my song.wav.wav') for s in STEMS}
  assert r['folder'] == str(tmp_path / 'out')
  flat = _separate(sep, path, tmp_path / 'flat', stem_files.OutputFormat(
      filename='{track}_{stem}.{ext}'))
  assert sorted(os.listdir(tmp_path / 'flat')) == [f'my song_{s}.wav' for s in STEMS]
  assert flat['folder'] == str(tmp_path / 'flat')
  for template, message in (('{track}.{ext}', 'no {stem}'), ('{model}/{stem}.{ext}', 'uses model'),
                            ('/abs/{stem}.{ext}', 'inside the output'),
                            ('../{stem}.{ext}', 'inside the output'), ('{stem', 'not a valid')):
    with pytest.raises(ValueError, match=message):
      stem_files.check_filename(template)
  # Two songs, one set of files: the second is refused before any separation.
  named = [('a/song.wav', 'song'), ('b/other.wav', 'other')]
  kept, errors = separate_cli._targets(named, stem_files.OutputFormat(filename='{stem}.{ext}'),
                                       STEMS)
  assert kept == named[:1] and 'would write the same files as a/song.wav' in errors['b/other.wav']


def test_two_stems_writes_the_stem_and_the_rest(tmp_path):
  sep, path = _sep(), _song(tmp_path)
  exact = _exact(sep, path, tmp_path)
  r = _separate(sep, path, tmp_path / 'out', stem_files.OutputFormat(
      subtype='FLOAT', clip_mode='none', two_stems='drums'))
  assert sorted(os.listdir(tmp_path / 'out' / 'song')) == ['drums.wav', 'no_drums.wav']
  got = {s: sf.read(f, dtype='float64', always_2d=True)[0] for s, f in r['files'].items()}
  np.testing.assert_array_equal(got['drums'], exact['drums'])
  np.testing.assert_allclose(got['no_drums'], exact['bass'] + exact['guitar'] + exact['piano'],
                             atol=1e-6)
  with pytest.raises(ValueError, match='--two-stems vocals: the model separates bass'):
    _separate(sep, path, tmp_path / 'bad', stem_files.OutputFormat(two_stems='vocals'))


def test_shifts_average_passes_over_shifted_chunk_grids(tmp_path):
  """--shifts 3: the mean of the separation of the song delayed by 0 and two seeded delays
  up to 0.5 s, each advanced back; recomputed here with the whole-array overlap-add."""
  sep = _sep(ramp=True)
  path = _song(tmp_path, rate=22050, seconds=2.0)           # the model's rate: no resampling
  x = sf.read(path, dtype='float32', always_2d=True)[0]
  delays = separate.shift_delays(3, 22050)
  assert delays[0] == 0 and len(set(delays)) == 3 and max(delays) <= 11025
  assert delays == separate.shift_delays(3, 22050)                         # seeded
  fn = sep.separate_stems
  inf = sep.config.inference
  expected = np.mean([[chunking.overlap_add(fn, np.concatenate([np.zeros(d, np.float32), x[:, c]]),
                                            sep.chunk, inf.overlap, inf.batch_size)[d:d + len(x)]
                       for c in range(2)] for d in delays], axis=0)      # (C, N, S)
  r = _separate(sep, path, tmp_path / 'out', shifts=3)
  for s, stem in enumerate(STEMS):
    got = sf.read(r['files'][stem], dtype='float64', always_2d=True)[0]
    np.testing.assert_allclose(got, expected[:, :, s].T, atol=2e-6)
  one = _separate(sep, path, tmp_path / 'one', shifts=1)
  assert not np.allclose(sf.read(one['files']['bass'])[0], expected[:, :, 0].T, atol=1e-4)
  with pytest.raises(ValueError, match='--shifts must be at least 1'):
    separate.shift_delays(0, 22050)
  with pytest.raises(ValueError, match='inference.shifts'):
    separate.shift_delays(2.0, 22050)
  # Without --shifts the config's inference.shifts applies (a recipe may average by default).
  sep.config.inference.shifts = 3
  default = _separate(sep, path, tmp_path / 'default')
  for stem in STEMS:
    np.testing.assert_array_equal(sf.read(default['files'][stem])[0],
                                  sf.read(r['files'][stem])[0])


def test_segment_sets_the_chunk_to_a_valid_length():
  from configs.rqvae import get_config
  from rqvae_jax import model
  sep = _sep()
  sep.config.model = get_config('smoke').model
  separate_cli._configure(sep, overlap=0.25, batch_size=5, in_flight=1, segment=0.3)
  assert sep.chunk == model.next_valid_length(6615, sep.config.model) >= 6615
  assert model.is_valid_length(sep.chunk, sep.config.model)
  assert sep.config.inference.chunk_samples == sep.chunk
  assert (sep.config.inference.overlap, sep.config.inference.batch_size,
          sep.config.inference.in_flight) == (0.25, 5, 1)
  with pytest.raises(ValueError, match='overlap must be in'):
    separate_cli._configure(sep, 1.0, 0, 0, None)


def test_parser_takes_demucs_spellings_and_underscores():
  argv = ['a.mp3', '--workdir', 'runs/demo/', '-o', 'OUT', '--filename', '{track}_{stem}.{ext}',
          '--int24', '--flac', '--clip-mode', 'clamp', '--two-stems', 'bass', '--segment', '3',
          'b.wav', '--overlap', '0.25', '--shifts', '2', '-j', '4', '--in_flight', '1',
          '-d', 'cpu', '-v']
  args = separate_cli.build_parser().parse_intermixed_args(cli.argparse_argv(argv))
  assert args.files == ['a.mp3', 'b.wav'] and args.out == 'OUT' and args.verbose
  assert (args.segment, args.overlap, args.shifts, args.batch_size, args.in_flight,
          args.device) == (3.0, 0.25, 2, 4, 1, 'cpu')
  assert separate_cli.output_format(args) == stem_files.OutputFormat(
      'PCM_24', 'FLAC', 'clamp', '{track}_{stem}.{ext}', 'bass')
  assert separate_cli.model_name(args.workdir) == 'demo'
  args = separate_cli.build_parser().parse_intermixed_args(
      cli.argparse_argv(['x.wav', '--workdir', 'w', '--batch_size', '3', '--float32']))
  assert args.batch_size == 3 and separate_cli.output_format(args).subtype == 'FLOAT'
  assert separate_cli.output_format(args).clip_mode == 'rescale'
  with pytest.raises(SystemExit):
    separate_cli.build_parser().parse_args(['x.wav', '--workdir', 'w', '--int24', '--float32'])


def test_device_gpu_without_cuda_is_one_clear_error():
  """-d gpu is JAX_PLATFORMS=cuda; where JAX has no CUDA the error says how to get it."""
  out = subprocess.run([sys.executable, '-c', 'from rqvae_jax import separate_cli, cli\n'
                        'import sys; sys.exit(cli.run_guarded(lambda: separate_cli.use_device("gpu"), False))'],
                       capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if out.returncode == 0:
    pytest.skip('JAX has a CUDA device here')
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert "-d gpu: JAX cannot use cuda" in out.stderr and "rqvae-jax[cuda]" in out.stderr


def test_input_formats_mp3_read_m4a_names_ffmpeg(tmp_path):
  x = 0.3 * np.sin(2 * np.pi * 440 * np.arange(22050) / 44100)[:, None].repeat(2, 1)
  mp3 = str(tmp_path / 'song.mp3')
  sf.write(mp3, x, 44100, format='MP3', subtype='MPEG_LAYER_III')
  info = audio.inspect_audio(mp3)
  assert info.channels == 2 and info.sample_rate == 44100 and info.num_frames > 20000
  m4a = tmp_path / 'song.m4a'
  m4a.write_bytes(b'\x00\x00\x00\x20ftypM4A ' + bytes(200))
  with pytest.raises(ValueError, match=r'does not decode \.m4a.*ffmpeg -i'):
    audio.check_path(str(m4a))
