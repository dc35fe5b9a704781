"""The `.rqc` codes file of codec mode: a small header and the packed codes.

Layout (all integers little-endian):

  bytes 0-3   magic b'RQC1'
  bytes 4-7   H, uint32: length of the header
  H bytes     the header, UTF-8 JSON (sorted keys):
                format          1
                config_hash     hash of the codec's `model` config section (architecture)
                codebook_hash   hash of the codebooks the codes index (one trained state)
                variant         the codec's config variant (for the error message only)
                sample_rate     the model's rate, Hz
                num_samples     length of the encoded audio at that rate (the decoder trims)
                chunk_samples   the codec's chunk: codes of chunk i decode chunk i alone
                num_frames      T, code frames (num_chunks x frames per chunk)
                num_quantizers  Q
                codebook_size   K
                bits_per_code   b = ceil(log2 K)
  the rest    T x Q codes, frame-major (frame 0's Q codes, then frame 1's...), each b bits,
              most significant bit first, packed into bytes (np.packbits), zero-padded to a byte.

So a file costs T x Q x b / 8 bytes plus the header: the bitrate is frames/s x Q x b.
Two hashes, because codes mean nothing without the very codebooks that made them: a file
from another model config, or from another training run (or checkpoint) of the same config,
is refused with a message saying which (`check_compatible`).
"""
import hashlib
import json
import math
import struct
from typing import Any, Dict, Tuple

import numpy as np

MAGIC = b'RQC1'
FORMAT = 1


def bits_per_code(codebook_size: int) -> int:
  """Bits to store one code of a K-entry codebook (at least 1)."""
  return max(1, int(math.ceil(math.log2(int(codebook_size)))))


def model_hash(model_config) -> str:
  """Hash of the architecture fields: a codec with other layers or codebook sizes differs."""
  as_dict = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  text = json.dumps(as_dict, sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def codebook_hash(codebooks) -> str:
  """Hash of the codebook values (float32 bytes) the codes index."""
  data = np.ascontiguousarray(np.asarray(codebooks, np.float32))
  return hashlib.sha256(data.tobytes()).hexdigest()[:12]


def pack(codes: np.ndarray, codebook_size: int) -> bytes:
  """(T, Q) integer codes in [0, K) -> bytes, b bits per code, frame-major."""
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f'codes must be (frames, quantizers), got shape {codes.shape}.')
  if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
    raise ValueError(f'codes must lie in [0, {codebook_size}), got [{codes.min()}, '
                     f'{codes.max()}].')
  b = bits_per_code(codebook_size)
  shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
  bits = (codes.astype(np.int64).reshape(-1, 1) >> shifts) & 1
  return np.packbits(bits.astype(np.uint8).reshape(-1)).tobytes()


def unpack(data: bytes, num_frames: int, num_quantizers: int, codebook_size: int) -> np.ndarray:
  """Inverse of `pack`: bytes -> (T, Q) int32."""
  b = bits_per_code(codebook_size)
  count = num_frames * num_quantizers * b
  if len(data) * 8 < count:
    raise ValueError(f'The codes file is truncated: {len(data)} bytes of codes, '
                     f'{math.ceil(count / 8)} expected for {num_frames} x {num_quantizers} codes '
                     f'of {b} bits.')
  bits = np.unpackbits(np.frombuffer(data, np.uint8), count=count).reshape(-1, b)
  weights = (1 << np.arange(b - 1, -1, -1, dtype=np.int64))
  return (bits.astype(np.int64) @ weights).astype(np.int32).reshape(num_frames, num_quantizers)


def make_header(*, config_hash: str, codebook_hash: str, variant: str, sample_rate: int,
                num_samples: int, chunk_samples: int, codes: np.ndarray,
                codebook_size: int) -> Dict[str, Any]:
  return {'format': FORMAT, 'config_hash': config_hash, 'codebook_hash': codebook_hash,
          'variant': str(variant), 'sample_rate': int(sample_rate),
          'num_samples': int(num_samples), 'chunk_samples': int(chunk_samples),
          'num_frames': int(codes.shape[0]), 'num_quantizers': int(codes.shape[1]),
          'codebook_size': int(codebook_size), 'bits_per_code': bits_per_code(codebook_size)}


def write(path: str, header: Dict[str, Any], codes: np.ndarray) -> int:
  """Writes header and codes; returns the file's size in bytes."""
  codes = np.asarray(codes)
  if codes.shape != (header['num_frames'], header['num_quantizers']):
    raise ValueError(f'codes shape {codes.shape} does not match the header '
                     f'({header["num_frames"]}, {header["num_quantizers"]}).')
  head = json.dumps(header, sort_keys=True).encode()
  body = pack(codes, header['codebook_size'])
  with open(path, 'wb') as f:
    f.write(MAGIC + struct.pack('<I', len(head)) + head + body)
  return len(MAGIC) + 4 + len(head) + len(body)


def read(path: str) -> Tuple[Dict[str, Any], np.ndarray]:
  """(header, codes (T, Q) int32); a clear error for a file that is not a codes file."""
  with open(path, 'rb') as f:
    data = f.read()
  if data[:4] != MAGIC or len(data) < 8:
    raise ValueError(f'{path} is not an rqvae-jax codes file (no {MAGIC!r} magic): make one '
                     'with `python -m rqvae_jax.codec encode`.')
  (size,) = struct.unpack('<I', data[4:8])
  try:
    header = json.loads(data[8:8 + size].decode())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: the codes file\'s header is damaged ({e}).') from e
  if header.get('format') != FORMAT:
    raise ValueError(f'{path}: codes file format {header.get("format")!r}; this version reads '
                     f'format {FORMAT}.')
  codes = unpack(data[8 + size:], header['num_frames'], header['num_quantizers'],
                 header['codebook_size'])
  return header, codes


def check_compatible(header: Dict[str, Any], config_hash: str, codebooks_hash: str,
                     path: str = 'the codes file') -> None:
  """Raises a ValueError when the file was made by another codec than this one."""
  if header['config_hash'] != config_hash:
    raise ValueError(
        f'{path} was encoded by a codec with another model config (variant '
        f'{header.get("variant")!r}, config hash {header["config_hash"]}; this workdir\'s is '
        f'{config_hash}): decode it with --workdir of the run that encoded it.')
  if header['codebook_hash'] != codebooks_hash:
    raise ValueError(
        f'{path} was encoded with other codebooks (hash {header["codebook_hash"]}; this '
        f'workdir\'s checkpoint has {codebooks_hash}): the same config, but another training '
        'run or checkpoint. Decode it with the workdir and --checkpoint that encoded it.')


def bitrate(header: Dict[str, Any]) -> float:
  """Bits per second of audio: frames/s x Q x bits per code."""
  frames_per_s = header['num_frames'] * header['sample_rate'] / (
      math.ceil(header['num_samples'] / header['chunk_samples']) * header['chunk_samples'])
  return frames_per_s * header['num_quantizers'] * header['bits_per_code']
