"""Pictures for TensorBoard: log-magnitude spectrograms as RGB images (NumPy only)."""
import numpy as np


def _colormap(v: np.ndarray) -> np.ndarray:
  """[0, 1] -> RGB uint8 on a dark-blue -> yellow ramp (readable without matplotlib)."""
  stops = np.array([[0.05, 0.03, 0.25], [0.25, 0.2, 0.6], [0.1, 0.6, 0.55], [0.95, 0.9, 0.15]])
  x = np.clip(v, 0, 1) * (len(stops) - 1)
  lo = np.floor(x).astype(int).clip(0, len(stops) - 2)
  frac = (x - lo)[..., None]
  return (255 * ((1 - frac) * stops[lo] + frac * stops[lo + 1])).astype(np.uint8)


def spectrogram_image(audio: np.ndarray, n_fft: int = 1024, hop: int = 256,
                      dynamic_range_db: float = 80.0) -> np.ndarray:
  """Mono audio (N,) -> (n_fft // 2 + 1, frames, 3) uint8, low frequencies at the bottom."""
  audio = np.asarray(audio, np.float32)
  if audio.shape[0] < n_fft:
    audio = np.pad(audio, (0, n_fft - audio.shape[0]))
  frames = 1 + (audio.shape[0] - n_fft) // hop
  idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
  spec = np.abs(np.fft.rfft(audio[idx] * np.hanning(n_fft), axis=-1)).T
  db = 20 * np.log10(spec + 1e-8)
  db = (db - db.max() + dynamic_range_db) / dynamic_range_db
  return _colormap(db[::-1])


def stems_image(stems: np.ndarray, **kwargs) -> np.ndarray:
  """(N, S) -> spectrograms of the stems stacked vertically, separated by a white line."""
  rows = []
  for s in range(stems.shape[-1]):
    rows.append(spectrogram_image(stems[:, s], **kwargs))
    rows.append(np.full((2,) + rows[-1].shape[1:], 255, np.uint8))
  return np.concatenate(rows[:-1], axis=0)
