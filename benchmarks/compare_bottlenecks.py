"""RQ-VAE vs its baselines (VQ-VAE, VAE) under one recipe and budget: train, evaluate, tabulate.

  python -m benchmarks.compare_bottlenecks --out runs/bottlenecks --steps 500 \
      [--bottlenecks rvq,vq,gaussian] [--variant demo] [--vq-codebook-size 1024] \
      [--split test] [--checkpoint latest] [--readme README.md]
  python -m benchmarks.compare_bottlenecks --out runs/bottlenecks --table-only --readme README.md

Each bottleneck trains the same config (`--variant`, by default `demo`: mask head, 2 s
windows, batch 6, its losses, cosine schedule over `--steps`) with only `model.bottleneck`
swapped (configs/rqvae.py `set_bottleneck`: 'vq' = one codebook of `--vq-codebook-size`
codes, by default 1024: from the released VQ-VAE's search space (512, 1024; released 8092),
and as many code vectors as the demo RQ-VAE's 4 x 256; 'gaussian' = the per-frame VAE
latent), in
OUT/<bottleneck>/ (an existing workdir resumes, a finished one is only evaluated), then runs
the evaluation protocol on `--split` (rqvae_jax.evaluation). Writes OUT/comparison.json (the
budget, the machine, per bottleneck: SI-SDRi non-silent and MSDM, mean and per stem, wall
times, code usage; the all-zero and mixture/4 baselines) and OUT/comparison.md (the table);
with `--readme`, the table replaces the block between the README's markers. Rows of other
bottlenecks already in OUT/comparison.json for the same budget are kept, so the three may run
as three processes (`--bottlenecks vq`, ...); `--table-only` redoes the table and the README
from OUT/comparison.json without training or evaluating.
"""
import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Sequence

from benchmarks import machine

BEGIN, END = '<!-- compare_bottlenecks:begin -->', '<!-- compare_bottlenecks:end -->'
LABELS = {'rvq': 'RQ-VAE (rvq)', 'vq': 'VQ-VAE (vq)', 'gaussian': 'VAE (gaussian)'}


def bottleneck_config(kind: str, variant: str, steps: int, vq_codebook_size: int):
  """The variant's config with its bottleneck swapped and `steps` training steps."""
  from configs.rqvae import get_config, set_bottleneck
  config = set_bottleneck(get_config(variant), kind, vq_codebook_size)
  config.num_train_steps = int(steps)
  return config


def _figures(section: Dict[str, Any]) -> Dict[str, Any]:
  return {fig: {'mean': section[fig]['mean'], 'per_stem': section[fig]['per_stem_mean']}
          for fig in ('nonsilent', 'msdm')}


def run(out: str, steps: int, kinds: Sequence[str], variant: str = 'demo',
        vq_codebook_size: int = 1024, split: str = 'test', checkpoint: str = 'latest'
        ) -> Dict[str, Any]:
  from rqvae_jax import evaluation, training
  result: Dict[str, Any] = {
      'budget': None, 'split': split, 'checkpoint': checkpoint, 'variant': variant,
      'cpu': machine.cpu_model(), 'cpu_flags': machine.cpu_flags(),
      'date': time.strftime('%Y-%m-%d %H:%M'), 'bottlenecks': {}, 'baselines': None}
  os.makedirs(out, exist_ok=True)
  for kind in kinds:
    config = bottleneck_config(kind, variant, steps, vq_codebook_size)
    workdir = os.path.join(out, kind)
    t0 = time.time()
    training.train_and_evaluate(config, workdir)
    t1 = time.time()
    metrics = evaluation.evaluate(config, workdir, split, checkpoint, verbose=False)
    t2 = time.time()
    q = config.model.quantizer
    result['budget'] = {'steps': int(steps), 'batch_size': int(config.batch_size),
                        'segment_seconds': config.data.segment_samples / config.data.sample_rate,
                        'lr': float(config.optim.lr), 'decay': config.optim.decay}
    result['bottlenecks'][kind] = {
        **_figures(metrics['model']), 'workdir': workdir, 'step': metrics['checkpoint_step'],
        'quantizer': ({'num_quantizers': int(q.num_quantizers),
                       'codebook_size': int(q.codebook_size)} if kind != 'gaussian' else None),
        'codebook': metrics.get('codebook'), 'train_wall_s': round(t1 - t0, 1),
        'eval_wall_s': round(t2 - t1, 1), 'windows': metrics['windows_kept']}
    result['baselines'] = {name: _figures(v) for name, v in metrics['baselines'].items()}
    _write(out, result)          # after each bottleneck: a cut-short run keeps what it has
    print(markdown_table(result), file=sys.stderr, flush=True)
  return result


def _write(out: str, result: Dict[str, Any]) -> None:
  """Writes the JSON and the table, keeping the rows of other bottlenecks an earlier (or a
  concurrent: `--bottlenecks vq` beside `--bottlenecks gaussian`) run of the same budget,
  recipe and split left in OUT/comparison.json."""
  path = os.path.join(out, 'comparison.json')
  if os.path.exists(path):
    with open(path) as f:
      earlier = json.load(f)
    same = all(earlier.get(k) == result.get(k) for k in ('budget', 'split', 'checkpoint',
                                                            'variant'))
    if same:
      result['bottlenecks'] = {**{k: v for k, v in earlier['bottlenecks'].items()
                                  if k not in result['bottlenecks']}, **result['bottlenecks']}
      result['bottlenecks'] = {k: result['bottlenecks'][k] for k in LABELS
                               if k in result['bottlenecks']}
  for name, text in (('comparison.json', json.dumps(result, indent=2)),
                     ('comparison.md', markdown_table(result) + '\n')):
    tmp = os.path.join(out, f'.{name}.{os.getpid()}')
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, os.path.join(out, name))


def markdown_table(result: Dict[str, Any]) -> str:
  """SI-SDRi (dB) per stem and mean, non-silent and MSDM, for each bottleneck and baseline."""
  budget = result['budget'] or {}
  stems = None
  rows: List[str] = []
  entries = [(_label(k, v), v) for k, v in result['bottlenecks'].items()]
  if result['baselines']:
    entries += [('all-zero', result['baselines']['all_zero']),
                ('mixture/4', result['baselines']['mixture_over_4'])]
  for label, v in entries:
    stems = stems or list(v['nonsilent']['per_stem'])
    cells = []
    for fig in ('nonsilent', 'msdm'):
      cells += [_fmt(v[fig]['mean'])] + [_fmt(v[fig]['per_stem'][s]) for s in stems]
    rows.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  stems = stems or []
  head = (['non-silent mean'] + [f'ns {s}' for s in stems] + ['MSDM mean']
          + [f'MSDM {s}' for s in stems])
  title = (f"SI-SDRi (dB), {result['split']} split, checkpoint {result['checkpoint']}; "
           f"budget: {budget.get('steps')} steps x batch {budget.get('batch_size')} x "
           f"{budget.get('segment_seconds', 0):.2f} s windows each (`{result['variant']}` "
           f"recipe); {result['cpu']}, {result['date']}")
  return '\n'.join([title, '', '| | ' + ' | '.join(head) + ' |',
                    '|---|' + '---:|' * len(head)] + rows)


def _label(kind: str, entry: Dict[str, Any]) -> str:
  q = entry.get('quantizer')
  size = f", {q['num_quantizers']} x {q['codebook_size']} codes" if q else ''
  return LABELS.get(kind, kind).replace(')', f'{size})')


def _fmt(v) -> str:
  return '-' if v is None else f'{v:.2f}'


def update_readme(path: str, table: str) -> None:
  """Replaces the text between BEGIN and END in the README with `table` (markers required)."""
  with open(path) as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    raise ValueError(f'{path} has no {BEGIN} ... {END} block to fill; add the two markers '
                     'where the table belongs.')
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  with open(path, 'w') as f:
    f.write(f'{head}{BEGIN}\n{table}\n{END}{tail}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='folder for the workdirs and the table')
  parser.add_argument('--steps', type=int, default=0, help='training steps per bottleneck')
  parser.add_argument('--table-only', action='store_true',
                      help='only rebuild the table (and --readme) from OUT/comparison.json')
  parser.add_argument('--bottlenecks', default='rvq,vq,gaussian')
  parser.add_argument('--variant', default='demo')
  parser.add_argument('--vq-codebook-size', type=int, default=1024)
  parser.add_argument('--split', default='test')
  parser.add_argument('--checkpoint', default='latest', help="'latest' (the budget's end) or 'best'")
  parser.add_argument('--readme', default='', help='README whose marked block gets the table')
  args = parser.parse_args(argv)
  if args.table_only:
    with open(os.path.join(args.out, 'comparison.json')) as f:
      result = json.load(f)
    if args.readme:
      update_readme(args.readme, markdown_table(result))
    print(markdown_table(result))
    return result
  kinds = [k.strip() for k in args.bottlenecks.split(',') if k.strip()]
  bad = [k for k in kinds if k not in LABELS]
  if bad or args.steps < 1:
    parser.error(f'--bottlenecks takes rvq, vq, gaussian (got {bad}); --steps must be >= 1.')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  result = run(args.out, args.steps, kinds, args.variant, args.vq_codebook_size, args.split,
               args.checkpoint)
  if args.readme:
    update_readme(args.readme, markdown_table(result))
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  sys.exit(main() and 0)
