"""Codec mode: a trained RQ-VAE without skips as an audio codec (mixture -> codes -> stems).

  python -m rqvae_jax.codec encode --workdir DIR song.wav out.rqc
  python -m rqvae_jax.codec decode --workdir DIR out.rqc stems/

The workdir must hold a waveform-head model with `model.skip_connections=False` (the
`codec` variant of configs/rqvae.py): then the codes are the whole representation, and
decoding them gives exactly the model's forward pass. (With skips the decoder also reads the
encoder's block outputs, which codes do not carry; the mask head masks the mixture's STFT.)

Audio is cut into non-overlapping chunks of `inference.chunk_samples` (the last one
zero-padded), each encoded alone, so chunk i's codes decode chunk i alone; the codes file
(rqvae_jax/codes_file.py) stores them with the codec's hashes. `decode` writes the four stems
and their sum (mix.wav) at the model's rate.
"""
import argparse
import functools
import json
import math
import os
import sys
import time
from typing import Dict, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rqvae_jax import checkpoints as ckpt_lib
from rqvae_jax import cli
from rqvae_jax import codes_file
from rqvae_jax.model import (RQVAE, is_valid_length, latent_length, output_head,
                             with_inference_tables)


def check_codec_config(config: ml_collections.ConfigDict) -> None:
  """A codec decodes codes alone: no mask head (it needs the mixture) and no skips; the error
  says which variant to train instead."""
  if output_head(config.model) == 'mask':
    raise ValueError('This workdir\'s model has the mask head (model.output_head=\'mask\'): it '
                     'masks the mixture\'s spectrogram, so its codes cannot be decoded alone. '
                     'Train a codec: python train.py --config configs/rqvae.py:codec --workdir DIR.')
  if config.model.skip_connections:
    raise ValueError('This workdir\'s model has skip connections (model.skip_connections=True): '
                     'its decoder also reads the encoder\'s block outputs, which codes do not '
                     'carry. Train a codec: python train.py --config configs/rqvae.py:codec '
                     '--workdir DIR (or --config.model.skip_connections=False).')


def frames_per_second(config: ml_collections.ConfigDict) -> float:
  chunk = int(config.inference.chunk_samples)
  return latent_length(chunk, config.model) * config.data.sample_rate / chunk


def bitrate(config: ml_collections.ConfigDict) -> float:
  """Bits per second: frames/s x Q x log2 K (paper: 110.25 x 12 x 12 = 15876)."""
  q = config.model.quantizer
  return frames_per_second(config) * q.num_quantizers * codes_file.bits_per_code(q.codebook_size)


class Codec:
  """A restored codec-mode RQ-VAE: `encode` (N,) -> (T, Q), `decode` (T, Q) -> (N, S)."""

  def __init__(self, config: ml_collections.ConfigDict, variables: Dict, step: int = 0):
    check_codec_config(config)
    self.config, self.step = config, step
    self.variables = with_inference_tables(variables, config.inference)
    self.chunk = int(config.inference.chunk_samples)
    if not is_valid_length(self.chunk, config.model):
      raise ValueError(f'inference.chunk_samples={self.chunk} is not a valid model length.')
    self.frames_per_chunk = latent_length(self.chunk, config.model)
    self.batch = int(config.inference.batch_size)
    self._encode, self._decode, self._forward = _model_functions(config.model.to_json())
    self.config_hash = codes_file.model_hash(config.model)
    self.codebook_hash = codes_file.codebook_hash(variables['params']['quantizer']['codebooks'])

  @classmethod
  def from_workdir(cls, workdir: str, checkpoint: Union[str, int] = 'best') -> 'Codec':
    from rqvae_jax import train_state   # pylint: disable=g-import-not-at-top
    config = ckpt_lib.load_config(workdir)
    check_codec_config(config)       # before the restore: a wrong workdir fails at once
    state, step = train_state.restore_train_state(workdir, config, checkpoint)
    return cls(config, state.inference_variables(config.inference), step)

  def _chunks(self, audio: np.ndarray) -> np.ndarray:
    n = len(audio)
    count = max(1, math.ceil(n / self.chunk))
    padded = np.zeros(count * self.chunk, np.float32)
    padded[:n] = audio
    return padded.reshape(count, self.chunk)

  def _batched(self, fn, rows: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(rows), self.batch):
      part = rows[i:i + self.batch]
      fill = self.batch - len(part)      # a fixed batch shape: one compilation
      full = np.concatenate([part, np.zeros((fill,) + part.shape[1:], part.dtype)])
      out.append(np.asarray(fn(self.variables, jnp.asarray(full)))[:len(part)])
    return np.concatenate(out)

  def encode(self, audio: np.ndarray) -> np.ndarray:
    """Mono (N,) at the model's rate -> codes (num_chunks x frames per chunk, Q) int32."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1 or not np.all(np.isfinite(audio)):
      raise ValueError(f'encode expects finite mono audio (N,), got shape {audio.shape}.')
    codes = self._batched(self._encode, self._chunks(audio))
    return codes.reshape(-1, codes.shape[-1]).astype(np.int32)

  def decode(self, codes: np.ndarray, num_samples: Optional[int] = None) -> np.ndarray:
    """Codes (T, Q) (T a multiple of the frames per chunk) -> stems (N, S), trimmed."""
    codes = np.asarray(codes, np.int32)
    q = self.config.model.quantizer
    if codes.ndim != 2 or codes.shape[1] != q.num_quantizers or (
        codes.shape[0] % self.frames_per_chunk):
      raise ValueError(f'decode expects codes (k x {self.frames_per_chunk}, '
                       f'{q.num_quantizers}), got {codes.shape}.')
    rows = codes.reshape(-1, self.frames_per_chunk, q.num_quantizers)
    stems = self._batched(self._decode, rows).reshape(-1, self.config.model.num_stems)
    return stems[:num_samples] if num_samples is not None else stems

  def forward(self, audio: np.ndarray) -> np.ndarray:
    """The model's forward pass (eval mode) chunk by chunk: what encode -> decode equals."""
    stems = self._batched(self._forward, self._chunks(np.asarray(audio, np.float32)))
    return stems.reshape(-1, stems.shape[-1])[:len(audio)]

  def header(self, codes: np.ndarray, num_samples: int) -> Dict:
    return codes_file.make_header(
        config_hash=self.config_hash, codebook_hash=self.codebook_hash,
        variant=self.config.get('variant', ''), sample_rate=self.config.data.sample_rate,
        num_samples=num_samples, chunk_samples=self.chunk, codes=codes,
        codebook_size=self.config.model.quantizer.codebook_size)

  def read(self, path: str):
    """(header, codes) of a codes file made by this codec; a clear error otherwise."""
    header, codes = codes_file.read(path)
    codes_file.check_compatible(header, self.config_hash, self.codebook_hash, path)
    return header, codes


@functools.lru_cache(maxsize=4)
def _model_functions(model_json: str):
  """Jitted encode, decode and forward of one model config, shared by the Codec instances
  of a process (compiled once)."""
  model = RQVAE(ml_collections.ConfigDict(json.loads(model_json)))
  return (jax.jit(lambda v, x: model.apply(v, x, method=RQVAE.encode)),
          jax.jit(lambda v, c: model.apply(v, c, method=RQVAE.decode)),
          jax.jit(lambda v, x: model.apply(v, x, train=False)[0]))


def sisdr_db(reference: np.ndarray, estimate: np.ndarray, eps: float = 1e-8) -> float:
  """Scale-invariant SDR of one signal (the metrics module's formula, in NumPy)."""
  ref, est = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
  a = (np.dot(est, ref) + eps) / (np.dot(ref, ref) + eps)
  target = a * ref
  return float(10 * np.log10((np.sum(target ** 2) + eps) / (np.sum((target - est) ** 2) + eps)))


def log_mel_distance_db(reference: np.ndarray, estimate: np.ndarray, sample_rate: int,
                        floor_db: float = -80.0) -> float:
  """Mean |difference| (dB) of two signals' mel power spectrograms (1024-point, hop 256, 64
  bands), both floored at `floor_db` below the reference's loudest cell.

  Why beside SI-SDR: a codec whose phase is Griffin-Lim's (the spectrum head) can sound right
  with an SI-SDR far below 0 dB, because SI-SDR compares waveforms sample by sample. This
  compares what is heard: how much energy each band has in each frame. 0 for a copy, 6.02
  for a copy at half the amplitude.
  """
  import librosa  # pylint: disable=g-import-not-at-top
  mel = [librosa.feature.melspectrogram(y=np.asarray(x, np.float32), sr=sample_rate,
                                        n_fft=1024, hop_length=256, n_mels=64)
         for x in (reference, estimate)]
  floor = np.max(mel[0]) * 10 ** (floor_db / 10) + 1e-20
  ref_db, est_db = (10 * np.log10(np.maximum(m, floor)) for m in mel)
  return float(np.mean(np.abs(ref_db - est_db)))


def _encode_cmd(args) -> int:
  from rqvae_jax import audio as audio_lib   # pylint: disable=g-import-not-at-top
  codec = Codec.from_workdir(args.workdir, args.checkpoint)
  mixture, _ = audio_lib.load_audio(args.input, codec.config.data.sample_rate)
  t = time.time()
  codes = codec.encode(mixture)
  size = codes_file.write(args.output, codec.header(codes, len(mixture)), codes)
  seconds = len(mixture) / codec.config.data.sample_rate
  recon = codec.decode(codes, len(mixture)).sum(-1)
  print(f'{args.output}: {codes.shape[0]} frames x {codes.shape[1]} codes, {size} bytes for '
        f'{seconds:.2f} s ({8 * size / seconds / 1000:.2f} kbit/s with the header; the codec: '
        f'{bitrate(codec.config) / 1000:.2f} kbit/s = {frames_per_second(codec.config):.2f} '
        f'frames/s x {codes.shape[1]} x {codes_file.bits_per_code(codec.config.model.quantizer.codebook_size)} '
        f'bits) in {time.time() - t:.1f} s')
  print(f'reconstruction SI-SDR of the mixture (sum of the decoded stems vs the input): '
        f'{sisdr_db(mixture, recon):.2f} dB')
  return 0


def _decode_cmd(args) -> int:
  from rqvae_jax import audio as audio_lib   # pylint: disable=g-import-not-at-top
  codec = Codec.from_workdir(args.workdir, args.checkpoint)
  header, codes = codec.read(args.input)
  out = cli.check_output_dir(args.out)
  stems = codec.decode(codes, header['num_samples'])
  rate = header['sample_rate']
  names = list(codec.config.data.stems)
  for i, name in enumerate(names):
    audio_lib.save_audio(os.path.join(out, f'{name}.wav'), stems[:, i], rate)
  audio_lib.save_audio(os.path.join(out, 'mix.wav'), stems.sum(-1), rate)
  print(f'{out}: {", ".join(names)}, mix (.wav, {header["num_samples"] / rate:.2f} s at '
        f'{rate} Hz) from {codes_file.bitrate(header) / 1000:.2f} kbit/s of codes')
  if args.reference:
    ref, _ = audio_lib.load_audio(args.reference, rate)
    n = min(len(ref), len(stems))
    print(f'reconstruction SI-SDR of the mixture vs {args.reference}: '
          f'{sisdr_db(ref[:n], stems[:n].sum(-1)):.2f} dB')
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m rqvae_jax.codec', description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  for name, helps in (('encode', ('audio file to encode', 'codes file to write (.rqc)')),
                      ('decode', ('codes file to decode', 'folder for the stems and mix.wav'))):
    s = sub.add_parser(name)
    s.add_argument('--workdir', required=True, help='a trained codec-mode workdir')
    s.add_argument('--checkpoint', default='best', help="'best', 'latest' or a step")
    s.add_argument('input', help=helps[0])
    s.add_argument('output' if name == 'encode' else 'out', help=helps[1])
    s.add_argument('--verbose', action='store_true', help='tracebacks with errors')
    if name == 'decode':
      s.add_argument('--reference', default='', help='the original audio, to report the '
                     'reconstruction SI-SDR of the mix')
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(cli.argparse_argv(sys.argv[1:] if argv is None else argv))
  fn = _encode_cmd if args.command == 'encode' else _decode_cmd
  return cli.run_guarded(lambda: fn(args), args.verbose)


if __name__ == '__main__':
  sys.exit(main())
