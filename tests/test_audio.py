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
  audio.save_audio(out, np.full(100, 2.0, np.float32), 22050, channels=3)
  back, rate = sf.read(out, always_2d=True)
  assert rate == 22050 and back.shape == (100, 3)
  assert back.max() <= 1.0  # clipped, not wrapped
  audio.save_audio(out, np.full(100, 2.0, np.float32), 22050, subtype='FLOAT')
  assert sf.read(out)[0].max() == 2.0


def test_resample_lengths():
  x = np.random.default_rng(0).standard_normal(22050).astype(np.float32)
  assert audio.resample(x, 22050, 22050) is not None
  assert audio.resample(x, 22050, 44100).shape == (44100,)
  assert audio.resample(np.stack([x, x], 1), 22050, 16000).shape == (16000, 2)


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
