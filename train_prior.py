"""Trains the RQ-Transformer prior on a trained codec's codes (the paper's section 3.2).

  python train_prior.py --config configs/prior.py[:paper|cpu|smoke] --workdir DIR \
      --config.autoencoder_workdir=CODEC_DIR

CODEC_DIR is a workdir of `python train.py --config configs/rqvae.py:codec` (waveform head,
no skips). A second run with the same command resumes from DIR's latest checkpoint. At the
end DIR/metrics.json holds the test NLL (bits per code, per depth, per frame). Then:
`python -m rqvae_jax.generate --workdir DIR --seconds 8 --num 4 --out generated/`.
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from rqvae_jax import bundled, cli, hugepages

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for the prior\'s checkpoints, config, logs.')
config_flags.DEFINE_config_file('config', bundled.config_file('prior'),
                                'Prior configuration: prior[:VARIANT] or FILE.py[:VARIANT].',
                                lock_config=True)
flags.DEFINE_list('allow_changed', [], 'Config fields allowed to differ when resuming.')
flags.DEFINE_bool('verbose', False, 'Print tracebacks with errors.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from rqvae_jax import compilation_cache, prior_training   # pylint: disable=g-import-not-at-top
  compilation_cache.enable()
  return cli.run_guarded(
      lambda: prior_training.train_prior(FLAGS.config, FLAGS.workdir, FLAGS.allow_changed)
      and 0, FLAGS.verbose)


if __name__ == '__main__':
  hugepages.reexec_if_useful()
  app.run(main, argv=cli.absl_argv(sys.argv))
