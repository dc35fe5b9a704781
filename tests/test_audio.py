"""User audio loading and saving (rqvae_jax.audio)."""
import numpy as np
import pytest
import soundfile as sf

from rqvae_jax import audio


def _stereo(n, rate):
  t = np.arange(n) / rate
  left = 0.5 * np.sin(2 * np.pi * 220 * t)
  right = 0.3 * np.sin(2 * np.pi * 330 * t)
  return np.stack([left, right], 1).astype(np.float32)


def test_round_trip_restores_rate_channels_length(tmp_path):
  rate, n = 44100, int(9.3 * 44100)
  x = _stereo(n, rate)
  src = str(tmp_path / 'song.wav')
  sf.write(src, x, rate, subtype='PCM_16')
  mono, info = audio.load_audio(src, 22050)
  assert mono.dtype == np.float32 and mono.ndim == 1
  assert mono.shape[0] == round(n * 22050 / rate)
  assert (info.sample_rate, info.channels, info.num_frames, info.model_rate) == (44100, 2, n,
                                                                                 22050)
  assert info.subtype == 'PCM_16'
  out = str(tmp_path / 'out' / 'bass.flac')
  audio.save_audio(out, mono, info)
  back, back_rate = sf.read(out, dtype='float32', always_2d=True)
  assert back_rate == 44100 and back.shape == (n, 2)
  # Both channels carry the mono stem; it matches the downmix away from the edges.
  np.testing.assert_array_equal(back[:, 0], back[:, 1])
  core = slice(1000, n - 1000)
  assert np.abs(back[core, 0] - x[core].mean(1)).max() < 2e-3


def test_save_at_a_plain_rate_and_channel_count(tmp_path):
  out = str(tmp_path / 'x.wav')
  loud = np.array([2.0, -2.0, 1.5, 0.5] * 25, np.float32)
  audio.save_audio(out, loud, 22050, channels=3)
  back, rate = sf.read(out, dtype='int16', always_2d=True)
  assert rate == 22050 and back.shape == (100, 3)
  # Clipped to full scale, not wrapped around; in-range samples untouched.
  np.testing.assert_array_equal(back[:4, 0], [32767, -32768, 32767, 16384])
  np.testing.assert_array_equal(back[:, 0], back[:, 2])
  audio.save_audio(out, loud, 22050, subtype='FLOAT')
  np.testing.assert_array_equal(sf.read(out, dtype='float32')[0], loud)


def test_ogg_output_is_vorbis_at_the_file_rate(tmp_path):
  out = str(tmp_path / 'x.ogg')
  t = np.arange(22050) / 22050
  audio.save_audio(out, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050,
                   channels=2, subtype='PCM_24')                     # ignored for OGG
  info = sf.info(out)
  assert (info.format, info.subtype, info.samplerate, info.channels) == ('OGG', 'VORBIS',
                                                                         22050, 2)
  back = sf.read(out, dtype='float32')[0][:, 0]
  spectrum = np.abs(np.fft.rfft(back))
  assert abs(np.argmax(spectrum) * 22050 / len(back) - 440) < 2      # lossy, same tone


def test_resample_lengths():
  x = np.random.default_rng(0).standard_normal(22050).astype(np.float32)
  np.testing.assert_array_equal(audio.resample(x, 22050, 22050), x)   # same rate: untouched
  assert audio.resample(x, 22050, 44100).shape == (44100,)
  assert audio.resample(np.stack([x, x], 1), 22050, 16000).shape == (16000, 2)
  tone = np.sin(2 * np.pi * 1000 * np.arange(2205) / 22050).astype(np.float32)
  up = audio.resample(tone, 22050, 44100)                    # a band-limited signal's samples
  np.testing.assert_allclose(up[200:4000:2], tone[100:2000], atol=1e-3)   # survive, in place


def test_a_file_at_the_model_rate_loads_unchanged(tmp_path):
  path = str(tmp_path / 'model_rate.wav')
  x = (np.random.default_rng(3).integers(-2000, 2000, 5000) / 32768).astype(np.float32)
  sf.write(path, x, 22050, subtype='PCM_16')
  mono, info = audio.load_audio(path, 22050)
  np.testing.assert_array_equal(mono, x)
  assert (info.sample_rate, info.model_rate, info.channels) == (22050, 22050, 1)


def test_nan_file_is_rejected(tmp_path):
  path = str(tmp_path / 'nan.wav')
  x = np.zeros((1000, 2), np.float32)
  x[500, 1] = np.nan
  sf.write(path, x, 44100, subtype='FLOAT')
  with pytest.raises(ValueError, match=r'NaN/inf samples \(first at frame 500, channel 1\)'):
    audio.load_audio(path, 22050)


def test_empty_and_garbage_files_are_rejected(tmp_path):
  empty = tmp_path / 'empty.wav'
  empty.write_bytes(b'')
  with pytest.raises(ValueError, match='Cannot read audio file'):
    audio.load_audio(str(empty), 22050)
  no_frames = str(tmp_path / 'no_frames.wav')
  sf.write(no_frames, np.zeros((0, 1), np.float32), 22050)
  with pytest.raises(ValueError, match='is empty'):
    audio.load_audio(no_frames, 22050)
  garbage = tmp_path / 'garbage.ogg'
  garbage.write_bytes(np.random.default_rng(0).bytes(5000))
  with pytest.raises(ValueError, match='Cannot read audio file'):
    audio.load_audio(str(garbage), 22050)
  with pytest.raises(ValueError, match='not found'):
    audio.load_audio(str(tmp_path / 'missing.flac'), 22050)


def test_too_short_is_rejected(tmp_path):
  path = str(tmp_path / 'short.wav')
  sf.write(path, np.zeros(300, np.float32), 44100)
  with pytest.raises(ValueError, match='too short: 150 frames at 22050 Hz'):
    audio.load_audio(path, 22050, min_frames=200)
  assert audio.load_audio(path, 22050, min_frames=150)[0].shape == (150,)
