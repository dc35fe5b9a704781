"""The RQ-VAE separator: Encoder -> ResidualVQ -> Decoder, with encoder-to-decoder skips.

Public API (README: Library):
  model = RQVAE(config.model)
  variables = model.init({'params': rng, 'dropout': rng}, mixture, train=False)
  stems, aux = model.apply(variables, mixture, train=True, rngs={'dropout': rng},
                           mutable=['batch_stats', 'codebook_stats'])
  codes = model.apply(variables, mixture, method=RQVAE.encode)
  stems = model.apply(variables, codes, method=RQVAE.decode)

`mixture` is raw mono audio (B, N) or (B, N, 1) in [-1, 1]; `stems` (B, N, S) on the same
scale. Internally each stem is normalised as (stem - norm_offset) / norm_scale (the original's
z-score of int16-scale audio), so the mixture enters as (mix - S * offset) / scale.
"""
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rqvae_jax import blocks
from rqvae_jax import bottleneck
from rqvae_jax import lstm as lstm_lib
from rqvae_jax import mask_head
from rqvae_jax import native
from rqvae_jax import quantizer as quantizer_lib
from rqvae_jax.lstm import BiLSTM
from rqvae_jax.mask_head import MaskDecoder
from rqvae_jax.quantizer import ResidualVQ
from rqvae_jax.spectrum_head import SpectrumDecoder


def with_inference_tables(variables: Dict[str, Any], inference) -> Dict[str, Any]:
  """`variables` plus read-only copies of weights in the layouts the CPU kernels want, built
  once instead of in every forward pass (for inference only: training would leave them
  stale), where the CPU kernels run: the residual VQ's stages (`quantizer.stage_tables`,
  collection `vq_search`, with the screened search's bfloat16 table where
  `inference.vq_search` picks that search) and each BiLSTM's layers (`lstm.prepared_layers`,
  collection `lstm_prepared`). The outputs are those of `variables` alone
  (tests/test_native.py, tests/test_eval_separate.py)."""
  out = dict(variables)
  params = variables.get('params', {})
  if 'quantizer' in params:
    screened = quantizer_lib.use_screened_search(inference.vq_search)   # checks the value too
    if native.usable():
      stages = quantizer_lib.stage_tables(params['quantizer']['codebooks'], screened)
      out[quantizer_lib.SEARCH] = {'quantizer': {'stages': stages}}
  if native.usable():
    prepared = _prepared_lstms(params)
    if prepared:
      out[lstm_lib.PREPARED] = prepared
  return out


def _prepared_lstms(tree: Dict[str, Any]) -> Dict[str, Any]:
  """`lstm.prepared_layers` of every BiLSTM in a params tree (a dict with `weight_ih_l0`),
  at the same path."""
  out = {}
  for name, sub in tree.items():
    if not isinstance(sub, dict):
      continue
    if 'weight_ih_l0' in sub:
      layers = sum(1 for key in sub if re.fullmatch(r'weight_ih_l\d+', key))
      out[name] = lstm_lib.prepared_layers(sub, layers)
    else:
      found = _prepared_lstms(sub)
      if found:
        out[name] = found
  return out


def normalize(audio, model_config):
  """Raw stems -> the model's scale (the losses are computed on this scale)."""
  return (audio - model_config.norm_offset) / model_config.norm_scale


def denormalize(audio, model_config):
  return audio * model_config.norm_scale + model_config.norm_offset


SPECTRAL_HEADS = ('mask', 'spectrum')      # heads that work on STFT frames = latent frames


def latent_length(num_samples: int, model_config) -> int:
  """Number of latent frames for `num_samples` input samples (441 for 4 s in the paper)."""
  length = num_samples
  for k, s in zip(model_config.kernels, model_config.strides):
    length = blocks.conv_out_length(length, k, s, model_config.padding)
  return length


def is_valid_length(num_samples: int, model_config) -> bool:
  """True when the conv stack maps `num_samples` to frames and back to exactly that length."""
  lengths = [num_samples]
  for k, s in zip(model_config.kernels, model_config.strides):
    nxt = blocks.conv_out_length(lengths[-1], k, s, model_config.padding)
    if nxt < 1:
      return False
    lengths.append(nxt)
  for (k, s), target in zip(reversed(list(zip(model_config.kernels, model_config.strides))),
                            reversed(lengths[:-1])):
    if blocks.conv_transpose_out_length(lengths[-1], k, s, model_config.padding) != target:
      return False
    lengths.append(target)
  if output_head(model_config) in SPECTRAL_HEADS:   # STFT frames must coincide with latent frames
    hop = mask_head.hop_length(model_config)
    return num_samples % hop == 0 and lengths[len(model_config.kernels)] == num_samples // hop
  return True


def output_head(model_config) -> str:
  """'waveform' (the paper's transposed-conv decoder), 'mask' (rqvae_jax.mask_head) or
  'spectrum' (rqvae_jax.spectrum_head: codes alone -> magnitudes, for codec mode)."""
  head = model_config.get('output_head', 'waveform')
  if head not in ('waveform', 'mask', 'spectrum'):
    raise ValueError(f"model.output_head must be 'waveform', 'mask' or 'spectrum', got {head!r}.")
  if head == 'spectrum' and model_config.get('skip_connections', True):
    raise ValueError("model.output_head='spectrum' decodes the codes alone (codec mode) and has "
                     "no skip input: set model.skip_connections=False (configs/rqvae.py:codec).")
  return head


def next_valid_length(num_samples: int, model_config) -> int:
  """Smallest length >= num_samples that the model maps back to itself (pad to it)."""
  n = max(int(num_samples), 1)
  while not is_valid_length(n, model_config):
    n += 1
  return n


def check_mixture(mixture, model_config) -> None:
  """Raises a ValueError naming the expected shape and the fix; runs on the shapes at trace
  time, and on the values too when the input is concrete (NaN/inf cannot be checked in jit)."""
  shape = tuple(mixture.shape)
  if len(shape) == 3 and shape[-1] != model_config.in_channels:
    raise ValueError(
        f'RQVAE expects a mono mixture (B, N) or (B, N, {model_config.in_channels}); got {shape} '
        f'with {shape[-1]} channels. Downmix to mono first (rqvae_jax.audio.load_audio does).')
  if len(shape) not in (2, 3):
    raise ValueError(f'RQVAE expects a mixture shaped (B, N) or (B, N, 1); got rank {len(shape)} '
                     f'shape {shape}. Add a batch axis for a single clip: x[None].')
  n = shape[1]
  if not is_valid_length(n, model_config):
    raise ValueError(
        f'Length {n} does not map back to itself through the conv stack (kernels '
        f'{tuple(model_config.kernels)}, strides {tuple(model_config.strides)}); pad the input '
        f'to {next_valid_length(n, model_config)} samples (rqvae_jax.model.next_valid_length).')
  if not isinstance(mixture, jax.core.Tracer):
    values = np.asarray(mixture)
    if not np.all(np.isfinite(values)):
      raise ValueError(f'The mixture contains {int(np.sum(~np.isfinite(values)))} NaN/inf '
                       'samples; clean or replace them (e.g. np.nan_to_num) before separating.')


def _conv_block(c, channels: int, kernel: int, stride: int, *, transposed: bool,
                leading_norm: bool, name: str) -> blocks.ConvBlock:
  return blocks.ConvBlock(channels, kernel, stride, c.padding, transposed=transposed,
                          leading_norm=leading_norm, dropout=c.dropout, prelu_init=c.prelu_init,
                          bn_momentum=c.bn_momentum, bn_epsilon=c.bn_epsilon,
                          dtype=jnp.dtype(c.dtype), conv_impl=c.get('conv_impl', 'matmul'),
                          name=name)


def _mono(mixture):
  return mixture[..., 0] if mixture.ndim == 3 else mixture


class Encoder(nn.Module):
  """Conv blocks (keeping each block's output for the skips), then BiLSTM and a dense."""
  config: Any

  @nn.compact
  def __call__(self, x, train: bool) -> Tuple[jax.Array, Sequence[jax.Array]]:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    skips = []
    for i, (ch, k, s) in enumerate(zip(c.channels, c.kernels, c.strides)):
      x = _conv_block(c, ch, k, s, transposed=False, leading_norm=True,
                      name=f'block{i + 1}')(x, train)
      skips.append(x)
    x = BiLSTM(c.channels[-1], c.lstm_layers, c.dropout, c.lstm_impl, dtype, name='lstm')(x, train)
    x = nn.Dense(c.channels[-1], dtype=dtype, name='fc',
                 **blocks.dense_init(x.shape[-1], c.get('torch_init', False)))(x)
    return x, skips


class Decoder(nn.Module):
  """BiLSTM and dense, then transposed-conv blocks mirroring the encoder, adding the skips."""
  config: Any

  @nn.compact
  def __call__(self, z, skips: Optional[Sequence[jax.Array]], train: bool) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    x = BiLSTM(c.channels[-1], c.lstm_layers, c.dropout, c.lstm_impl, dtype, name='lstm')(
        z.astype(dtype), train)
    x = nn.Dense(c.channels[-1], dtype=dtype, name='fc',
                 **blocks.dense_init(x.shape[-1], c.get('torch_init', False)))(x)
    num_blocks = len(c.channels)
    out_channels = list(reversed(c.channels[:-1]))          # 128, 64, 32, 16
    specs = list(reversed(list(zip(c.kernels, c.strides))))  # (4,2), (6,4), (7,5), (7,5), (3,1)
    for i in range(num_blocks - 1):
      if skips is not None:
        x = self._add_skip(x, skips[num_blocks - 1 - i].astype(dtype), f'gate{i + 1}')
      k, s = specs[i]
      x = _conv_block(c, out_channels[i], k, s, transposed=True, leading_norm=(i == 0),
                      name=f'block{i + 1}')(x, train)
    if skips is not None:
      x = self._add_skip(x, skips[0].astype(dtype), f'gate{num_blocks}')
    k, s = specs[-1]
    padding = c.padding
    if c.output_kernel:
      if c.output_kernel % 2 == 0:
        raise ValueError(f'model.output_kernel must be odd (a centred stride-1 layer keeps the '
                         f'length only then), got {c.output_kernel}; use '
                         f'{c.output_kernel + 1}, or 0 to mirror the first encoder kernel.')
      k, padding = c.output_kernel, (c.output_kernel - 1) // 2
    x = blocks.ConvTranspose(c.num_stems, k, s, padding, dtype, c.get('conv_impl', 'matmul'),
                             name='out')(x)
    return x.astype(jnp.float32)

  def _add_skip(self, x, skip, name: str):
    """x + skip ('add', the paper), or x + skip * sigmoid(dense(x)) ('gated').

    With gates, what each skip channel contributes at each time step is decided by the
    decoder's state, which comes from the quantized latent: the skips carry waveform detail
    and the latent decides which of it belongs to the stems (README: Demo).
    """
    if self.config.skip_mode == 'add':
      return x + skip
    if self.config.skip_mode != 'gated':
      raise ValueError(f"model.skip_mode must be 'add' or 'gated', got "
                       f"{self.config.skip_mode!r}.")
    gate = nn.Dense(skip.shape[-1], dtype=x.dtype, name=name)(x)
    return x + skip * nn.sigmoid(gate)


class RQVAE(nn.Module):
  """Mixture (B, N[, 1]) -> stems (B, N, S), plus the bottleneck's aux dict (codes, losses).

  The bottleneck is `model.bottleneck` (rqvae_jax.bottleneck): 'rvq' and 'vq' are the
  ResidualVQ `quantizer` (params/quantizer/codebooks), 'gaussian' the `gaussian` module
  (params/gaussian/{mean,logvar}); encoder and decoder are the same for all three.
  """
  config: Any

  def setup(self):
    c = self.config
    self.encoder = Encoder(c)
    if bottleneck.has_codes(c):
      self.quantizer = ResidualVQ(c.quantizer.num_quantizers, c.quantizer.codebook_size,
                                  c.channels[-1], c.quantizer.usage_decay,
                                  c.quantizer.distance_dtype,
                                  c.quantizer.get('train_search', 'float32'))
    else:
      self.gaussian = bottleneck.GaussianBottleneck(c.channels[-1], c.get('torch_init', False),
                                                    jnp.dtype(c.dtype))
    decoders = {'mask': MaskDecoder, 'spectrum': SpectrumDecoder, 'waveform': Decoder}
    self.decoder = decoders[output_head(c)](c)

  def _decode(self, z, skips, mixture, train: bool):
    """Stems on the raw scale from the decoder's latent input and the skips (or, for the
    mask head, the mixture whose spectrogram is masked; `skips` None = no spectral skip)."""
    head = output_head(self.config)
    if head == 'mask':
      return self.decoder(z, _mono(mixture), skips is not None, train)
    if head == 'spectrum':    # the mixture lends its phase in training only
      return denormalize(self.decoder(z, None if mixture is None else _mono(mixture), train),
                         self.config)
    return denormalize(self.decoder(z, skips, train), self.config)

  def _bottleneck(self, z_e, train: bool):
    """(latent the decoder reads, aux): quantized codes, or a Gaussian sample / its mean."""
    if bottleneck.has_codes(self.config):
      return self.quantizer(z_e, train)
    return self.gaussian(z_e, train)

  def _prepare(self, mixture):
    check_mixture(mixture, self.config)
    if mixture.ndim == 2:
      mixture = mixture[..., None]
    c = self.config
    x = (mixture.astype(jnp.float32) - c.num_stems * c.norm_offset) / c.norm_scale
    return x.astype(jnp.dtype(c.dtype))

  def encode_frames(self, mixture, train: bool = False):
    """Unquantized encoder output z_e (B, T, D) and the skips; k-means runs on z_e."""
    return self.encoder(self._prepare(mixture), train)

  def __call__(self, mixture, train: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    z_e, skips = self.encode_frames(mixture, train)
    z_q, aux = self._bottleneck(z_e, train)
    return self._decode(z_q, skips if self.config.skip_connections else None, mixture,
                        train), aux

  def forward_path(self, mixture, path: str = 'full') -> jax.Array:
    """Stems (eval mode) with one path of the model cut, to see where separation comes from.

    'full': the forward pass; 'unquantized': the encoder's z_e goes to the decoder without
    the quantizer; 'skips_only': the latent is zeroed, only the skips reach the decoder;
    'codes_only': the quantized latent with zero skips (what `decode(codes)` gives). For a
    Gaussian bottleneck the latent is the posterior mean ('codes_only': the mean, zero skips)
    and 'unquantized' does not exist (z_e is not in the decoder's latent space).
    """
    if path == 'unquantized' and not bottleneck.has_codes(self.config):
      raise ValueError("path='unquantized' bypasses a quantizer; a Gaussian-bottleneck model "
                       "has none (its evaluation path already decodes the posterior mean). "
                       "Use 'full', 'skips_only' or 'codes_only'.")
    z_e, skips = self.encode_frames(mixture, False)
    z_q, _ = self._bottleneck(z_e, False)
    use_skips = self.config.skip_connections
    if path == 'full':
      z, s = z_q, skips
    elif path == 'unquantized':
      z, s = z_e, skips
    elif path == 'skips_only':
      z, s = jnp.zeros_like(z_q), skips
    elif path == 'codes_only':   # the mask head's spectral skip is dropped, not zeroed
      z, s = z_q, None if output_head(self.config) == 'mask' else [jnp.zeros_like(x)
                                                                   for x in skips]
    else:
      raise ValueError(f"path must be 'full', 'unquantized', 'skips_only' or 'codes_only', "
                       f'got {path!r}.')
    return self._decode(z, s if use_skips and s is not None else None, mixture, False)

  def encode(self, mixture) -> jax.Array:
    """Codes (B, T, Q) int32 of a mixture (eval mode); a Gaussian model has none."""
    bottleneck.require_codes(self.config, 'RQVAE.encode')
    z_e, _ = self.encode_frames(mixture, False)
    return self.quantizer(z_e, False)[1]['codes']

  def decode(self, codes, skips: Optional[Sequence[jax.Array]] = None) -> jax.Array:
    """Stems from codes (eval mode).

    With skip connections on (the paper's model) the decoder also adds the encoder's block
    outputs; codes alone do not carry them, so `skips=None` decodes with zero skips: that is
    the quantized path's contribution only, not the full separation (pass the skips from
    `encode_frames` to reproduce `__call__`). With skips off, codes are the whole story.
    """
    bottleneck.require_codes(self.config, 'RQVAE.decode')
    if output_head(self.config) == 'mask':
      raise ValueError('A mask-head model (model.output_head = \'mask\') masks the mixture\'s '
                       'spectrogram: codes alone cannot be decoded; call the model on the '
                       'mixture, or train a codec (configs/rqvae.py:codec).')
    z_q = self.quantizer.lookup(codes)
    if output_head(self.config) == 'spectrum':
      return self._decode(z_q, None, None, False)
    if self.config.skip_connections and skips is None:
      length = codes.shape[1]
      skips = self._zero_skips(codes.shape[0], length)
    elif not self.config.skip_connections:
      skips = None
    return denormalize(self.decoder(z_q, skips, False), self.config)

  def _zero_skips(self, batch: int, length: int):
    c = self.config
    lengths = [length]
    for k, s in reversed(list(zip(c.kernels, c.strides))[1:]):
      lengths.append(blocks.conv_transpose_out_length(lengths[-1], k, s, c.padding))
    lengths = list(reversed(lengths))                 # block1 .. block5 lengths
    return [jnp.zeros((batch, n, ch), jnp.dtype(c.dtype)) for n, ch in zip(lengths, c.channels)]
