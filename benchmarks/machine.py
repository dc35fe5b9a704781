"""What a benchmark ran on: CPU model, the instruction-set flags that move speed, and the code.

Figures from machines of this kind differ with the instruction set (AVX2 EPYC vs AVX-512 /
AMX Xeon), so every benchmark's JSON records these beside its numbers; the commit says which
code a line of `benchmarks/results.jsonl` measured (two codes are often timed in one sitting).
"""
import os
import platform
import subprocess
from typing import List

SPEED_FLAGS = ('avx', 'avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16',
               'amx_tile', 'amx_int8')


def _cpuinfo_field(name: str) -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(name):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''


def cpu_model() -> str:
  """'model name' of /proc/cpuinfo, else the platform's processor string."""
  return _cpuinfo_field('model name') or platform.processor() or 'unknown'


def cpu_flags() -> List[str]:
  """The speed-relevant instruction-set flags this CPU reports (subset of SPEED_FLAGS)."""
  flags = set(_cpuinfo_field('flags').split())
  return [f for f in SPEED_FLAGS if f in flags]


def code_commit(path: str = os.path.dirname(os.path.abspath(__file__))) -> str:
  """Short git commit of the checkout holding `path`, '+dirty' if tracked files other than
  the benchmarks' own JSONL logs changed ('unknown' outside a git checkout, e.g. installed)."""
  def git(*args):
    return subprocess.run(['git', '-C', path, *args], capture_output=True, text=True,
                          timeout=30)
  try:
    head = git('rev-parse', '--short', 'HEAD')
    if head.returncode:
      return 'unknown'
    dirty = git('status', '--porcelain', '--untracked-files=no', '--',
                ':(top,exclude,glob)benchmarks/*.jsonl').stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  return head.stdout.strip() + ('+dirty' if dirty else '')
