"""The generation demo: train a codec and a prior on the synthetic set, then sample music.

  make generate-demo     (or: python generate_demo.py --workdir runs/generate_demo)

1. trains configs/rqvae.py:codec (magnitude head, no skips) in WORKDIR/codec,
2. encodes its test windows and reports how far the stems and their sum (the mixture)
   decoded from codes alone are from the originals (log-mel distance, SI-SDR), and the
   bitrate,
3. trains configs/prior.py:cpu on its codes in WORKDIR/prior (test NLL in metrics.json),
4. samples 4 x 4 s into WORKDIR/generated (stems, mix, codes, stats.json).
A second run resumes or reuses what the first one finished (the same commands).
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
flags.DEFINE_string('workdir', 'runs/generate_demo', 'Where the codec, prior and samples go.')
flags.DEFINE_integer('codec_steps', 0, 'Override the codec variant\'s training steps (0: keep).')
# The prior's `cpu` recipe is 1500 steps; on a 2-core CPU that alone is ~28 min, so the demo
# trains 300 (README: Codec and prior).
flags.DEFINE_integer('prior_steps', 300, 'Prior training steps (0: the cpu variant\'s 1500).')


def codec_reconstruction(codec, windows: int = 16):
  """From codes alone, over the first 4 s (eval_window_samples) of the first `windows` test
  tracks: mean SI-SDR (dB) of the non-silent stems and of their sum, and their log-mel
  distance (dB, codec.log_mel_distance_db) beside that of the mixture itself taken as every
  stem's estimate (what a codec that separated nothing would score)."""
  import numpy as np
  from data import pipeline, slakh
  from rqvae_jax import codec as codec_lib
  data = codec.config.data
  rate = data.sample_rate
  tracks = slakh.scan(pipeline.resolve_root(data), 'test', data, verbose=False).kept
  stems_db, mix_db, stems_lmd, mix_as_stem_lmd, mix_lmd = [], [], [], [], []
  for track in tracks[:windows]:
    ref = slakh.load_stems(track, 0, data.eval_window_samples, data.stems)
    mix = ref.sum(-1)
    est = codec.decode(codec.encode(mix), len(mix))
    for i in range(ref.shape[1]):
      if np.sqrt(np.mean(ref[:, i] ** 2)) <= data.silence_threshold:
        continue
      stems_db.append(codec_lib.sisdr_db(ref[:, i], est[:, i]))
      stems_lmd.append(codec_lib.log_mel_distance_db(ref[:, i], est[:, i], rate))
      mix_as_stem_lmd.append(codec_lib.log_mel_distance_db(ref[:, i], mix, rate))
    mix_db.append(codec_lib.sisdr_db(mix, est.sum(-1)))
    mix_lmd.append(codec_lib.log_mel_distance_db(mix, est.sum(-1), rate))
  mean = lambda v: float(np.mean(v))
  return {'stems_sisdr_db': mean(stems_db), 'mixture_sisdr_db': mean(mix_db),
          'stems_log_mel_distance_db': mean(stems_lmd),
          'mixture_log_mel_distance_db': mean(mix_lmd),
          'mixture_as_stem_log_mel_distance_db': mean(mix_as_stem_lmd),
          'windows': len(mix_db)}


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.set_verbosity(logging.WARNING)
  from configs import prior as prior_configs
  from configs.rqvae import get_config
  from rqvae_jax import codec as codec_lib, compilation_cache, generate, prior_training, training
  compilation_cache.enable()
  t0 = time.time()
  codec_dir = os.path.join(FLAGS.workdir, 'codec')
  prior_dir = os.path.join(FLAGS.workdir, 'prior')
  config = get_config('codec')
  if FLAGS.codec_steps:
    config.num_train_steps = FLAGS.codec_steps
  print(f'[1/4] Training the codec ({config.num_train_steps} steps) in {codec_dir} ...',
        file=sys.stderr)
  training.train_and_evaluate(config, codec_dir)
  t1 = time.time()
  codec = codec_lib.Codec.from_workdir(codec_dir, 'best')
  recon = codec_reconstruction(codec)
  recon['bitrate_bps'] = codec_lib.bitrate(codec.config)
  with open(os.path.join(FLAGS.workdir, 'codec_reconstruction.json'), 'w') as f:
    json.dump(recon, f, indent=1)
  print(f'[2/4] codec: {recon["bitrate_bps"] / 1000:.2f} kbit/s; from codes alone the stems '
        f'are {recon["stems_log_mel_distance_db"]:.2f} dB from the originals in log-mel '
        f'(the mixture as each stem: {recon["mixture_as_stem_log_mel_distance_db"]:.2f}), '
        f'SI-SDR {recon["stems_sisdr_db"]:.2f} dB (Griffin-Lim phase: README, Codec and '
        f'prior); their sum {recon["mixture_log_mel_distance_db"]:.2f} dB log-mel, '
        f'{recon["mixture_sisdr_db"]:.2f} dB SI-SDR ({recon["windows"]} test windows)',
        file=sys.stderr)
  pcfg = prior_configs.get_config('cpu')
  pcfg.autoencoder_workdir = codec_dir
  if FLAGS.prior_steps:
    pcfg.num_train_steps = FLAGS.prior_steps
  print(f'[3/4] Training the prior ({pcfg.num_train_steps} steps) in {prior_dir} ...',
        file=sys.stderr)
  t2 = time.time()
  nll = prior_training.train_prior(pcfg, prior_dir)
  t3 = time.time()
  out = os.path.join(FLAGS.workdir, 'generated')
  print(f'[4/4] Sampling 4 x 4 s into {out} ...', file=sys.stderr)
  stats = generate.generate(prior_dir, 4.0, 4, out, temperature=1.0, top_p=0.9, seed=0)
  print(f'\nDone in {(time.time() - t0) / 60:.1f} min (codec {(t1 - t0) / 60:.1f}, prior '
        f'{(t3 - t2) / 60:.1f}, sampling {(time.time() - t3) / 60:.1f}).')
  print(f'  codec: {json.dumps(recon)}')
  print(f'  prior test NLL: {nll["bits_per_code"]:.3f} bits/code (uniform '
        f'{nll["uniform_bits_per_code"]:.0f}), per depth {nll["bits_per_code_per_depth"]}')
  print(f'  generated centroids: {stats["generated_mean"]["centroid_hz"]}')
  print(f'  samples: {out}/sample_*/{{bass,drums,guitar,piano,mix}}.wav, stats.json')


if __name__ == '__main__':
  hugepages.reexec_if_useful()
  app.run(main)
