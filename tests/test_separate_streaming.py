"""The separate path without a model: streaming in bounded memory, input and output checks.

A stand-in separator (a fixed linear map of each chunk, optionally with a bias or NaN) makes
every expected output computable by hand and keeps these tests fast.
"""
import dataclasses
import io
import os
import tracemalloc

import ml_collections
import numpy as np
import pytest
import soundfile as sf

from rqvae_jax import audio, chunking, cli, separate

STEMS = ('bass', 'drums', 'guitar', 'piano')
SHARES = np.array([0.1, 0.2, 0.3, 0.4], np.float32)


@dataclasses.dataclass
class FakeSeparator:
  """Quacks like separate.Separator: stems = SHARES * chunk + bias (NaN with `nan`)."""
  config: ml_collections.ConfigDict
  chunk: int = 2205
  bias: float = 0.0
  nan: bool = False

  def separate_stems(self, batch):
    stems = batch[..., None] * SHARES + self.bias
    if self.nan:
      stems[0, 5, 1] = np.nan
    return stems


def _fake(**kwargs):
  config = ml_collections.ConfigDict({
      'data': {'sample_rate': 22050, 'stems': STEMS},
      'inference': {'overlap': 0.5, 'batch_size': 3, 'in_flight': 2}})
  return FakeSeparator(config, **kwargs)


def _write(path, seconds, rate=16000, channels=2, scale=0.1):
  """Tones below 4 kHz (they survive resampling to 22 050 Hz), written block by block."""
  n = int(seconds * rate)
  freqs = np.array([220.0, 1000.0, 3100.0])[:, None] * (1 + 0.1 * np.arange(channels))
  with sf.SoundFile(str(path), 'w', rate, channels, subtype='PCM_16') as f:
    for start in range(0, n, 1 << 16):
      t = (start + np.arange(min(1 << 16, n - start)))[:, None, None] / rate
      f.write(scale * np.sin(2 * np.pi * freqs * t).mean(axis=1))
  return str(path)


def test_overlap_add_stream_of_blocks_equals_whole_channels():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3001, 3)).astype(np.float32)
  fn = lambda b: np.stack([np.sin(b), np.cos(b) * b, b ** 2], -1)   # rows must not mix
  for overlap, batch, in_flight in ((0.0, 2, 1), (0.5, 3, 2), (0.75, 4, 3)):
    blocks = [x[i:i + 257] for i in range(0, len(x), 257)]
    out = np.concatenate(list(chunking.overlap_add_stream(fn, blocks, 200, overlap, batch,
                                                          in_flight=in_flight)))
    assert out.shape == (3001, 3, 3)
    for c in range(3):
      np.testing.assert_allclose(out[:, :, c], chunking.overlap_add(fn, x[:, c], 200, overlap, 1),
                                 rtol=1e-6, atol=1e-6)


def test_resample_stream_equals_whole_resampling():
  x = np.random.default_rng(1).normal(size=(50001, 2)).astype(np.float32)
  blocks = (x[i:i + 4096] for i in range(0, len(x), 4096))
  got = np.concatenate(list(audio.resample_stream(blocks, 44100, 22050, 2)))
  np.testing.assert_array_equal(got, audio.resample(x, 44100, 22050))
  assert audio.resample_stream is not None and len(got) == 25001


@pytest.mark.parametrize('rate,channels', [(44100, 2), (48000, 5), (22050, 1)])
def test_separate_file_streams_the_whole_file_path(tmp_path, rate, channels):
  """The streamed stems are what the whole-array path gives: each channel resampled to the
  model rate, overlap-added, resampled back and trimmed to the file's length (stereo, five
  channels at 48 kHz, mono at the model's own rate)."""
  path = _write(tmp_path / 'song.wav', 3.3, rate=rate, channels=channels)
  sep = _fake()
  report = separate.separate_file(sep, path, str(tmp_path / 'out'), STEMS,
                                  show_progress=False, block_frames=5000)
  x, _ = sf.read(path, dtype='float32', always_2d=True)
  inf = sep.config.inference
  fn = sep.separate_stems
  for c in range(channels):
    mono = audio.resample(x[:, c], rate, 22050)
    stems = chunking.overlap_add(fn, mono, sep.chunk, inf.overlap, inf.batch_size)
    back = audio.resample(stems, 22050, rate)[:len(x)]
    for s, name in enumerate(STEMS):
      got, got_rate = sf.read(str(tmp_path / 'out' / 'song' / f'{name}.wav'), dtype='float32',
                              always_2d=True)
      assert got.shape == x.shape and got_rate == rate
      np.testing.assert_allclose(got[:len(back), c], back[:, s], atol=2e-6)
  assert report['channels'] == channels and report['frames'] == len(x)
  assert not report['silent']
  assert report['residual_db'] < -40          # the stand-in's stems sum to its input
  assert not [f for f in os.listdir(tmp_path / 'out') if f.startswith('.')]


def test_separate_file_memory_does_not_grow_with_length(tmp_path):
  """Peak traced (NumPy) memory of a 10x longer file stays the same: nothing holds the song."""
  peaks = []
  sep = _fake(chunk=8820)
  sep.config.inference.batch_size = 8
  for seconds in (8, 80):
    path = _write(tmp_path / f'song{seconds}.wav', seconds)
    tracemalloc.start()
    separate.separate_file(sep, path, str(tmp_path / 'out'), STEMS, show_progress=False)
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
  # Holding the song would take 10 MB (16 kHz stereo float32), its stems 56 MB (model rate).
  assert peaks[1] < 1.25 * peaks[0] and peaks[1] < 20e6, peaks


def test_silent_input_gives_silent_stems_and_a_sensible_report(tmp_path):
  path = str(tmp_path / 'silence.wav')
  sf.write(path, np.zeros((30000, 2), np.float32), 44100, subtype='PCM_16')
  sep = _fake(bias=0.03)               # like the model: biases make noise of silence
  report = separate.separate_file(sep, path, str(tmp_path / 'out'), STEMS, show_progress=False)
  assert report['silent'] and report['residual_db'] is None and report['peak'] == 0.0
  for name in STEMS:
    stem, rate = sf.read(str(tmp_path / 'out' / 'silence' / f'{name}.wav'), always_2d=True)
    assert rate == 44100 and stem.shape == (30000, 2) and not stem.any()
  loud = _write(tmp_path / 'quiet.wav', 0.5, scale=0.01)   # not silent: the model runs
  assert not separate.separate_file(sep, loud, str(tmp_path / 'out'), STEMS,
                                    show_progress=False)['silent']


def test_nan_stems_are_refused_and_nothing_is_written(tmp_path):
  path = _write(tmp_path / 'song.wav', 1.0)
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match='NaN/inf stems.*nothing was written'):
    separate.separate_file(_fake(nan=True), path, str(out), STEMS, show_progress=False)
  assert os.listdir(out) == []          # neither the song's folder nor a partial one
  with pytest.raises(ValueError, match='2 NaN/inf samples.*nothing was written'):
    audio.save_audio(str(tmp_path / 'x.wav'), np.array([0.1, np.nan, np.inf]), 22050)
  assert not (tmp_path / 'x.wav').exists()


def _raw_wav(tmp_path, name='a.wav', frames=1000):
  x = (0.1 * np.random.default_rng(0).normal(size=(frames, 2))).astype(np.float32)
  path = str(tmp_path / name)
  sf.write(path, x, 44100, subtype='PCM_16')
  return path, bytearray(open(path, 'rb').read())


def test_truncated_wav_is_refused_by_every_reader(tmp_path):
  from data import slakh
  path, raw = _raw_wav(tmp_path)
  cut = str(tmp_path / 'cut.wav')
  open(cut, 'wb').write(raw[:len(raw) // 2])
  assert sf.info(cut).frames == 494                     # libsndfile alone reads half quietly
  for reader in (lambda p: audio.load_audio(p, 22050), audio.inspect_audio):
    with pytest.raises(ValueError, match='truncated: the data chunk declares 4000 bytes'):
      reader(cut)
  assert slakh.wav_problem is audio.wav_problem          # one check for both paths
  # RF64 keeps the real size in its ds64 chunk: a truncated one is caught too.
  rf64 = str(tmp_path / 'r.wav')
  sf.write(rf64, np.zeros((1000, 2), np.float32), 44100, format='RF64', subtype='PCM_16')
  data = open(rf64, 'rb').read()
  open(rf64, 'wb').write(data[:len(data) - 1000])
  assert 'truncated' in audio.wav_problem(rf64)


def test_streaming_header_wav_is_read_whole(tmp_path):
  """Data size 0xFFFFFFFF (a writer that could not seek back): libsndfile reads to the end."""
  path, raw = _raw_wav(tmp_path)
  data = raw.find(b'data')
  raw[4:8] = raw[data + 4:data + 8] = b'\xff\xff\xff\xff'
  stream = str(tmp_path / 'stream.wav')
  open(stream, 'wb').write(raw)
  assert audio.wav_problem(stream) is None
  mono, info = audio.load_audio(stream, 44100)
  assert info.num_frames == 1000 and mono.shape == (1000,)
  assert audio.inspect_audio(stream).num_frames == 1000


def test_absurd_samples_are_refused(tmp_path):
  path = str(tmp_path / 'scaled.wav')
  x = np.full((1000, 2), 0.5, np.float32)
  x[700, 1] = 1e30
  sf.write(path, x, 44100, subtype='FLOAT')
  for reader in (lambda p: audio.load_audio(p, 22050), audio.inspect_audio):
    with pytest.raises(ValueError, match=r'samples up to 1e\+30 \(first beyond 100 at frame '
                                         r'700, channel 1\).*rescale'):
      reader(path)
  x[700, 1] = 2.0                        # a little over full scale is still audio
  sf.write(path, x, 44100, subtype='FLOAT')
  assert audio.inspect_audio(path).peak == 2.0


def test_output_names_keep_same_named_songs_apart(tmp_path):
  (tmp_path / 'b').mkdir()
  a, b, c = (str(tmp_path / 'song.wav'), str(tmp_path / 'song.flac'),
             str(tmp_path / 'b' / 'song.flac'))
  named, errors = cli.output_names([a, b, c, a, str(tmp_path / 'other.ogg')])
  assert named == [(a, 'song_wav'), (b, 'song_flac'), (str(tmp_path / 'other.ogg'), 'other')]
  assert list(errors) == [c] and 'same name' in errors[c]      # the second song.wav: once


def test_output_folder_is_checked_before_the_model_is_restored(tmp_path):
  song = _write(tmp_path / 'song.wav', 0.2)
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  # The workdir does not exist either: the output folder's error must come first.
  for out, message in ((blocker, 'is a file'), (blocker / 'sub', 'Cannot write to the output')):
    with pytest.raises(ValueError, match=message):
      separate.separate_files([song], str(tmp_path / 'no_workdir'), str(out))


def test_cli_errors_are_one_line_with_the_traceback_under_verbose(tmp_path):
  song = _write(tmp_path / 'song.wav', 0.2)
  run = lambda verbose: separate.separate_files([song], str(tmp_path / 'nowhere'),
                                                str(tmp_path / 'out'), stream=io.StringIO())
  for verbose in (False, True):
    stream = io.StringIO()
    assert cli.run_guarded(lambda: run(verbose), verbose, stream) == 1
    text = stream.getvalue()
    assert "error: 'nowhere' holds no rqvae-jax run" in text.replace(str(tmp_path) + '/', '')
    assert ('Traceback' in text) == verbose
  assert separate.separate_files([str(tmp_path / 'missing.wav'), str(tmp_path)],
                                 str(tmp_path / 'nowhere'), str(tmp_path / 'out'),
                                 stream=io.StringIO()) == 1   # no good file: no restore
