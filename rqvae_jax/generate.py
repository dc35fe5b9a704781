"""Generates music with a trained prior: codes sampled, decoded by the codec into four stems.

  python -m rqvae_jax.generate --workdir PRIOR_DIR --seconds 8 --num 4 --out generated/

writes generated/sample_<i>/{bass,drums,guitar,piano,mix}.wav (the codec's rate) and
codes.rqc (a codes file of the codec: `python -m rqvae_jax.codec decode` reads it), and
generated/stats.json with figures about the stems (`stem_statistics`):

  spectral centroid and level per stem, the cross-stem correlation of waveforms and of
  average spectra: distinct instruments have distinct centroids and dissimilar spectra;
  consistency: the codec applied to the generated mix (encode -> decode, i.e. separated
  by the model itself), scored against the generated stems in SI-SDR.

What these can and cannot show: they show the stems differ from one another in the ways the
four instruments differ (a bass stem's centroid is low, a drums stem's spectrum broad), and
that the generated mix decomposes the same way again. They do not show the music is any
good, that the stems sound like instruments to a listener, or that samples are novel
(nothing is compared with the training set), and the consistency figure rewards a codec
that is self-consistent even where it separates badly.
"""
import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence

import jax
import numpy as np

from rqvae_jax import cli
from rqvae_jax import codec as codec_lib
from rqvae_jax import codes_file
from rqvae_jax import hugepages


def _frames(x: np.ndarray, n_fft: int) -> np.ndarray:
  """Half-overlapping frames of x (zero-padded to one frame when shorter)."""
  x = np.pad(np.asarray(x, np.float64), (0, max(0, n_fft - len(x))))
  return np.lib.stride_tricks.sliding_window_view(x, n_fft)[::n_fft // 2]


def spectral_centroid(x: np.ndarray, rate: int, n_fft: int = 1024) -> float:
  """Power-weighted mean frequency (Hz) of a signal's frames; 0 for silence."""
  frames = _frames(x, n_fft)
  power = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=-1)) ** 2
  freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
  total = power.sum()
  return float((power * freqs).sum() / total) if total > 0 else 0.0


def mean_spectrum(x: np.ndarray, n_fft: int = 1024) -> np.ndarray:
  frames = _frames(x, n_fft)
  return np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=-1)).mean(axis=0)


def _cosine(a, b) -> float:
  n = np.linalg.norm(a) * np.linalg.norm(b)
  return float(np.dot(a, b) / n) if n > 0 else 0.0


def stem_statistics(stems: np.ndarray, rate: int, names: Sequence[str],
                    separated: Optional[np.ndarray] = None) -> Dict:
  """Figures of one set of stems (N, S); `separated` (N, S): the codec's separation of their
  mix, scored against them."""
  s = stems.shape[-1]
  out = {'centroid_hz': {}, 'rms_dbfs': {}, 'waveform_correlation': {},
         'spectrum_cosine': {}}
  spectra = [mean_spectrum(stems[:, i]) for i in range(s)]
  for i, a in enumerate(names):
    out['centroid_hz'][a] = spectral_centroid(stems[:, i], rate)
    out['rms_dbfs'][a] = float(20 * np.log10(np.sqrt(np.mean(stems[:, i] ** 2)) + 1e-12))
    out['waveform_correlation'][a] = {b: float(np.corrcoef(stems[:, i], stems[:, j])[0, 1])
                                      if np.std(stems[:, i]) * np.std(stems[:, j]) > 0 else 0.0
                                      for j, b in enumerate(names)}
    out['spectrum_cosine'][a] = {b: _cosine(spectra[i], spectra[j]) for j, b in enumerate(names)}
  if separated is not None:
    out['consistency_sisdr_db'] = {a: codec_lib.sisdr_db(stems[:, i], separated[:, i])
                                   for i, a in enumerate(names)}
  return out


def _mean_stats(all_stats):
  """Averages the numeric leaves of a list of equally shaped dicts."""
  first = all_stats[0]
  if isinstance(first, dict):
    return {k: _mean_stats([s[k] for s in all_stats]) for k in first}
  return float(np.mean(all_stats))


def generate(workdir: str, seconds: float, num: int, out: str, *, temperature: float,
             top_p: float, seed: int, checkpoint='latest', reference_windows: int = 4) -> Dict:
  from rqvae_jax import prior_training, sampling   # pylint: disable=g-import-not-at-top
  from tqdm import tqdm                            # pylint: disable=g-import-not-at-top
  config, model, state, codec = prior_training.restore(workdir, checkpoint)
  out = cli.check_output_dir(out)
  rate = codec.config.data.sample_rate
  per_chunk = codec.frames_per_chunk
  # Whole codec chunks (the decoder's window), the nearest count: 4 s at the demo's 1.995 s
  # chunks is 2 chunks (3.99 s), where rounding up gave 3 (5.99 s).
  frames = per_chunk * max(1, round(seconds * codec_lib.frames_per_second(codec.config)
                                    / per_chunk))
  with tqdm(total=frames * num, unit='frame', desc='sampling', file=sys.stderr) as bar:
    done = [0]

    def progress(n):
      bar.update(n * num - done[0])
      done[0] = n * num

    codes = sampling.sample(model, {'params': state.ema}, jax.random.PRNGKey(seed), num,
                            frames, temperature=temperature, top_p=top_p, progress=progress)
  names = list(codec.config.data.stems)
  stats = []
  for i in range(num):
    folder = os.path.join(out, f'sample_{i}')
    os.makedirs(folder, exist_ok=True)
    stems = codec.decode(codes[i])
    n = len(stems)
    from rqvae_jax import audio as audio_lib       # pylint: disable=g-import-not-at-top
    for j, name in enumerate(names):
      audio_lib.save_audio(os.path.join(folder, f'{name}.wav'), stems[:, j], rate)
    mix = stems.sum(-1)
    audio_lib.save_audio(os.path.join(folder, 'mix.wav'), mix, rate)
    codes_file.write(os.path.join(folder, 'codes.rqc'), codec.header(codes[i], n), codes[i])
    stats.append(stem_statistics(stems, rate, names, separated=codec.forward(mix)))
  result = {'samples': num, 'seconds': frames / codec_lib.frames_per_second(codec.config),
            'frames': int(frames), 'temperature': temperature, 'top_p': top_p, 'seed': seed,
            'prior_step': int(state.step), 'generated_mean': _mean_stats(stats),
            'generated': stats}
  # The same figures for the codec's reconstructions of real test windows: what a real song
  # decoded by this codec looks like by these measures.
  test = prior_training.split_codes(codec, 'test', workdir)
  windows = prior_training.eval_windows(test, frames, reference_windows)
  ref = []
  for w in windows:
    stems = codec.decode(w)
    ref.append(stem_statistics(stems, rate, names, separated=codec.forward(stems.sum(-1))))
  result['real_test_decoded_mean'] = _mean_stats(ref) if ref else None
  with open(os.path.join(out, 'stats.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return result


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m rqvae_jax.generate',
                              description='Samples music from a trained prior (train_prior.py).')
  p.add_argument('--workdir', required=True, help='the prior\'s workdir')
  p.add_argument('--seconds', type=float, default=8.0,
                 help='length of each sample, rounded to whole codec chunks (at least one)')
  p.add_argument('--num', type=int, default=4, help='number of samples')
  p.add_argument('--out', default='generated', help='output folder')
  p.add_argument('--temperature', type=float, default=None,
                 help='default: the config\'s sampling.temperature (0 = greedy)')
  p.add_argument('--top-p', type=float, default=None, help='default: sampling.top_p (0.9)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--checkpoint', default='latest')
  p.add_argument('--verbose', action='store_true')
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  if argv is None:
    hugepages.reexec_if_useful()
  args = build_parser().parse_args(cli.argparse_argv(sys.argv[1:] if argv is None else argv))

  def run():
    from rqvae_jax import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
    sampling_cfg = ckpt_lib.load_config(args.workdir).get('sampling', {})
    temperature = args.temperature if args.temperature is not None else sampling_cfg.get(
        'temperature', 1.0)
    top_p = args.top_p if args.top_p is not None else sampling_cfg.get('top_p', 0.9)
    if args.num < 1 or args.seconds <= 0:
      raise ValueError('--num must be >= 1 and --seconds > 0.')
    r = generate(args.workdir, args.seconds, args.num, args.out, temperature=temperature,
                 top_p=top_p, seed=args.seed, checkpoint=args.checkpoint)
    g = r['generated_mean']
    print(f'{args.out}: {args.num} samples of {r["seconds"]:.2f} s; mean spectral centroid '
          + ', '.join(f'{k} {v:.0f} Hz' for k, v in g['centroid_hz'].items())
          + '; consistency SI-SDR ' + ', '.join(f'{k} {v:.1f}' for k, v in
                                                g['consistency_sisdr_db'].items()) + ' dB')
    return 0

  return cli.run_guarded(run, args.verbose)


if __name__ == '__main__':
  sys.exit(main())
