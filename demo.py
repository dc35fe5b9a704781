"""The one-command demo: synthetic data -> train the `demo` config -> evaluate -> separate.

  make demo            (or: python demo.py --workdir runs/demo)

Everything runs on the embedded synthetic mini-Slakh (generated once, cached); a second run
resumes or reuses what the first one finished. Prints where the results are.
"""
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

from rqvae_jax import hugepages

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/demo', 'Where checkpoints, logs and results go.')
flags.DEFINE_string('variant', 'demo', 'Config variant of configs/rqvae.py to train.')


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.set_verbosity(logging.WARNING)   # the console gets the progress line, not every scalar
  import numpy as np
  import soundfile as sf
  from benchmarks import path_breakdown
  from configs.rqvae import get_config
  from data import pipeline, slakh
  from rqvae_jax import audio, compilation_cache, evaluation, separate, training, validation

  compilation_cache.enable()
  config = get_config(FLAGS.variant)
  workdir = FLAGS.workdir
  t0 = time.time()
  print(f'[1/4] Synthetic data (seed {config.data.synthetic.seed}) ...', file=sys.stderr)
  root = pipeline.resolve_root(config.data)
  print(f'      {root}  ({time.time() - t0:.0f} s)', file=sys.stderr)

  print(f'[2/4] Training {config.num_train_steps} steps of configs/rqvae.py:{FLAGS.variant} '
        f'in {workdir} ...', file=sys.stderr)
  t_train = time.time()
  training.train_and_evaluate(config, workdir)
  t_eval = time.time()
  print(f'      trained in {(t_eval - t_train) / 60:.1f} min', file=sys.stderr)

  print('[3/4] Evaluating on the test split ...', file=sys.stderr)
  result = evaluation.evaluate(config, workdir, 'test', 'best')
  print(f'      evaluated in {(time.time() - t_eval) / 60:.1f} min', file=sys.stderr)

  print('      where the separation comes from (benchmarks/path_breakdown, every 8th test '
        'window) ...', file=sys.stderr)
  paths = path_breakdown.breakdown(workdir, 'test', every=8)
  with open(os.path.join(workdir, 'path_breakdown.json'), 'w') as f:
    json.dump(paths, f, indent=1)
  t_sep = time.time()

  print('[4/4] Separating one test song (written as 44.1 kHz stereo to show the format '
        'round trip) ...', file=sys.stderr)
  track = slakh.scan(root, 'test', config.data, verbose=False).kept[0]
  mixture = slakh.load_track(track, config.data.stems).sum(-1)
  song = os.path.join(workdir, 'demo_song.wav')
  stereo = audio.resample(np.stack([mixture, 0.9 * mixture], -1), config.data.sample_rate, 44100)
  sf.write(song, np.clip(stereo, -1, 1), 44100, subtype='PCM_16')
  sep = separate.Separator.from_workdir(workdir, 'best')
  info = separate.separate_file(sep, song, os.path.join(workdir, 'separated'),
                                config.data.stems)
  print(f'      separated in {time.time() - t_sep:.0f} s', file=sys.stderr)
  ns = result['model']['nonsilent']
  zero = result['baselines']['all_zero']['nonsilent']
  print('\nDone in {:.1f} min.'.format((time.time() - t0) / 60))
  print(f"  test SI-SDRi over non-silent stems: model {ns['mean']:.2f} dB, all-zero "
        f"{zero['mean']:.2f} dB, mixture/4 "
        f"{result['baselines']['mixture_over_4']['nonsilent']['mean']:.2f} dB")
  per_stem = ', '.join(f"{s} {ns['per_stem_mean'][s]:.2f} / {zero['per_stem_mean'][s]:.2f}"
                       for s in config.data.stems)
  print(f'  per stem (model / all-zero): {per_stem}')
  cut = paths['nonsilent']
  print('  with a path cut (every 8th window): ' + ', '.join(
      f"{p} {cut[p]['mean']:.2f}" for p in path_breakdown.PATHS) + ' dB')
  print(f'  metrics:    {os.path.join(workdir, "eval", "test", "metrics.json")}')
  print(f'  validation curve: {os.path.join(workdir, validation.VAL_CURVE)}')
  print(f'  examples:   {os.path.join(workdir, "eval", "test", "examples")}')
  print(f"  separated:  {info['folder']}  (residual {info['residual_db']:.1f} dB)")
  print(f'  TensorBoard: tensorboard --logdir {workdir}')


if __name__ == '__main__':
  hugepages.reexec_if_useful()
  app.run(main)
