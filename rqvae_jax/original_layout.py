"""The original PyTorch RQ-VAE's state-dict layout, mapped to this model's variables and back.

The original's keys (../shared/reference/original-implementation.md, "Checkpoint layout"),
without the Lightning prefix `AE.`:
  encoder.modules{i}.{0: BatchNorm, 1: Conv1d, 2: PReLU, 4: ResidualBlock}      i = 1..5
  ...4.resblock.{0,3,6: Conv1d; 1,4,7: BatchNorm; 2,5: PReLU}, ...4.prelu
  encoder.LSTM.{weight_ih,weight_hh,bias_ih,bias_hh}_l{0,1}[_reverse], encoder.fc.{weight,bias}
  decoder.LSTM..., decoder.fc..., decoder.modules1 = {0: BN, 1: ConvTranspose1d, 2: PReLU,
  4: ResidualBlock}, decoder.modules{2..4} = {0: ConvTranspose1d, 1: PReLU, 3: ResidualBlock},
  decoder.modules5.0 = the output ConvTranspose1d; codebooks.{0..11}.weight.

Every tensor is one `Entry`: a torch key, the variable it fills and how its layout differs.
Conv1d weights are (out, in, k) there and (k, in, out) here; ConvTranspose1d weights
(in, out, k) there and (k, out, in) here (both `transpose(2, 1, 0)`, no flip); Linear
weights (out, in) there, Dense kernels (in, out) here; PReLU slopes (1,) there, () here;
LSTM tensors keep PyTorch's names, shapes and gate order (i, f, g, o) in rqvae_jax.lstm;
BatchNorm weight/bias/running_mean/running_var are scale/bias and batch_stats mean/var.
`num_batches_tracked` has no counterpart (it only matters for momentum=None): it is read
as the training step and written back from it.
"""
import collections
import dataclasses
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

PARAMS, STATS = 'params', 'batch_stats'
_TO_OURS = {
    'conv': lambda a: np.transpose(a, (2, 1, 0)),
    'conv_transpose': lambda a: np.transpose(a, (2, 1, 0)),
    'dense': lambda a: np.transpose(a),
    'prelu': lambda a: np.reshape(a, ()),
    'same': lambda a: a,
}
_TO_TORCH = {
    'conv': lambda a: np.transpose(a, (2, 1, 0)),
    'conv_transpose': lambda a: np.transpose(a, (2, 1, 0)),
    'dense': lambda a: np.transpose(a),
    'prelu': lambda a: np.reshape(a, (1,)),
    'same': lambda a: a,
}


class LayoutError(ValueError):
  """The state dict does not match the original's layout for this config."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of the original's state dict (key without `AE.`) and the variable it fills.

  kind: 'conv', 'conv_transpose', 'dense', 'prelu', 'same', 'codebook' (stage `index` of
  params/quantizer/codebooks) or 'count' (BatchNorm's num_batches_tracked: no variable).
  """
  key: str
  collection: Optional[str]
  path: Tuple[str, ...]
  kind: str
  index: Optional[int] = None


def _batch_norm(key: str, path: Tuple[str, ...]) -> Iterator[Entry]:
  path = path + ('BatchNorm_0',)           # blocks.BatchNorm wraps flax's nn.BatchNorm
  yield Entry(f'{key}.weight', PARAMS, path + ('scale',), 'same')
  yield Entry(f'{key}.bias', PARAMS, path + ('bias',), 'same')
  yield Entry(f'{key}.running_mean', STATS, path + ('mean',), 'same')
  yield Entry(f'{key}.running_var', STATS, path + ('var',), 'same')
  yield Entry(f'{key}.num_batches_tracked', None, (), 'count')


def _residual_block(key: str, path: Tuple[str, ...]) -> Iterator[Entry]:
  """resblock.{0,3,6} convs, {1,4,7} BatchNorms, {2,5} PReLUs, then the outer PReLU."""
  path = path + ('ResidualBlock_0',)
  for n in range(3):
    idx = 3 * n
    yield Entry(f'{key}.resblock.{idx}.weight', PARAMS, path + (f'Conv_{n}', 'kernel'), 'conv')
    yield from _batch_norm(f'{key}.resblock.{idx + 1}', path + (f'BatchNorm_{n}',))
    if n < 2:
      yield Entry(f'{key}.resblock.{idx + 2}.weight', PARAMS,
                  path + (f'PReLU_{n}', 'negative_slope'), 'prelu')
  yield Entry(f'{key}.prelu.weight', PARAMS, path + ('PReLU_2', 'negative_slope'), 'prelu')


def _lstm_and_fc(side: str, num_layers: int) -> Iterator[Entry]:
  for k in range(num_layers):
    for sfx in ('', '_reverse'):
      for name in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh'):
        yield Entry(f'{side}.LSTM.{name}_l{k}{sfx}', PARAMS, (side, 'lstm', f'{name}_l{k}{sfx}'),
                    'same')
  yield Entry(f'{side}.fc.weight', PARAMS, (side, 'fc', 'kernel'), 'dense')
  yield Entry(f'{side}.fc.bias', PARAMS, (side, 'fc', 'bias'), 'same')


def entries(model_config) -> List[Entry]:
  """Every tensor of the original's state dict for this architecture, in PyTorch's order
  (the order of `state_dict()`: codebooks, encoder, decoder, as the modules register)."""
  n = len(model_config.channels)
  out: List[Entry] = []
  for q in range(model_config.quantizer.num_quantizers):
    out.append(Entry(f'codebooks.{q}.weight', PARAMS, ('quantizer', 'codebooks'), 'codebook', q))
  for i in range(1, n + 1):
    key, path = f'encoder.modules{i}', ('encoder', f'block{i}')
    out.extend(_batch_norm(f'{key}.0', path + ('BatchNorm_0',)))
    out.append(Entry(f'{key}.1.weight', PARAMS, path + ('Conv_0', 'kernel'), 'conv'))
    out.append(Entry(f'{key}.2.weight', PARAMS, path + ('PReLU_0', 'negative_slope'), 'prelu'))
    out.extend(_residual_block(f'{key}.4', path))
  out.extend(_lstm_and_fc('encoder', model_config.lstm_layers))
  for i in range(1, n):
    key, path = f'decoder.modules{i}', ('decoder', f'block{i}')
    first = 0
    if i == 1:                             # only the first decoder block starts with a BN
      out.extend(_batch_norm(f'{key}.0', path + ('BatchNorm_0',)))
      first = 1
    out.append(Entry(f'{key}.{first}.weight', PARAMS, path + ('ConvTranspose_0', 'kernel'),
                     'conv_transpose'))
    out.append(Entry(f'{key}.{first + 1}.weight', PARAMS, path + ('PReLU_0', 'negative_slope'),
                     'prelu'))
    out.extend(_residual_block(f'{key}.{first + 3}', path))
  out.append(Entry(f'decoder.modules{n}.0.weight', PARAMS, ('decoder', 'out', 'kernel'),
                   'conv_transpose'))
  out.extend(_lstm_and_fc('decoder', model_config.lstm_layers))
  return out


def check_architecture(model_config) -> None:
  """Raises when the config computes something else than the original with the same weights
  (fields that change no parameter shape, so the key checks alone would not notice)."""
  c = model_config
  problems = []
  if c.get('bottleneck', 'rvq') == 'gaussian':
    problems.append("model.bottleneck must be 'rvq' or 'vq' (the original VAE maps the whole "
                    "flattened sequence with one dense layer; this model's Gaussian is per "
                    "frame, so no original VAE checkpoint fits it)")
  if not c.skip_connections:
    problems.append('model.skip_connections must be True (the original adds the encoder '
                    'skips)')
  if c.get('skip_mode', 'add') != 'add':
    problems.append(f"model.skip_mode must be 'add', not {c.skip_mode!r}")
  if c.get('output_kernel', 0) not in (0, c.kernels[0]):
    problems.append(f'model.output_kernel must be 0 (the original mirrors the first kernel), '
                    f'not {c.output_kernel}')
  if c.in_channels != 1 or c.padding != 1:
    problems.append('model.in_channels and model.padding must be 1')
  if problems:
    raise LayoutError('The config is not the original architecture: ' + '; '.join(problems)
                      + '. Use --config configs/rqvae.py:original.')


def _leaves(tree: Mapping, prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_leaves(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _nest(flat: Mapping[Tuple[str, ...], Any]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def _torch_shape(entry: Entry, ours: Tuple[int, ...]) -> Tuple[int, ...]:
  if entry.kind == 'codebook':
    return tuple(ours[1:])
  if entry.kind == 'count':
    return ()
  return tuple(_TO_TORCH[entry.kind](np.empty(ours, np.bool_)).shape)


def to_variables(state_dict: Mapping[str, np.ndarray], model_config, abstract: Mapping
                 ) -> Tuple[Dict[str, Any], int]:
  """Original state dict (keys without `AE.`) -> ({'params':..., 'batch_stats':...}, step).

  `abstract` is the model's variables as shapes (jax.eval_shape of init). Every key must be
  used and every parameter and statistic filled: a missing key, an extra key, a non-tensor
  or a wrong shape is a LayoutError naming it, with the shape expected. The step is the
  largest BatchNorm num_batches_tracked (training batches seen), 0 without any.
  """
  check_architecture(model_config)
  table = entries(model_config)
  wanted = {PARAMS: _leaves(abstract[PARAMS]), STATS: _leaves(abstract.get(STATS, {}))}
  errors, filled, steps = [], {PARAMS: {}, STATS: {}}, [0]
  codebooks: Dict[int, np.ndarray] = {}
  known = {e.key for e in table}
  extra = sorted(k for k in state_dict if k not in known)
  if extra:
    errors.append(f'{len(extra)} key(s) the original layout does not have: {_some(extra)}')
  missing = [e.key for e in table if e.key not in state_dict]
  if missing:
    errors.append(f'{len(missing)} key(s) missing: {_some(missing)}')
  for e in table:
    if e.key not in state_dict:
      continue
    value = state_dict[e.key]
    if not isinstance(value, np.ndarray):
      errors.append(f'{e.key} holds a {type(value).__name__}, not a tensor')
      continue
    want_float = e.kind != 'count'
    if want_float != bool(np.issubdtype(value.dtype, np.floating) or value.dtype.name == 'bfloat16'):
      errors.append(f'{e.key} has dtype {value.dtype}, expected '
                    f'{"a floating" if want_float else "an integer"} tensor')
      continue
    if e.kind == 'count':
      steps.append(int(np.max(value)) if value.size else 0)
      continue
    target = wanted[e.collection].get(e.path)
    if target is None:
      errors.append(f'{e.key}: this config has no variable {"/".join(e.path)}')
      continue
    expected = _torch_shape(e, tuple(target.shape))
    if tuple(value.shape) != expected:
      errors.append(f'{e.key} has shape {tuple(value.shape)}, the config expects {expected}')
      continue
    value = np.asarray(value, np.float32)
    if e.kind == 'codebook':
      codebooks[e.index] = value
    else:
      filled[e.collection][e.path] = _TO_OURS[e.kind](value)
  if len(codebooks) == model_config.quantizer.num_quantizers:
    filled[PARAMS][('quantizer', 'codebooks')] = np.stack([codebooks[q]
                                                           for q in sorted(codebooks)])
  if not errors:
    for collection, leaves in wanted.items():
      unfilled = sorted('/'.join(p) for p in leaves if p not in filled[collection])
      if unfilled:
        errors.append(f'{collection} not filled by any key (the config has layers the '
                      f'original has not): {_some(unfilled)}')
  if errors:
    raise LayoutError('The checkpoint does not match the original RQ-VAE layout for this '
                      'config:\n  ' + '\n  '.join(errors))
  return {c: _nest(filled[c]) for c in (PARAMS, STATS)}, max(steps)


def to_state_dict(variables: Mapping, model_config, step: int = 0
                  ) -> 'collections.OrderedDict[str, np.ndarray]':
  """Our variables ({'params', 'batch_stats'}; the codebooks already the ones to write) ->
  the original's state dict (keys without `AE.`), every BatchNorm's num_batches_tracked
  set to `step`. The inverse of `to_variables`."""
  check_architecture(model_config)
  leaves = {PARAMS: _leaves(variables[PARAMS]), STATS: _leaves(variables.get(STATS, {}))}
  out = collections.OrderedDict()
  for e in entries(model_config):
    if e.kind == 'count':
      out[e.key] = np.asarray(step, np.int64)
      continue
    if e.path not in leaves[e.collection]:
      raise LayoutError(f'The variables have no {e.collection}/{"/".join(e.path)} for '
                        f'{e.key}.')
    value = np.asarray(leaves[e.collection][e.path], np.float32)
    out[e.key] = (np.array(value[e.index]) if e.kind == 'codebook'
                  else np.ascontiguousarray(_TO_TORCH[e.kind](value)))
  return out


def _some(names: List[str], limit: int = 8) -> str:
  shown = ', '.join(names[:limit])
  return shown + (f', ... ({len(names) - limit} more)' if len(names) > limit else '')
