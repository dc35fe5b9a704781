"""Transparent huge pages for XLA's per-call buffers: the command-line programs re-execute
themselves once with glibc's `glibc.malloc.hugetlb=1` tunable.

Why: XLA:CPU gives each call of a compiled program one temporary buffer (about 1 GiB for the
paper's training step at batch 2). glibc maps a buffer that large afresh on every call, so
the kernel faults in and zeroes ~260 000 pages of 4 KiB per step: 0.43-0.51 s of kernel
time per step on a 2-core AMD EPYC. With the tunable glibc asks for transparent huge pages on
such maps (`madvise`, the kernel's usual THP mode): ~700 faults per step, and the paper
step took 0.67-0.74 s instead of 0.88-1.04 s, a batch-2 separation call 169 ms instead of
177-180 (interleaved runs, README: Performance). glibc reads tunables only when a process
starts, hence the re-exec. The original PyTorch code was not faster with it (1.26-1.28 s
against 1.14-1.17 s per step), so `benchmarks.run` times it without.

Done only where it helps: Linux with glibc >= 2.35 (the tunable's first release) and THP in
'madvise' mode ('always' already gives huge pages, 'never' cannot). RQVAE_JAX_HUGEPAGES=0
turns it off.
"""
import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = 'glibc.malloc.hugetlb=1'
OPT_OUT = 'RQVAE_JAX_HUGEPAGES'
ADDED = 'RQVAE_JAX_HUGEPAGES_ADDED'     # set in the re-executed process: what we added
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def thp_mode(path: str = THP_MODE_FILE) -> str:
  """The kernel's THP mode ('always', 'madvise', 'never'), '' if unknown (not Linux)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ''
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else ''


def _glibc_at_least(version: str, major: int, minor: int) -> bool:
  try:
    got = tuple(int(p) for p in version.split('.')[:2])
  except ValueError:
    return False
  return len(got) == 2 and got >= (major, minor)


def should_reexec(environ: Mapping[str, str], libc: tuple, mode: str) -> bool:
  """Whether a process with this environment, `platform.libc_ver()` and THP mode gains from
  re-executing with the tunable (and has not done so already)."""
  if environ.get(OPT_OUT, '1') == '0' or environ.get(ADDED):
    return False
  if 'glibc.malloc.hugetlb' in environ.get('GLIBC_TUNABLES', ''):
    return False                       # the user chose a value
  name, version = libc
  return name == 'glibc' and _glibc_at_least(version, 2, 35) and mode == 'madvise'


def with_tunable(environ: Mapping[str, str]) -> dict:
  """A copy of the environment with the tunable appended to GLIBC_TUNABLES."""
  env = dict(environ)
  before = env.get('GLIBC_TUNABLES', '')
  env['GLIBC_TUNABLES'] = f'{before}:{TUNABLE}' if before else TUNABLE
  env[ADDED] = '1'
  return env


def without_tunable(environ: Mapping[str, str]) -> dict:
  """The environment as it was before `reexec_if_useful` added the tunable (for programs
  this process starts that should run as their users would run them)."""
  env = dict(environ)
  if env.pop(ADDED, None):
    parts = [p for p in env.get('GLIBC_TUNABLES', '').split(':') if p and p != TUNABLE]
    if parts:
      env['GLIBC_TUNABLES'] = ':'.join(parts)
    else:
      env.pop('GLIBC_TUNABLES', None)
  return env


def reexec_if_useful(argv: Optional[list] = None) -> None:
  """Replaces this process by the same command line with the tunable, where it helps.

  Call it first thing in a program's entry point, before it writes anything: the process
  starts again from the top. `argv` is the full command line (default `sys.orig_argv`, which
  keeps `-m module` and the interpreter's own options).
  """
  if not should_reexec(os.environ, platform.libc_ver(), thp_mode()):
    return
  argv = list(sys.orig_argv if argv is None else argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + argv[1:], with_tunable(os.environ))
