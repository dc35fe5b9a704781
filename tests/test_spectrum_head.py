"""The spectrum output head (codec mode): Griffin-Lim against librosa, the mixture's phase in
training and Griffin-Lim's otherwise, and the config rule that it runs without skips."""
import flax.linen as nn
import jax
import librosa
import numpy as np
import pytest

from configs.rqvae import get_config
from rqvae_jax import mask_head, spectrum_head
from rqvae_jax.model import RQVAE, is_valid_length, output_head
from tests.conftest import SMALL_GRAPH

N_FFT, HOP = 800, 200


def _tones(frames: int = 60) -> np.ndarray:
  t = np.arange(HOP * frames) / 22050
  x = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 660 * t) * np.exp(-3 * t)
       + 0.1 * np.sin(2 * np.pi * (300 + 400 * t) * t))
  return (x + 0.02 * np.random.default_rng(0).standard_normal(len(x))).astype(np.float32)


def _convergence(signal, magnitude) -> float:
  rebuilt = np.abs(np.asarray(mask_head.stft(np.asarray(signal)[None], N_FFT, HOP)))
  return float(np.linalg.norm(rebuilt - magnitude) / np.linalg.norm(magnitude))


def test_griffin_lim_recovers_a_consistent_magnitude_as_well_as_librosa():
  x = _tones()
  magnitude = np.abs(np.asarray(mask_head.stft(x[None], N_FFT, HOP)))
  start = _convergence(spectrum_head.griffin_lim(magnitude, N_FFT, HOP, 0)[0], magnitude)
  ours = _convergence(spectrum_head.griffin_lim(magnitude, N_FFT, HOP, 32)[0], magnitude)
  # librosa's fast Griffin-Lim (same momentum), on its own centred Hann framing.
  ref_mag = np.abs(librosa.stft(x, n_fft=N_FFT, hop_length=HOP, window='hann'))
  ref = librosa.griffinlim(ref_mag, n_iter=32, hop_length=HOP, n_fft=N_FFT, window='hann',
                           length=len(x), random_state=0)
  ref_rebuilt = np.abs(librosa.stft(ref, n_fft=N_FFT, hop_length=HOP, window='hann'))
  librosa_convergence = np.linalg.norm(ref_rebuilt - ref_mag) / np.linalg.norm(ref_mag)
  assert start > 0.5                    # random phase: far from consistent
  assert ours < start / 4 and ours < 0.15
  assert ours < 1.5 * librosa_convergence
  # Deterministic: the same magnitude gives the same waveform.
  a = spectrum_head.griffin_lim(magnitude, N_FFT, HOP, 4)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(
      spectrum_head.griffin_lim(magnitude, N_FFT, HOP, 4)))


def _spectrum_model():
  config = get_config('smoke')
  for key, value in SMALL_GRAPH.items():       # three conv blocks, one LSTM layer
    section, field = key.split('.')
    config[section][field] = value
  config.model.kernels, config.model.strides = (3, 7, 6), (1, 5, 4)    # an even hop, 20
  config.model.output_head = 'spectrum'
  config.model.skip_connections = False
  config.model.mask_fft = 4 * int(np.prod(config.model.strides))
  config.model.griffin_lim_iters = 4
  config.model.dropout = 0.0
  return config


def test_training_takes_the_mixtures_phase_and_evaluation_griffin_lims():
  config = _spectrum_model()
  hop = int(np.prod(config.model.strides))
  n = 80 * hop
  assert is_valid_length(n, config.model) and not is_valid_length(n + hop // 2, config.model)
  mixture = 0.3 * np.random.default_rng(1).standard_normal((2, n)).astype(np.float32)
  model = RQVAE(config.model)
  variables = model.init({'params': jax.random.PRNGKey(0)}, mixture, train=False)
  (train_stems, _), state = model.apply(
      variables, mixture, train=True, mutable=['batch_stats', 'codebook_stats', 'intermediates'],
      capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Dense)
      and mdl.name == 'log_magnitude')
  log_mag = state['intermediates']['decoder']['log_magnitude']['__call__'][0]   # (B, T, S*F)
  bins = config.model.mask_fft // 2 + 1
  magnitude = np.exp(np.asarray(log_mag).reshape(2, -1, 4, bins))
  spec = np.asarray(mask_head.stft(mixture, config.model.mask_fft, hop))
  unit = spec / (np.abs(spec) + 1e-8)
  for s in range(4):
    expected = np.asarray(mask_head.istft(magnitude[:, :, s] * unit, config.model.mask_fft, hop))
    expected = expected * config.model.norm_scale + config.model.norm_offset
    np.testing.assert_allclose(np.asarray(train_stems)[..., s], expected, rtol=1e-4, atol=1e-6)
  # Without a mixture to lend its phase (evaluation, decode), Griffin-Lim's phase: the
  # evaluation forward equals decoding the codes, and differs from the training output.
  eval_stems, aux = model.apply(variables, mixture, train=False)
  decoded = model.apply(variables, aux['codes'], method=RQVAE.decode)
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(eval_stems), atol=1e-6)
  assert np.abs(np.asarray(eval_stems) - np.asarray(train_stems)).max() > 1e-4


def test_spectrum_head_requires_skips_off():
  config = _spectrum_model()
  assert output_head(config.model) == 'spectrum'
  config.model.skip_connections = True
  with pytest.raises(ValueError, match='skip_connections=False'):
    output_head(config.model)
  codec = get_config('codec')
  assert output_head(codec.model) == 'spectrum' and not codec.model.skip_connections
