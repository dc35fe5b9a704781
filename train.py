"""Trains an RQ-VAE separator.

  python train.py --config configs/rqvae.py[:variant] --workdir DIR [--config.optim.lr=5e-4 ...]

A second run with the same command resumes from DIR's latest checkpoint. Resuming compares
the config with the saved one: fields that shape the state or the data must match (the
error names them); rqvae_jax/resume.py lists those that may change (lr, steps, logging...),
and --allow_changed=FIELD[,FIELD] accepts others you know to be safe. Errors are one line;
--verbose adds the traceback.
"""
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, config and TensorBoard logs.')
config_flags.DEFINE_config_file('config', 'configs/rqvae.py', 'Run configuration (file[:variant]).',
                                lock_config=True)
flags.DEFINE_list('allow_changed', [], 'Config fields allowed to differ from the saved run '
                  'when resuming (e.g. data.root after moving the same data).')
flags.DEFINE_bool('verbose', False, 'Print tracebacks with errors (for bug reports).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from rqvae_jax import cli, compilation_cache, parallel, training

  def run():
    parallel.maybe_initialize_distributed()
    compilation_cache.enable()
    logging.set_verbosity(logging.WARNING)
    training.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.allow_changed)

  return cli.run_guarded(run, FLAGS.verbose)


if __name__ == '__main__':
  app.run(main)
