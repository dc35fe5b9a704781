"""What machine a benchmark ran on: CPU model and the instruction-set flags that move speed.

Figures from machines of this kind differ with the instruction set (AVX2 EPYC vs AVX-512 /
AMX Xeon), so every benchmark's JSON records these beside its numbers.
"""
import platform
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
