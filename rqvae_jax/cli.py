"""What the command lines share: one-line errors, output folder checks, output names, and
one flag spelling.

A user who passes a wrong path or a stale workdir needs the sentence that names the problem
and the fix, not forty lines of traceback ending in it; `run_guarded` prints that sentence
(and the traceback only with --verbose, for bug reports). The checks here run before any
model is restored, so a mistake costs seconds, not a whole separation.

Flag spelling, one rule for every command: flags are written with dashes (--batch-size,
--allow-changed, --num-train) and the underscore spelling (--batch_size) is accepted too.
absl names flags with underscores and argparse with dashes, so each command's argv is
rewritten to its parser's spelling first (`absl_argv`, `argparse_argv`). Config fields keep
the config's own spelling: --config.optim.plateau_min_delta.
"""
import os
import sys
import tempfile
import traceback
from typing import Callable, Dict, List, Sequence, Tuple

_CONFIG_FIELD = ('--config.', '-config.')

# The errors this project raises with a message meant for the user (bad input, bad config,
# missing files, full disks). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, OSError)


def one_line(error: BaseException) -> str:
  """The error's message on one line (multi-line messages joined with '; ')."""
  text = str(error).strip() or type(error).__name__
  return '; '.join(line.strip() for line in text.splitlines() if line.strip())


def run_guarded(fn: Callable[[], int], verbose: bool, stream=None) -> int:
  """Runs fn() and returns its exit code; a user error is printed as its message alone
  (exit 1), with the traceback under --verbose; Ctrl-C exits with 130 without a traceback."""
  stream = stream or sys.stderr
  try:
    return int(fn() or 0)
  except USER_ERRORS as e:
    if verbose:
      traceback.print_exc(file=stream)
    print(f'error: {str(e).strip() or type(e).__name__}', file=stream)
    if not verbose:
      print('(run with --verbose for the traceback)', file=stream)
    return 1
  except KeyboardInterrupt:
    print('interrupted', file=stream)
    return 130


def check_output_dir(path: str) -> str:
  """Creates `path` if needed and proves it writable with a scratch file; returns it.

  Raises:
    ValueError: the path is a file, cannot be created, or cannot be written to.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'Output folder {path} is a file: choose another --out.')
  try:
    os.makedirs(path, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix='.write-test-', dir=path)
    os.close(fd)
    os.remove(scratch)
  except OSError as e:
    raise ValueError(f'Cannot write to the output folder {path} ({e.strerror or e}): choose '
                     'another --out.') from e
  return path


def output_names(paths: Sequence[str]) -> Tuple[List[Tuple[str, str]], Dict[str, str]]:
  """Output folder name of each input: its name without extension, unless two inputs share
  it (song.wav and song.flac: 'song_wav' and 'song_flac'), so none overwrites another.

  Returns:
    ([(path, folder name)], {path: error}) - a file given twice is separated once; inputs
    that cannot get a distinct name (the same file name in two folders) are errors.
  """
  errors, seen = {}, set()
  unique = []
  for p in paths:
    key = os.path.realpath(p)
    if key not in seen:
      seen.add(key)
      unique.append(p)
  stem = lambda p: os.path.splitext(os.path.basename(p))[0]
  counts: Dict[str, int] = {}
  for p in unique:
    counts[stem(p)] = counts.get(stem(p), 0) + 1
  named, taken = [], {}
  for p in unique:
    name = stem(p) if counts[stem(p)] == 1 else os.path.basename(p).replace('.', '_')
    if name in taken:
      errors[p] = (f'has the same name as {taken[name]}, so both would write <out>/{name}/: '
                   'rename one, or separate it with another --out')
      continue
    taken[name] = p
    named.append((p, name))
  return named, errors


def _respell(argv: Sequence[str], old: str, new: str) -> List[str]:
  """argv with `old` replaced by `new` in flag names (not values, not config fields, nothing
  after a bare --)."""
  out, done = [], False
  for arg in argv:
    if done or not arg.startswith('-') or arg.startswith(_CONFIG_FIELD) or len(arg) < 2 or (
        not arg.lstrip('-')[:1].isalpha()):
      done = done or arg == '--'
      out.append(arg)
      continue
    dashes = len(arg) - len(arg.lstrip('-'))
    name, eq, value = arg[dashes:].partition('=')
    out.append(arg[:dashes] + name.replace(old, new) + eq + value)
  return out


def absl_argv(argv: Sequence[str]) -> List[str]:
  """argv for an absl command: dashed flag names in underscores, --config resolved by name
  (`bundled.resolve_config_flags`). argv[0] is kept.

  Raises:
    ValueError: --config names neither a file nor a bundled config.
  """
  from rqvae_jax import bundled  # pylint: disable=g-import-not-at-top
  return bundled.resolve_config_flags([argv[0]] + _respell(argv[1:], '-', '_'))


def argparse_argv(argv: Sequence[str]) -> List[str]:
  """argv (without the program name) for an argparse command: underscores in dashes."""
  return _respell(argv, '_', '-')
