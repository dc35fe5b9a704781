"""The spectral-mask output head: STFT framing against NumPy, exact inversion, stems that sum
to the mixture, lengths aligned with the latent, and the errors it raises."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs.rqvae import get_config
from rqvae_jax import mask_head
from rqvae_jax.model import RQVAE, is_valid_length, latent_length, next_valid_length


def _numpy_stft(x, n_fft, hop):
  pad = (n_fft - hop) // 2
  xp = np.pad(x, (pad, pad))
  window = np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft))
  frames = [xp[t * hop:t * hop + n_fft] * window for t in range(len(x) // hop)]
  return np.fft.rfft(np.stack(frames), axis=-1)


@pytest.mark.parametrize('n_fft,hop', [(800, 200), (400, 100), (16, 4)])
def test_stft_matches_numpy_framing_and_inverts_exactly(n_fft, hop):
  x = np.random.default_rng(0).standard_normal((2, hop * 13)).astype(np.float32)
  spec = np.asarray(mask_head.stft(x, n_fft, hop))
  assert spec.shape == (2, 13, n_fft // 2 + 1)
  np.testing.assert_allclose(spec[1], _numpy_stft(x[1], n_fft, hop), rtol=1e-4, atol=1e-4)
  back = np.asarray(mask_head.istft(spec, n_fft, hop))
  np.testing.assert_allclose(back, x, atol=1e-5)      # edges included


def test_stft_rejects_misaligned_sizes():
  with pytest.raises(ValueError, match='even hop'):
    mask_head.stft(np.zeros((1, 100), np.float32), 100, 25)
  with pytest.raises(ValueError, match='even multiple of the hop'):
    mask_head.stft(np.zeros((1, 800), np.float32), 600, 200)
  with pytest.raises(ValueError, match='multiple of the hop 200'):
    mask_head.stft(np.zeros((1, 850), np.float32), 800, 200)


def _mask_model(skips=True):
  config = get_config('smoke')
  config.model.output_head = 'mask'
  config.model.mask_fft = 4 * int(np.prod(config.model.strides))
  config.model.skip_connections = skips
  return config


@pytest.mark.parametrize('skips', [True, False])
def test_mask_model_stems_sum_to_the_mixture(skips):
  config = _mask_model(skips)
  n = next_valid_length(10000, config.model)
  assert n % 200 == 0 and latent_length(n, config.model) == n // 200
  mixture = 0.3 * np.random.default_rng(1).standard_normal((2, n)).astype(np.float32)
  model = RQVAE(config.model)
  variables = model.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
                         mixture, train=False)
  assert ('spec_in' in variables['params']['decoder']) == skips
  stems, aux = model.apply(variables, mixture, train=False)
  stems = np.asarray(stems)
  assert stems.shape == (2, n, config.model.num_stems)
  np.testing.assert_allclose(stems.sum(-1), mixture, atol=1e-5)
  # Not a trivial split: the untrained masks already differ between stems.
  assert np.std(stems[..., 0] - stems[..., 1]) > 1e-3
  codes_only = np.asarray(model.apply(variables, mixture, 'codes_only',
                                      method=RQVAE.forward_path))
  np.testing.assert_allclose(codes_only.sum(-1), mixture, atol=1e-5)
  if skips:   # without the spectral skip the decoder sees only the codes: a different output
    assert np.abs(codes_only - stems).max() > 1e-4
  with pytest.raises(ValueError, match='codes alone cannot be decoded'):
    model.apply(variables, aux['codes'], method=RQVAE.decode)


def test_mask_head_lengths_must_align_with_frames():
  config = _mask_model()
  assert not is_valid_length(10100, config.model)      # maps back, but not a multiple of 200
  with pytest.raises(ValueError, match="'waveform', 'mask' or 'spectrum'"):
    bad = _mask_model()
    bad.model.output_head = 'spectral'
    is_valid_length(10000, bad.model)


def _init_and_apply(config, mixture):
  model = RQVAE(config.model)
  variables = model.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
                         mixture, train=False)
  return model, variables, np.asarray(model.apply(variables, mixture, train=False)[0])


def test_wider_head_and_per_bin_network_keep_the_mixture_and_start_as_a_no_op():
  """`mask_hidden` widens the decoder (a projection of the latent in); `mask_bin_features`
  adds the per-bin network, whose output layer starts at zero: at initialisation the model
  equals the same weights without it, and training moves it (its gradient is not zero)."""
  config = _mask_model()
  config.model.mask_hidden = 24
  n = next_valid_length(10000, config.model)
  mixture = 0.3 * np.random.default_rng(2).standard_normal((2, n)).astype(np.float32)
  _, plain_vars, plain = _init_and_apply(config, mixture)
  decoder = plain_vars['params']['decoder']
  assert decoder['latent_in']['kernel'].shape == (config.model.channels[-1], 24)
  assert decoder['mask']['kernel'].shape[0] == 24

  config.model.mask_bin_features = 3
  model, variables, stems = _init_and_apply(config, mixture)
  bins = config.model.mask_fft // 2 + 1
  decoder = variables['params']['decoder']
  assert decoder['bin_state']['kernel'].shape == (24, 3 * bins)
  assert decoder['bin_local']['kernel'].shape == (3, 5, 1, 3)
  np.testing.assert_allclose(stems.sum(-1), mixture, atol=1e-5)
  # Same weights for everything else: the zero-initialised per-bin output changes nothing.
  shared = jax.tree_util.tree_map(lambda x: x, variables)
  for name in ('bin_state', 'bin_local', 'bin_out'):
    shared['params']['decoder'].pop(name)
  without = config.copy_and_resolve_references()
  without.model.mask_bin_features = 0
  same = np.asarray(RQVAE(without.model).apply(shared, mixture, train=False)[0])
  np.testing.assert_allclose(stems, same, atol=1e-6)

  def energy_of_first_stem(params):
    out, _ = model.apply({**variables, 'params': params}, mixture, train=False)
    return jax.numpy.sum(out[..., 0] ** 2)

  grads = jax.grad(energy_of_first_stem)(variables['params'])
  assert float(np.abs(grads['decoder']['bin_out']['kernel']).max()) > 0


@pytest.mark.parametrize('dilate_time, reach_frames', [(False, 3), (True, 4)])
def test_per_bin_convolutions_reach_the_dilated_neighbourhood_exactly(dilate_time, reach_frames):
  """`mask_bin_layers` stacks residual 3 x 3 convs dilated 1, 2, ... in frequency after the
  3 x 5 local conv: a change of the mixture's log-magnitude at one (frame, bin) moves the
  per-bin logits exactly within bins +-(2 + 1 + 2) for two layers and frames +-(1 + 1 + 1),
  or +-(1 + 1 + 2) with `mask_bin_dilate_time`, and nowhere else (the frame state is held
  fixed)."""
  config = _mask_model()
  config.model.mask_bin_features = 3
  config.model.mask_bin_layers = 2
  config.model.mask_bin_dilate_time = dilate_time
  frames, bins, hidden = 12, 40, 8

  class PerBin(nn.Module):
    @nn.compact
    def __call__(self, x, logmag):
      return mask_head.per_bin_logits(config.model, x, logmag, bins, np.float32)

  net = PerBin()
  rng = np.random.default_rng(3)
  x = rng.standard_normal((1, frames, hidden)).astype(np.float32)
  logmag = rng.standard_normal((1, frames, bins)).astype(np.float32)
  params = net.init(jax.random.PRNGKey(0), x, logmag)['params']
  assert params['bin_conv0']['kernel'].shape == (3, 3, 3, 3)
  assert params['bin_conv1']['kernel'].shape == (3, 3, 3, 3)
  assert 'bin_conv2' not in params
  # The output layer starts at zero (a no-op); give it weights so the logits show the reach.
  params['bin_out']['kernel'] = jax.numpy.asarray(rng.standard_normal((3, 4)), np.float32)
  apply = lambda lm: np.asarray(net.apply({'params': params}, x, lm))
  base = apply(logmag)
  assert base.shape == (1, frames, 4, bins)
  poked = logmag.copy()
  poked[0, 6, 20] += 5.0
  moved = np.abs(apply(poked) - base).max(axis=(0, 2)) > 1e-6      # (frames, bins)
  expected = np.zeros((frames, bins), bool)
  expected[6 - reach_frames:6 + reach_frames + 1, 20 - 5:20 + 6] = True
  np.testing.assert_array_equal(moved, expected)
