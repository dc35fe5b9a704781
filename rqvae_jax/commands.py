"""The train and eval commands: `python train.py` / `python eval.py` and `rqvae-train` /
`rqvae-eval` run this code.

The repository keeps train.py and eval.py at its top (the flax-examples layout) as thin
shims; an installed distribution has no such files, so pyproject.toml's console scripts call
`train` and `evaluate` here. Flags are defined when a command starts, not at import: both
commands have --workdir, and one process runs one command. Before absl parses argv,
`cli.absl_argv` accepts the dashed spelling of every flag (--allow-changed) and resolves
--config by name (--config rqvae:demo), so the commands work from any folder.
"""
import os
import sys
from typing import Optional, Sequence

from rqvae_jax import hugepages

HELP_FLAGS = {'--help', '-help', '-h', '-?', '--helpshort', '--helpfull'}

TRAIN_USAGE = """Trains an RQ-VAE separator.

  rqvae-train --workdir DIR [--config rqvae:VARIANT | --config FILE.py[:VARIANT]]
              [--config.optim.lr=5e-4 ...]        (python train.py ... in a clone)

VARIANT: paper (default), original, demo, cpu_hour, smoke. A second run with the same
command resumes from DIR's latest checkpoint. Resuming compares the config with the saved
one: fields that shape the state or the data must match (the error names them);
rqvae_jax/resume.py lists those that may change (lr, steps, logging...), and
--allow-changed=FIELD[,FIELD] accepts others you know to be safe. Errors are one line;
--verbose adds the traceback.
"""

EVAL_USAGE = """Evaluates a trained workdir on a split with the SI-SDRi protocol.

  rqvae-eval --workdir DIR [--split test] [--checkpoint best|latest|STEP] [--shifts N]
             [--config rqvae:VARIANT --config.data.root=...]   (python eval.py ... in a clone)

Without --config the workdir's saved config is used; with it, its model fields must match
the checkpoint's. Writes DIR/eval/<split>/metrics.json and example WAVs, prints a table.
Errors are one line; --verbose adds the traceback.
"""


def _adopt_flags_for_help(usage: str) -> None:
  """--help lists the main module's flags and prints its docstring; under a console script
  the main module is pip's wrapper, so this module's flags and usage are lent to it."""
  from absl import flags
  main = sys.modules.get('__main__')
  if main is not None and not getattr(main, '__doc__', None):
    main.__doc__ = usage
  for flag in flags.FLAGS.get_key_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def _run(main, usage: str, argv: Optional[Sequence[str]]) -> None:
  from absl import app
  from rqvae_jax import cli
  _adopt_flags_for_help(usage)
  try:
    argv = cli.absl_argv(sys.argv if argv is None else argv)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  try:
    app.run(main, argv=argv)
  except SystemExit as e:       # absl exits 1 after printing --help; asking for help is no error
    if e.code == 1 and HELP_FLAGS & set(argv[1:]):
      sys.exit(0)
    raise


def _train_main(argv):
  from absl import app, flags, logging
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from rqvae_jax import cli, compilation_cache, parallel, training
  f = flags.FLAGS

  def run():
    parallel.maybe_initialize_distributed()
    compilation_cache.enable()
    logging.set_verbosity(logging.WARNING)
    training.train_and_evaluate(f.config, f.workdir, f.allow_changed)

  return cli.run_guarded(run, f.verbose)


def train(argv: Optional[Sequence[str]] = None) -> None:
  """rqvae-train / python train.py."""
  if argv is None:
    hugepages.reexec_if_useful()
  from absl import flags
  from ml_collections import config_flags
  from rqvae_jax import bundled
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, config and TensorBoard logs.')
  config_flags.DEFINE_config_file(
      'config', bundled.default_config_path(),
      'Run configuration: rqvae[:VARIANT] (the bundled configs/rqvae.py) or FILE.py[:VARIANT].',
      lock_config=True)
  flags.DEFINE_list('allow_changed', [], 'Config fields allowed to differ from the saved run '
                    'when resuming (e.g. data.root after moving the same data).')
  flags.DEFINE_bool('verbose', False, 'Print tracebacks with errors (for bug reports).')
  flags.mark_flags_as_required(['workdir'])
  _run(_train_main, TRAIN_USAGE, argv)


def _eval_main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from rqvae_jax import checkpoints, cli, compilation_cache, evaluation
  f = flags.FLAGS

  def run():
    compilation_cache.enable()
    config = f.config if f.config is not None else checkpoints.load_config(f.workdir)
    if f.shifts is not None:      # a plain flag: --config.inference.shifts needs --config
      config = config.copy_and_resolve_references()
      with config.unlocked():
        config.inference.shifts = f.shifts
    evaluation.evaluate(config, f.workdir, f.split, f.checkpoint)

  return cli.run_guarded(run, f.verbose)


def evaluate(argv: Optional[Sequence[str]] = None) -> None:
  """rqvae-eval / python eval.py."""
  if argv is None:
    hugepages.reexec_if_useful()
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json and checkpoints).')
  flags.DEFINE_string('split', 'test', 'Split to evaluate: train, validation or test.')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.")
  flags.DEFINE_integer('shifts', None, "Passes averaged over shifted chunk grids (Demucs' "
                       'shift trick, track mode; N times the work). Default: the config\'s '
                       'inference.shifts (1).')
  config_flags.DEFINE_config_file('config', None, 'Optional config, rqvae[:VARIANT] or '
                                  'FILE.py[:VARIANT] (default: the saved one).',
                                  lock_config=True)
  flags.DEFINE_bool('verbose', False, 'Print tracebacks with errors (for bug reports).')
  flags.mark_flags_as_required(['workdir'])
  _run(_eval_main, EVAL_USAGE, argv)
