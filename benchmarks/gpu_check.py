"""The GPU check: one command, one JSON file of what a lent GPU is worth to this project.

  bash benchmarks/gpu_check.sh --out $OUT/gpu_check.json        # on the GPU machine
  bash benchmarks/gpu_check.sh --dry --out /tmp/gpu_check.json   # the same on the CPU, tiny

(the shell script installs the venv with JAX's CUDA wheels and then runs this module). The
sections, in order:

  environment   device, jax / jaxlib / CUDA plugin versions, CPU model and flags, nvidia-smi
  gpu_tests     `pytest -m gpu`: cuDNN BiLSTM vs the scan path, every conv form vs XLA's
                conv on the device (outcome and time of each test)
  choice        conv form (model.conv_impl 'matmul' vs 'xla': the model's forward+backward)
                and LSTM (lstm_impl 'scan' vs 'cudnn': the BiLSTM's forward+backward), timed;
                the faster of each is used by every later section and recorded
  train         the paper configuration's training step at batch 16, float32 then bfloat16:
                compile time, steps/s, hours for 60k steps, device memory, the loss after N
                steps on one fixed batch (the two precisions' losses side by side)
  separate      separation of 4 s chunks and of a 3-minute song, float32 and bfloat16:
                audio-seconds per second and the real-time factor
  short_training the demo config trained on the synthetic set for what time is left, with
                its validation SI-SDRi (what quality a few GPU minutes buy)

Each section runs under its own time budget (SIGALRM) within a global deadline; one that
fails or runs out of time records its error and the next one runs. The JSON is rewritten
atomically after every section and each result is printed as it comes, so a run that is
killed still leaves the finished sections' numbers. `--dry` runs every section on the CPU
with the smoke model and tiny sizes (tests/test_gpu_check.py), so the script is known to
work before a GPU is lent; on the CPU the GPU tests are skipped by pytest but the section's
plumbing runs.
"""
import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree

import numpy as np

from benchmarks import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds per section on the GPU (the shell script's whole budget is ~8 min, install included);
# the last section takes whatever is left.
BUDGETS = {'environment': 15, 'gpu_tests': 80, 'choice': 45, 'train': 110, 'separate': 60,
           'short_training': 600}
# Dry mode takes about a minute on a 2-core CPU; its budgets only stop a hang (a busy CI
# machine can be several times slower).
DRY_BUDGETS = {'environment': 30, 'gpu_tests': 120, 'choice': 120, 'train': 150, 'separate': 120,
               'short_training': 180}
# Dry mode: the smoke model with three conv blocks, one LSTM layer, one mel scale (compiles
# in seconds on a CPU).
DRY_MODEL = {'model.channels': (4, 8, 16), 'model.kernels': (3, 7, 7),
             'model.strides': (1, 5, 5), 'model.lstm_layers': 1,
             'loss.mel_window_powers': (6,)}
GPU_TEST_FILES = ('tests/test_lstm.py', 'tests/test_blocks.py')


class SectionTimeout(Exception):
  """A section ran past its time budget."""


@contextlib.contextmanager
def time_limit(seconds: float):
  """Raises SectionTimeout in the main thread after `seconds` (between Python bytecodes, so a
  compile in progress finishes first)."""
  def handler(signum, frame):
    raise SectionTimeout(f'ran past its budget of {seconds:.0f} s')
  previous = signal.signal(signal.SIGALRM, handler)
  signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


class Report:
  """The JSON document, rewritten atomically (temporary file + rename) after each section."""

  def __init__(self, path: str, header: dict):
    self.path = path
    self.doc = {**header, 'sections': {}, 'finished': False}
    self.write()

  def write(self) -> None:
    directory = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.gpu_check-', suffix='.json')
    with os.fdopen(fd, 'w') as f:
      json.dump(self.doc, f, indent=1, default=str)
    os.replace(tmp, self.path)

  def section(self, name: str, result: dict) -> None:
    self.doc['sections'][name] = result
    self.write()
    print(json.dumps({name: result}, default=str), flush=True)


def run_section(report: Report, name: str, fn, budget: float, deadline: float) -> dict:
  """Runs fn() within min(budget, time to the deadline); records ok/error/timeout/skipped."""
  left = deadline - time.time()
  if left < 3:
    result = {'status': 'skipped', 'error': f'global deadline reached ({left:.0f} s left)'}
    report.section(name, result)
    return result
  limit = min(budget, left - 2)
  t = time.time()
  partial: dict = {}
  try:
    with time_limit(limit):
      out = fn(partial)
    result = {'status': 'ok', **(out or {})}
  except SectionTimeout as e:
    result = {'status': 'timeout', 'error': str(e), **partial}
  except Exception as e:  # pylint: disable=broad-except   (a section's failure is a result)
    result = {'status': 'error', 'error': f'{type(e).__name__}: {e}',
              'traceback': traceback.format_exc()[-3000:], **partial}
  result['seconds'] = round(time.time() - t, 1)
  result['budget_s'] = round(limit, 1)
  report.section(name, result)
  return result


def make_config(variant: str, dry: bool, choice: dict, **overrides):
  sys.path.insert(0, REPO)
  from configs.rqvae import get_config  # pylint: disable=g-import-not-at-top
  cfg = get_config('smoke' if dry else variant)
  if dry:
    cfg.update_from_flattened_dict(DRY_MODEL)
  cfg.model.conv_impl = choice.get('conv_impl', cfg.model.conv_impl)
  cfg.model.lstm_impl = choice.get('lstm_impl', cfg.model.lstm_impl)
  cfg.update_from_flattened_dict(overrides)
  return cfg


# ---------------------------------------------------------------- sections

def environment(install: dict):
  def run(partial):
    import jax
    import jaxlib
    from importlib import metadata
    dev = jax.devices()[0]
    out = {'platform': dev.platform, 'device_kind': dev.device_kind,
           'device_count': jax.device_count(), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
           'platform_version': getattr(dev.client, 'platform_version', ''),
           'python': platform.python_version(), 'host': platform.node(),
           'cpu_model': machine.cpu_model(), 'cpu_flags': machine.cpu_flags(),
           'cpu_count': os.cpu_count(), 'code': machine.code_commit(), 'install': install}
    def versions(names):
      found = {}
      for name in names:
        try:
          found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
          pass
      return found
    out['cuda_packages'] = versions(('jax-cuda12-plugin', 'jax-cuda12-pjrt', 'nvidia-cudnn-cu12',
                                     'jax-cuda13-plugin', 'jax-cuda13-pjrt', 'nvidia-cudnn-cu13'))
    # The machine's own Python may differ from the lock (requirements.txt): say what ran.
    out['packages'] = versions(('flax', 'optax', 'orbax-checkpoint', 'numpy', 'scipy',
                                'ml-collections', 'clu', 'tensorflow', 'tensorflow-cpu',
                                'soundfile', 'soxr'))
    try:
      smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                            '--format=csv,noheader'], capture_output=True, text=True, timeout=10)
      out['nvidia_smi'] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
      out['nvidia_smi'] = f'unavailable ({e})'
    stats = dev.memory_stats() if dev.platform != 'cpu' else None
    if stats:
      out['device_memory_limit_gib'] = round(stats.get('bytes_limit', 0) / 2**30, 2)
    return out
  return run


def gpu_tests(budget: float):
  """pytest -m gpu in a subprocess (on the CPU: collected and skipped, the plumbing runs)."""
  def run(partial):
    with tempfile.TemporaryDirectory() as tmp:
      xml = os.path.join(tmp, 'gpu.xml')
      command = [sys.executable, '-m', 'pytest', '-m', 'gpu', '-q', '-p', 'no:cacheprovider',
                 f'--junitxml={xml}', *GPU_TEST_FILES]
      partial['command'] = ' '.join(command[1:])
      try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=max(budget - 5, 5))
      except subprocess.TimeoutExpired as e:
        raise SectionTimeout(f'pytest ran past {budget - 5:.0f} s') from e
      partial['returncode'] = proc.returncode
      partial['output_tail'] = (proc.stdout + proc.stderr)[-2500:]
      if not os.path.exists(xml):
        raise RuntimeError(f'pytest wrote no report (exit {proc.returncode})')
      tests = {}
      for case in ElementTree.parse(xml).getroot().iter('testcase'):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        outcome = 'passed'
        for child in case:
          if child.tag in ('failure', 'error', 'skipped'):
            outcome = {'failure': 'failed'}.get(child.tag, child.tag)
            if outcome != 'skipped':
              partial.setdefault('failures', {})[name] = (child.get('message') or '')[:500]
        tests[name] = {'outcome': outcome, 'seconds': round(float(case.get('time', 0)), 2)}
    counts = {k: sum(t['outcome'] == k for t in tests.values())
              for k in ('passed', 'failed', 'error', 'skipped')}
    return {**partial, 'counts': counts, 'tests': tests}
  return run


def _median_time(fn, reps: int) -> float:
  import jax
  jax.block_until_ready(fn())          # compile and warm up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def time_each(candidates: dict, reps: int, partial: dict, key: str) -> str:
  """Times each candidate (name -> a function building and returning a timed callable) into
  partial[key], recording a candidate that raises under partial[key + '_errors'] instead of
  failing the section; returns the fastest name. Why: a form that breaks on this device
  (cuDNN's RNN on a JAX version this code has not met) must not leave the later sections on
  it (they use what `choice` picked)."""
  times = partial[key] = {}                 # filled in place: a timeout keeps what ran
  for name, build in candidates.items():
    try:
      times[name] = round(_median_time(build(), reps), 5)
    except Exception as e:  # pylint: disable=broad-except
      partial.setdefault(key + '_errors', {})[name] = f'{type(e).__name__}: {e}'[:800]
  if not times:
    raise RuntimeError(f'every candidate failed: {partial[key + "_errors"]}')
  return min(times, key=times.get)


def choice(dry: bool, chosen: dict):
  """Times model.conv_impl 'matmul' vs 'xla' (the whole model's forward + backward at the
  training batch) and lstm_impl 'scan' vs 'cudnn' (the BiLSTM alone); keeps the faster of
  those that run (until then, and if the section dies, the later sections use the portable
  'scan')."""
  def run(partial):
    import jax
    import jax.numpy as jnp
    from rqvae_jax import lstm as lstm_lib
    from rqvae_jax.model import RQVAE
    cfg = make_config('paper', dry, {})
    batch = 2 if dry else 16
    reps = 2 if dry else 5
    x = jnp.asarray(np.random.default_rng(0).normal(
        scale=0.05, size=(batch, cfg.data.segment_samples)).astype(np.float32))
    chosen['lstm_impl'] = 'scan'
    variables = jax.jit(functools.partial(RQVAE(cfg.model).init, train=False))(
        {'params': jax.random.PRNGKey(0)}, x[:1])      # the same variables for both forms

    def conv_form(impl):
      def build():
        cfg.model.conv_impl = impl
        model = RQVAE(cfg.model)

        def loss(params):
          (est, _), _ = model.apply({**variables, 'params': params}, x, train=True,
                                    rngs={'dropout': jax.random.PRNGKey(1)},
                                    mutable=['batch_stats', 'codebook_stats'])
          return jnp.mean(est ** 2)
        grad = jax.jit(jax.grad(loss))
        return lambda: grad(variables['params'])
      return build
    chosen['conv_impl'] = time_each({impl: conv_form(impl) for impl in ('matmul', 'xla')},
                                    reps, partial, 'conv_fwd_bwd_s')
    partial['conv_impl'] = chosen['conv_impl']

    hid, t_len = cfg.model.channels[-1], cfg.data.segment_samples
    for s in cfg.model.strides:
      t_len = -(-t_len // s)
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(batch, t_len, hid)).astype(np.float32))
    on_cuda = lstm_lib._on_cuda()  # pylint: disable=protected-access

    def lstm_form(impl):
      def build():
        net = lstm_lib.BiLSTM(hidden_size=hid, num_layers=cfg.model.lstm_layers, impl=impl)
        params = net.init(jax.random.PRNGKey(0), xs)['params']
        grad = jax.jit(jax.grad(lambda p, x: jnp.mean(net.apply({'params': p}, x) ** 2)))
        return lambda: grad(params, xs)
      return build
    chosen['lstm_impl'] = time_each(
        {impl: lstm_form(impl) for impl in ['scan'] + (['cudnn'] if on_cuda else [])},
        reps, partial, 'lstm_fwd_bwd_s')
    return {**partial, 'lstm_impl': chosen['lstm_impl'],
            'lstm_shape': {'batch': batch, 'frames': t_len, 'hidden': hid,
                           'layers': int(cfg.model.lstm_layers)},
            'note': None if on_cuda else 'cuDNN needs a CUDA GPU: scan only'}
  return run


def _device_memory():
  import jax
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != 'cpu' else None
  if not stats:
    return None
  return {'peak_gib_so_far': round(stats.get('peak_bytes_in_use', 0) / 2**30, 3),
          'in_use_gib': round(stats.get('bytes_in_use', 0) / 2**30, 3)}


def train_throughput(dry: bool, chosen: dict):
  """The paper config's train step at batch 16, float32 then bfloat16."""
  def run(partial):
    import jax
    from rqvae_jax import parallel, train_state, training
    batch = 2 if dry else 16
    steps, warmup = (2, 1) if dry else (20, 3)
    for dtype in ('float32', 'bfloat16'):
      cfg = make_config('paper', dry, chosen, **{'model.dtype': dtype, 'batch_size': batch})
      mesh = parallel.make_mesh()
      repl = parallel.replicated(mesh)
      state = parallel.replicate(train_state.create_train_state(cfg, jax.random.PRNGKey(0)), mesh)
      step = jax.jit(functools.partial(training.train_step, config=cfg),
                     in_shardings=(repl, parallel.data_sharded(mesh)), out_shardings=(repl, repl),
                     donate_argnums=(0,))
      rng = np.random.default_rng(0)
      host = (0.05 * rng.normal(size=(batch, cfg.data.segment_samples, 4))).astype(np.float32)
      data = parallel.shard_batch(host, mesh)
      t = time.perf_counter()
      compiled = step.lower(state, data).compile()
      compile_s = time.perf_counter() - t
      mem = compiled.memory_analysis()
      holder = {'state': state, 'losses': []}

      def one():
        holder['state'], m = compiled(holder['state'], data)
        holder['losses'].append(m['loss/total'])
        return m['loss/total']

      for _ in range(warmup):
        jax.block_until_ready(one())
      times = []
      for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(one())
        times.append(time.perf_counter() - t)
      med = float(np.median(times))
      losses = [float(v) for v in jax.device_get(holder['losses'])]
      partial[dtype] = {
          'batch': batch, 'compile_s': round(compile_s, 2), 'step_s_median': round(med, 5),
          'steps_per_s': round(1 / med, 3),
          'hours_for_60k_steps': round(60_000 * med / 3600, 2),
          'train_audio_s_per_s': round(batch * cfg.data.segment_samples
                                       / cfg.data.sample_rate / med, 1),
          'steps_run': len(losses), 'loss_first': losses[0], 'loss_after_steps': losses[-1],
          'compiled_memory_gib': None if mem is None else round(
              (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes) / 2**30, 3),
          'device_memory': _device_memory(),
          'conv_impl': cfg.model.conv_impl, 'lstm_impl': cfg.model.lstm_impl}
      del holder, state
    f32, b16 = partial['float32'], partial['bfloat16']
    return {**partial, 'bf16_speedup': round(f32['step_s_median'] / b16['step_s_median'], 3),
            'note': 'same fixed batch (Gaussian noise, 0.05) for both precisions; '
                    'loss_after_steps = total loss of the last of warm-up + timed steps'}
  return run


def separate_throughput(dry: bool, chosen: dict):
  def run(partial):
    from benchmarks import run as bench
    song = 5.0 if dry else 180.0
    steps, warmup = (1, 1) if dry else (5, 2)
    batch = 2 if dry else 16
    for dtype in ('float32', 'bfloat16'):
      cfg = make_config('paper', dry, chosen, **{'model.dtype': dtype})
      r = bench.bench_separate(cfg, batch, steps, warmup, song)
      r['chunk_real_time_factor'] = round(1 / r['separate_audio_s_per_s'], 5)
      r['song_real_time_factor'] = round(1 / r['song_audio_s_per_s'], 5)
      r['device_memory'] = _device_memory()
      partial[dtype] = r
    return {**partial, 'note': 'real_time_factor = processing seconds per audio second; '
                               'chunks of inference.chunk_samples, song through overlap-add'}
  return run


def short_training(dry: bool, chosen: dict, workdir: str):
  """Trains the demo config on the synthetic set until the budget, validating every
  `eval_every` steps; the validations so far are the result even if time runs out."""
  def run(partial):
    from rqvae_jax import training, validation
    cfg = make_config('demo', dry, chosen)
    if not dry:
      cfg.eval_every_steps = 200
    else:
      cfg.data.synthetic.cache_dir = os.path.join(workdir, 'synthetic')
    partial.update({'config': 'smoke' if dry else 'demo', 'num_train_steps': cfg.num_train_steps,
                    'batch_size': cfg.batch_size, 'eval_every_steps': cfg.eval_every_steps,
                    'validation_windows': cfg.num_eval_batches * cfg.batch_size,
                    'conv_impl': cfg.model.conv_impl, 'lstm_impl': cfg.model.lstm_impl})
    from rqvae_jax import bundled
    t = time.time()
    bundled.data_module('pipeline').resolve_root(cfg.data)      # generate the synthetic set
    partial['data_s'] = round(time.time() - t, 1)
    run_dir = os.path.join(workdir, 'run')
    history = os.path.join(run_dir, validation.VAL_HISTORY)
    t = time.time()
    try:
      training.train_and_evaluate(cfg, run_dir)
    finally:
      partial['train_s'] = round(time.time() - t, 1)
      if os.path.exists(history):
        with open(history) as f:
          rows = [json.loads(line) for line in f if line.strip()]
        partial['validations'] = [{k: (round(v, 3) if isinstance(v, float) else v)
                                   for k, v in r.items()} for r in rows]
        if rows:
          partial['last_step_validated'] = rows[-1]['step']
          partial['val_sisdri_mean_last'] = rows[-1]['val/sisdri_mean']
    return {**partial, 'completed_steps': cfg.num_train_steps}
  return run


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', required=True, help='the JSON file (rewritten after each section)')
  ap.add_argument('--dry', action='store_true', help='CPU, smoke model, tiny sizes')
  ap.add_argument('--deadline-s', type=float, default=0,
                  help='global budget in seconds from now (default: the sum of the budgets)')
  ap.add_argument('--sections', default='', help='comma-separated subset (default: all)')
  ap.add_argument('--install-json', default='', help='the shell script\'s install record')
  ap.add_argument('--budget-scale', type=float,
                  default=float(os.environ.get('GPU_CHECK_BUDGET_SCALE', '1')),
                  help='multiplies every section budget (a slow or busy machine)')
  args = ap.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if args.dry:
    os.environ['JAX_PLATFORMS'] = 'cpu'
  budgets = {k: v * args.budget_scale for k, v in (DRY_BUDGETS if args.dry else BUDGETS).items()}
  start = time.time()
  deadline = start + (args.deadline_s or sum(budgets.values()))
  install = {}
  if args.install_json and os.path.exists(args.install_json):
    with open(args.install_json) as f:
      install = json.load(f)
  report = Report(args.out, {
      'what': 'rqvae-jax GPU check (benchmarks/gpu_check.py)', 'mode': 'dry' if args.dry else 'gpu',
      'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'deadline_s': round(deadline - start, 1), 'budgets_s': budgets})
  sys.path.insert(0, REPO)
  from rqvae_jax import compilation_cache
  compilation_cache.enable()
  chosen: dict = {}
  with tempfile.TemporaryDirectory() as workdir:
    sections = [
        ('environment', environment(install)),
        ('gpu_tests', gpu_tests(budgets['gpu_tests'])),
        ('choice', choice(args.dry, chosen)),
        ('train', train_throughput(args.dry, chosen)),
        ('separate', separate_throughput(args.dry, chosen)),
        ('short_training', short_training(args.dry, chosen, workdir))]
    wanted = set(filter(None, args.sections.split(','))) or {n for n, _ in sections}
    for name, fn in sections:
      if name in wanted:
        run_section(report, name, fn, budgets[name], deadline)
  report.doc['choice'] = dict(chosen)
  report.doc['finished'] = True
  report.doc['total_s'] = round(time.time() - start, 1)
  report.write()
  print(json.dumps({'finished': True, 'total_s': report.doc['total_s'], 'choice': chosen}),
        flush=True)
  failed = [n for n, r in report.doc['sections'].items() if r['status'] != 'ok']
  return 1 if failed else 0


if __name__ == '__main__':
  code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  # The JSON is complete. A section cut short by its budget can leave threads (tf.data
  # readers, checkpoint writers) that crash the interpreter's teardown: skip it.
  os._exit(code)
