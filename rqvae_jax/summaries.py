"""What training shows people: log-magnitude spectrograms as RGB images (NumPy only), and
the metric writer (`metric_writer`: TensorBoard through clu, or the log and a JSON-lines
file where clu cannot run)."""
import json
import logging
import os

from absl import logging as absl_logging
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


def _draw_text(draw, xy, text, fill=(40, 40, 40)):
  draw.text(xy, text, fill=fill)


def curve_png(path: str, series, title: str = '', y_label: str = '', size=(720, 420)) -> None:
  """Writes a line plot of {name: (xs, ys)} to a PNG (Pillow only, no matplotlib).

  Each series gets its own colour and a legend entry; axes carry min/max tick labels. Used
  for the validation SI-SDRi curve that training keeps in the workdir.
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  colours = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
             (140, 86, 75), (227, 119, 194), (127, 127, 127)]
  width, height = size
  left, right, top, bottom = 70, 150, 40, 50
  image = Image.new('RGB', size, (255, 255, 255))
  draw = ImageDraw.Draw(image)
  points = [(float(x), float(y)) for xs, ys in series.values() for x, y in zip(xs, ys)
            if np.isfinite(y)]
  _draw_text(draw, (left, 12), title)
  if not points:
    image.save(path)
    return
  x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
  y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
  if x1 == x0:
    x0, x1 = x0 - 1, x1 + 1
  pad = 0.05 * (y1 - y0 or 1.0)
  y0, y1 = y0 - pad, y1 + pad
  sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
  sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
  draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
  for frac in np.linspace(0, 1, 5):
    yv = y0 + frac * (y1 - y0)
    draw.line([left - 4, sy(yv), left, sy(yv)], fill=(0, 0, 0))
    _draw_text(draw, (8, sy(yv) - 6), f'{yv:.2f}')
    xv = x0 + frac * (x1 - x0)
    draw.line([sx(xv), height - bottom, sx(xv), height - bottom + 4], fill=(0, 0, 0))
    _draw_text(draw, (sx(xv) - 12, height - bottom + 8), f'{xv:.0f}')
  _draw_text(draw, (width // 2 - 20, height - 20), 'step')
  _draw_text(draw, (8, top - 24), y_label)
  for i, (name, (xs, ys)) in enumerate(series.items()):
    colour = colours[i % len(colours)]
    pts = [(sx(float(x)), sy(float(y))) for x, y in zip(xs, ys) if np.isfinite(y)]
    if len(pts) > 1:
      draw.line(pts, fill=colour, width=2)
    for px, py in pts:
      draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    ly = top + 16 * i
    draw.line([width - right + 10, ly + 6, width - right + 30, ly + 6], fill=colour, width=2)
    _draw_text(draw, (width - right + 35, ly), name)
  image.save(path)


class ScalarLogWriter:
  """The metric writer of a machine without TensorFlow, which clu's writers import (a GPU
  image that ships JAX but not TensorFlow): scalars go to the log (absl, like clu's
  LoggingWriter) and, given a `path`, one JSON line per write to it (SCALARS_FILE in the
  workdir: the training curves TensorBoard would have shown); images, audio and
  hyperparameters are dropped. Validation keeps its own history file and plots either way
  (rqvae_jax.validation)."""

  def __init__(self, path: str = ''):
    self.path = path

  def write_scalars(self, step, scalars):
    values = {k: float(v) for k, v in sorted(scalars.items())}
    absl_logging.info('[%d] %s', int(step),
                      ', '.join(f'{k} = {v:.6g}' for k, v in values.items()))
    if self.path:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': int(step), **values}) + '\n')

  def write_images(self, step, images):
    del step, images

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


SCALARS_FILE = 'scalars.jsonl'


def metric_writer(workdir: str, just_logging: bool = False):
  """clu's default writer (TensorBoard event files in workdir, and the log); where clu or
  TensorFlow is missing, a `ScalarLogWriter` into workdir/SCALARS_FILE (the log only when
  `just_logging`), with a warning that says what is lost."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.warning('No TensorBoard summaries (%s): scalars go to the log and %s only. pip '
                    'install clu tensorflow-cpu for TensorBoard.', e, SCALARS_FILE)
    return ScalarLogWriter('' if just_logging else os.path.join(workdir, SCALARS_FILE))
  return metric_writers.create_default_writer(workdir, just_logging=just_logging)
