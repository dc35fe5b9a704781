"""The programs' re-exec with glibc's huge-page tunable: when it happens, what it keeps."""
import json
import os
import platform
import subprocess
import sys

from rqvae_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = ('glibc', '2.36')


def test_reexec_only_where_it_helps():
  assert hugepages.should_reexec({}, GLIBC, 'madvise')
  assert hugepages.should_reexec({}, ('glibc', '2.35'), 'madvise')
  assert hugepages.should_reexec({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, GLIBC, 'madvise')
  assert not hugepages.should_reexec({}, ('glibc', '2.34'), 'madvise')   # no such tunable yet
  assert not hugepages.should_reexec({}, ('glibc', 'x'), 'madvise')
  assert not hugepages.should_reexec({}, ('', ''), 'madvise')            # musl, macOS
  assert not hugepages.should_reexec({}, GLIBC, 'always')                # huge pages already
  assert not hugepages.should_reexec({}, GLIBC, 'never')
  assert not hugepages.should_reexec({}, GLIBC, '')
  assert not hugepages.should_reexec({'RQVAE_JAX_HUGEPAGES': '0'}, GLIBC, 'madvise')
  assert not hugepages.should_reexec({hugepages.ADDED: '1'}, GLIBC, 'madvise')    # done once
  assert not hugepages.should_reexec({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, GLIBC,
                                     'madvise')                          # the user's choice


def test_tunable_added_then_removed_keeps_the_users_tunables():
  for before in ({}, {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'HOME': '/h'}):
    env = hugepages.with_tunable(before)
    assert env['GLIBC_TUNABLES'].split(':')[-1] == hugepages.TUNABLE
    assert env[hugepages.ADDED] == '1'
    assert hugepages.without_tunable(env) == before
  untouched = {'GLIBC_TUNABLES': hugepages.TUNABLE}      # set by the user, not by us
  assert hugepages.without_tunable(untouched) == untouched


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert hugepages.thp_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert hugepages.thp_mode(str(path)) == 'always'
  assert hugepages.thp_mode(str(tmp_path / 'missing')) == ''


_CHILD = '''
import json, os, sys
sys.path.insert(0, {repo!r})
from rqvae_jax import hugepages
hugepages.reexec_if_useful()
print(json.dumps({{'tunables': os.environ.get('GLIBC_TUNABLES', ''), 'argv': sys.argv[1:],
                  'added': os.environ.get(hugepages.ADDED, ''), 'name': __name__}}))
'''


def _run(tmp_path, args, **env):
  (tmp_path / 'child_prog.py').write_text(_CHILD.format(repo=REPO))
  full_env = {k: v for k, v in os.environ.items()
              if k not in ('GLIBC_TUNABLES', hugepages.ADDED, hugepages.OPT_OUT)}
  full_env.update(env)
  proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=full_env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout        # printed once: the first process was replaced
  return json.loads(lines[0])


def test_reexec_keeps_the_command_line_on_this_machine(tmp_path):
  expected = hugepages.should_reexec({}, platform.libc_ver(), hugepages.thp_mode())
  for args, name in ((['-u', 'child_prog.py', 'a b', '--flag=1'], '__main__'),
                     (['-m', 'child_prog', 'a b', '--flag=1'], '__main__')):
    out = _run(tmp_path, args)
    assert out['argv'] == ['a b', '--flag=1'] and out['name'] == name
    if expected:                   # glibc >= 2.35 and THP in madvise mode (e.g. CI's Debian)
      assert out['tunables'] == hugepages.TUNABLE and out['added'] == '1'
    else:
      assert out['tunables'] == '' and out['added'] == ''
  off = _run(tmp_path, ['child_prog.py'], RQVAE_JAX_HUGEPAGES='0')
  assert off['tunables'] == '' and off['added'] == ''
  mine = _run(tmp_path, ['child_prog.py'], GLIBC_TUNABLES='glibc.malloc.hugetlb=0')
  assert mine['tunables'] == 'glibc.malloc.hugetlb=0' and mine['added'] == ''
