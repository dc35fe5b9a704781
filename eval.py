"""Evaluates a trained workdir on a split with the SI-SDRi protocol.

  python eval.py --workdir DIR [--split test] [--checkpoint best|latest|STEP]
                 [--config configs/rqvae.py:variant --config.data.root=...]

Without --config the workdir's saved config is used; with it, its model fields must match
the checkpoint's. Writes DIR/eval/<split>/metrics.json and example WAVs, prints a table.
Errors are one line; --verbose adds the traceback.
"""
import os

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir (config.json and checkpoints).')
flags.DEFINE_string('split', 'test', 'Split to evaluate: train, validation or test.')
flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.")
config_flags.DEFINE_config_file('config', None, 'Optional config (default: the saved one).',
                                lock_config=True)
flags.DEFINE_bool('verbose', False, 'Print tracebacks with errors (for bug reports).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from rqvae_jax import checkpoints, cli, compilation_cache, evaluation

  def run():
    compilation_cache.enable()
    config = FLAGS.config if FLAGS.config is not None else checkpoints.load_config(FLAGS.workdir)
    evaluation.evaluate(config, FLAGS.workdir, FLAGS.split, FLAGS.checkpoint)

  return cli.run_guarded(run, FLAGS.verbose)


if __name__ == '__main__':
  app.run(main)
