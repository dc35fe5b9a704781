"""Codec mode: the codes file (round trip, packing, refusal of another codec's file) and
encode -> decode against the model's forward pass with skips off."""
import json
import os

import jax
import numpy as np
import pytest
import soundfile as sf

from rqvae_jax import codec as codec_lib
from rqvae_jax import codes_file
from tests import codec_fixture


@pytest.fixture(scope='module')
def codec_workdir(tmp_path_factory):
  """A workdir holding an untrained codec-mode smoke model (step 0 checkpoint): decoding
  needs no trained weights, only the same ones on both sides."""
  root = tmp_path_factory.mktemp('codec')
  cfg = codec_fixture.codec_config(root)
  workdir = str(root / 'workdir')
  codec_fixture.write_codec_workdir(cfg, workdir, seed=3)
  return cfg, workdir


def test_pack_round_trips_and_matches_a_naive_bit_string():
  rng = np.random.default_rng(0)
  for k in (2, 32, 256, 4096, 1000):
    codes = rng.integers(0, k, (7, 3))
    data = codes_file.pack(codes, k)
    b = codes_file.bits_per_code(k)
    naive = ''.join(format(int(c), f'0{b}b') for c in codes.reshape(-1))
    naive += '0' * (-len(naive) % 8)
    assert data == bytes(int(naive[i:i + 8], 2) for i in range(0, len(naive), 8))
    np.testing.assert_array_equal(codes_file.unpack(data, 7, 3, k), codes)
  assert codes_file.bits_per_code(4096) == 12 and codes_file.bits_per_code(1000) == 10
  with pytest.raises(ValueError, match=r'in \[0, 32\)'):
    codes_file.pack(np.array([[32]]), 32)


def test_codes_file_round_trips_and_rejects_another_codec(tmp_path):
  codes = np.random.default_rng(1).integers(0, 256, (440, 4)).astype(np.int32)
  header = codes_file.make_header(config_hash='aaaa', codebook_hash='bbbb', variant='codec',
                                  sample_rate=22050, num_samples=80000, chunk_samples=44000,
                                  codes=codes, codebook_size=256)
  path = str(tmp_path / 'x.rqc')
  size = codes_file.write(path, header, codes)
  assert size == os.path.getsize(path)
  head_len = int.from_bytes(open(path, 'rb').read()[4:8], 'little')
  assert size == 8 + head_len + 440 * 4                 # 8 bits per code, no padding
  got_header, got = codes_file.read(path)
  assert got_header == json.loads(json.dumps(header))
  np.testing.assert_array_equal(got, codes)
  codes_file.check_compatible(got_header, 'aaaa', 'bbbb')
  with pytest.raises(ValueError, match='another model config'):
    codes_file.check_compatible(got_header, 'cccc', 'bbbb')
  with pytest.raises(ValueError, match='other codebooks'):
    codes_file.check_compatible(got_header, 'aaaa', 'dddd')
  # 440 frames per 2 x 44000 samples at 22050 Hz = 110.25 frames/s, x 4 x 8 bits
  assert codes_file.bitrate(got_header) == pytest.approx(110.25 * 32)
  (tmp_path / 'bad.rqc').write_bytes(b'RIFF0000')
  with pytest.raises(ValueError, match='not an rqvae-jax codes file'):
    codes_file.read(str(tmp_path / 'bad.rqc'))


def test_log_mel_distance_is_zero_for_a_copy_and_6_db_for_half_the_amplitude():
  rng = np.random.default_rng(6)
  x = (0.1 * rng.standard_normal(22050)).astype(np.float32)
  assert codec_lib.log_mel_distance_db(x, x, 22050) == pytest.approx(0.0, abs=1e-6)
  assert codec_lib.log_mel_distance_db(x, 0.5 * x, 22050) == pytest.approx(
      20 * np.log10(2), abs=1e-3)
  # Phase-blind: another draw of the same white noise (a waveform correlation of ~0) is
  # close; silence is as far as the floor allows (80 dB below the loudest cell).
  other = (0.1 * rng.standard_normal(22050)).astype(np.float32)
  assert 0.5 < codec_lib.log_mel_distance_db(x, other, 22050) < 6
  assert 60 < codec_lib.log_mel_distance_db(x, np.zeros_like(x), 22050) <= 80


def test_paper_bitrate_is_about_15_9_kbit():
  from configs.rqvae import get_config
  cfg = get_config('paper')
  cfg.inference.chunk_samples = 88200
  assert codec_lib.bitrate(cfg) == pytest.approx(110.25 * 12 * 12)     # 15876 bit/s
  assert codec_lib.bitrate(get_config('codec')) == pytest.approx(110.25 * 4 * 8)


def test_a_spectrum_head_codec_decodes_what_its_forward_gives(tmp_path):
  """The codec variant's head: magnitudes from the codes, Griffin-Lim phase in both paths."""
  cfg = codec_fixture.codec_config(tmp_path)
  cfg.model.kernels, cfg.model.strides = (3, 7, 6), (1, 5, 4)     # hop 20: 400 = 20 frames
  cfg.model.output_head, cfg.model.mask_fft, cfg.model.griffin_lim_iters = 'spectrum', 80, 4
  workdir = str(tmp_path / 'workdir')
  codec_fixture.write_codec_workdir(cfg, workdir, seed=4)
  codec = codec_lib.Codec.from_workdir(workdir, 'latest')
  audio = (0.1 * np.random.default_rng(5).standard_normal(900)).astype(np.float32)
  codes = codec.encode(audio)
  assert codec.frames_per_chunk == 20 and codes.shape == (3 * 20, 3)
  decoded, forward = codec.decode(codes, len(audio)), codec.forward(audio)
  assert decoded.shape == forward.shape == (900, 4) and np.abs(forward).max() > 0
  np.testing.assert_allclose(decoded, forward, atol=1e-5 * np.abs(forward).max())


def test_codec_refuses_a_model_with_skips_or_the_mask_head():
  from configs.rqvae import get_config
  with pytest.raises(ValueError, match='mask head'):
    codec_lib.check_codec_config(get_config('demo'))
  with pytest.raises(ValueError, match='skip connections'):
    codec_lib.check_codec_config(get_config('paper'))
  codec_lib.check_codec_config(get_config('codec'))


def test_encode_decode_equals_the_forward_pass_and_the_cli_round_trips(codec_workdir, tmp_path):
  cfg, workdir = codec_workdir
  codec = codec_lib.Codec.from_workdir(workdir, 'latest')
  rng = np.random.default_rng(2)
  audio = (0.1 * rng.standard_normal(1100)).astype(np.float32)    # 2.75 chunks of 400
  codes = codec.encode(audio)
  assert codec.frames_per_chunk == 16
  assert codes.shape == (3 * 16, 3) and codes.dtype == np.int32
  decoded = codec.decode(codes, len(audio))
  forward = codec.forward(audio)
  assert decoded.shape == forward.shape == (1100, 4)
  np.testing.assert_allclose(decoded, forward, atol=1e-5 * np.abs(forward).max())

  song = str(tmp_path / 'song.wav')
  sf.write(song, audio, cfg.data.sample_rate, subtype='FLOAT')
  rqc, out = str(tmp_path / 'song.rqc'), str(tmp_path / 'stems')
  assert codec_lib.main(['encode', '--workdir', workdir, '--checkpoint', 'latest', song, rqc]) == 0
  header, file_codes = codec.read(rqc)
  np.testing.assert_array_equal(file_codes, codes)
  assert header['num_samples'] == 1100 and header['num_quantizers'] == 3
  assert codec_lib.main(['decode', '--workdir', workdir, '--checkpoint', 'latest', rqc, out]) == 0
  for i, name in enumerate(cfg.data.stems):
    wav, rate = sf.read(os.path.join(out, f'{name}.wav'), dtype='float32')
    assert rate == cfg.data.sample_rate
    np.testing.assert_allclose(wav, np.clip(decoded[:, i], -1, 1), atol=1.0 / 32768 + 1e-6)
  assert os.path.exists(os.path.join(out, 'mix.wav'))

  # A file from another codec (other codebooks) is refused with a clear error.
  other = codec_lib.Codec(cfg, jax.tree_util.tree_map(lambda x: x + 1.0, codec.variables))
  with pytest.raises(ValueError, match='other codebooks'):
    other.read(rqc)
