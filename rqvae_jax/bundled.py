"""The `configs` and `data` packages: beside rqvae_jax/ in a clone, inside it when installed.

The repository keeps the flax-examples layout (configs/, data/, train.py and eval.py at the
top, so `python train.py --config configs/rqvae.py` and `python -m data.prepare` work from a
clone). An installed distribution must not claim names as generic as `data` or `configs` in
site-packages: another package of the same name would shadow it or be shadowed by it. So
pyproject.toml maps them under this package (package-dir: `rqvae_jax.configs` is configs/,
`rqvae_jax.data` is data/), and library code asks this module for them:

* run from a clone (its root on sys.path, as for the tests, train.py, `python -m data.x`),
  the top-level `data` / `configs` are this clone's own and are used, so one copy of each
  module is loaded whichever name a caller imported;
* installed (or an editable install run from elsewhere), `rqvae_jax.data` and
  `rqvae_jax.configs`; an unrelated top-level `data` package is never picked up.

Configs are also reachable by name (`--config rqvae:demo`), so the commands work from any
directory after `pip install .` (`config_file`, `resolve_config_flags`).
"""
import functools
import importlib
import importlib.util
import os
import sys
from typing import List, Optional, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # parent of rqvae_jax/
_FLAG_NAMES = ('--config', '-config')


@functools.lru_cache(maxsize=None)
def _name(package: str) -> str:
  """'data' / 'configs' when the top-level package is the clone's own, else the mapped name."""
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    spec = None
  own = os.path.join(_ROOT, package, '__init__.py')
  if spec is not None and spec.origin and os.path.exists(own) and os.path.samefile(
      spec.origin, own):
    return package
  return f'rqvae_jax.{package}'


def _import(package: str, module: str):
  name = f'{_name(package)}.{module}' if module else _name(package)
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name and e.name.split('.')[-1] in (package, module) and 'rqvae_jax' in name:
      raise ModuleNotFoundError(
          f'rqvae_jax.{package} is missing: install the distribution (pip install . or '
          f'pip install -e . in a clone), or run from the repository root.', name=name) from e
    raise


def data_module(module: str = ''):
  """The data package's `module` (e.g. 'pipeline'), or the package itself."""
  return _import('data', module)


def configs_module(module: str = 'rqvae'):
  """A config module of the configs package (`get_config(variant)` builds a config)."""
  return _import('configs', module)


def config_names() -> List[str]:
  """Names of the bundled config files (configs/NAME.py), e.g. ['rqvae']."""
  folder = os.path.dirname(configs_module('').__file__)
  return sorted(f[:-3] for f in os.listdir(folder)
                if f.endswith('.py') and not f.startswith('_'))


def config_file(name: str) -> Optional[str]:
  """Path of the bundled config `name` ('rqvae', 'rqvae.py' or 'configs/rqvae.py'), or None."""
  base = name[len('configs/'):] if name.startswith('configs/') else name
  base = base[:-3] if base.endswith('.py') else base
  if not base or '/' in base or os.sep in base or base not in config_names():
    return None
  return os.path.join(os.path.dirname(configs_module('').__file__), f'{base}.py')


def resolve_config(spec: str) -> str:
  """`FILE[:VARIANT]` with FILE a path, or a bundled config's name -> a loadable spec.

  A path that exists wins; otherwise `rqvae`, `rqvae.py` and the repository-relative
  `configs/rqvae.py` name the bundled file (so the README's commands work from any folder
  after an install).

  Raises:
    ValueError: FILE is neither an existing file nor a bundled config's name.
  """
  path, sep, variant = spec.partition(':')
  if os.path.isfile(os.path.expanduser(path)):
    return spec
  bundled = config_file(path)
  if bundled is None:
    raise ValueError(f'--config {spec}: {path!r} is neither a file nor a bundled config '
                     f'(names: {", ".join(config_names())}); e.g. --config rqvae:demo or '
                     '--config path/to/config.py:VARIANT.')
  return bundled + sep + variant


def get_config(spec: str = 'rqvae'):
  """The ConfigDict of `NAME[:VARIANT]` or `FILE[:VARIANT]`, e.g. get_config('rqvae:demo')."""
  path, _, variant = resolve_config(spec).partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  bundled = config_file(name)
  if bundled and os.path.samefile(os.path.expanduser(path), bundled):
    module = configs_module(name)
  else:
    module_spec = importlib.util.spec_from_file_location('rqvae_user_config',
                                                         os.path.expanduser(path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def resolve_config_flags(argv: Sequence[str]) -> List[str]:
  """argv with the value of `--config` (not `--config.field` overrides) resolved by name.

  ml_collections loads `--config` from a path only; this runs before absl parses argv.
  """
  out = list(argv)
  for i, arg in enumerate(out):
    for flag in _FLAG_NAMES:
      if arg.startswith(flag + '='):
        out[i] = flag + '=' + resolve_config(arg[len(flag) + 1:])
      elif arg == flag and i + 1 < len(out):
        out[i + 1] = resolve_config(out[i + 1])
  return out


def default_config_path() -> str:
  """The bundled configs/rqvae.py, absolute: a default that works from any folder."""
  return config_file('rqvae')


if __name__ == '__main__':   # python -m rqvae_jax.bundled: where things are
  print(f'data: {data_module().__name__}  configs: {configs_module("").__name__}  '
        f'config names: {config_names()}', file=sys.stdout)
