"""Times BiLSTM forward+backward (jit) per scan `unroll`, the CPU kernel (impl='native'),
and torch.nn.LSTM.

Prints one JSON line: median wall and process-CPU seconds per step for
B in --batches, T=441, In=H=256, 2 layers (the model's LSTM). torch is timed
only if /tmp/original-rqvae-venv exists (built by ../shared/original/bench.sh).
On a busy shared machine wall times are noisy (torch's OpenMP threads degrade
badly when oversubscribed); `--threads 1` with CPU time compares most stably.

Usage: python -m benchmarks.lstm_speed [--batches 2,16] [--unrolls 1,2,4,8]
                                        [--threads 1] [--reps 7]
"""

import argparse
import json
import os
import subprocess
import time

T, IN, H, LAYERS = 441, 256, 256, 2      # defaults: the paper model's BiLSTM
TORCH_PYTHON = '/tmp/original-rqvae-venv/bin/python'

_TORCH_SCRIPT = r"""
import json, sys, time
import torch
b, t, n_in, h, layers, reps, threads = map(int, sys.argv[1:])
if threads:
  torch.set_num_threads(threads)
torch.manual_seed(0)
lstm = torch.nn.LSTM(n_in, h, layers, bidirectional=True, batch_first=True)
x = torch.randn(b, t, n_in, requires_grad=True)
def step():
  lstm.zero_grad(); x.grad = None
  y, _ = lstm(x)
  (y ** 2).mean().backward()
for _ in range(2):
  step()
wall, cpu = [], []
for _ in range(reps):
  w0, c0 = time.perf_counter(), time.process_time()
  step()
  wall.append(time.perf_counter() - w0); cpu.append(time.process_time() - c0)
med = lambda v: sorted(v)[len(v) // 2]
print(json.dumps({'wall': med(wall), 'cpu': med(cpu),
                  'threads': torch.get_num_threads()}))
"""


def _median(values):
  return sorted(values)[len(values) // 2]


def time_jax(batch, unroll, reps, impl='scan', frames=T, hidden=H):
  """Median wall and CPU seconds of one jit'd forward+backward."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rqvae_jax import lstm as lstm_lib  # pylint: disable=g-import-not-at-top

  old = lstm_lib.SCAN_UNROLL
  lstm_lib.SCAN_UNROLL = unroll  # read at trace time
  try:
    model = lstm_lib.BiLSTM(hidden_size=hidden, num_layers=LAYERS, impl=impl)
    x = jax.random.normal(jax.random.key(1), (batch, frames, hidden))
    params = model.init(jax.random.key(0), x)['params']
    # Gradients w.r.t. params and input, as inside the model.
    grad_fn = jax.jit(jax.grad(
        lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2),
        argnums=(0, 1)))
    for _ in range(2):  # compile, warm-up
      jax.block_until_ready(grad_fn(params, x))
    wall, cpu = [], []
    for _ in range(reps):
      w0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(grad_fn(params, x))
      wall.append(time.perf_counter() - w0)
      cpu.append(time.process_time() - c0)
    return {'wall': round(_median(wall), 4), 'cpu': round(_median(cpu), 4)}
  finally:
    lstm_lib.SCAN_UNROLL = old


def time_torch(batch, reps, threads, frames=T, hidden=H):
  out = subprocess.run(
      [TORCH_PYTHON, '-c', _TORCH_SCRIPT, str(batch), str(frames), str(hidden), str(hidden),
       str(LAYERS), str(reps), str(threads)],
      check=True, capture_output=True, text=True)
  res = json.loads(out.stdout.strip().splitlines()[-1])
  return {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batches', default='2,16')
  parser.add_argument('--unrolls', default='1,2,4,8')
  parser.add_argument('--reps', type=int, default=7)
  parser.add_argument('--frames', type=int, default=T, help='sequence length')
  parser.add_argument('--hidden', type=int, default=H, help='input and hidden size')
  parser.add_argument('--threads', type=int, default=0,
                      help='1: single-threaded XLA and torch; 0: defaults')
  args = parser.parse_args()
  if args.threads == 1:  # must be set before jax initialises its backend
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') +
        ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1')
  import jax  # pylint: disable=g-import-not-at-top
  from rqvae_jax import lstm as lstm_lib  # pylint: disable=g-import-not-at-top

  batches = [int(b) for b in args.batches.split(',')]
  unrolls = [int(u) for u in args.unrolls.split(',')]
  result = {'backend': jax.default_backend(), 'cpus': os.cpu_count(),
            'threads': args.threads or 'default', 'T': args.frames, 'In': args.hidden, 'H': args.hidden,
            'layers': LAYERS, 'chosen_unroll': lstm_lib.SCAN_UNROLL,
            'jax_fwd_bwd_s': {}}
  for b in batches:
    result['jax_fwd_bwd_s'][f'B={b}'] = {
        f'unroll={u}': time_jax(b, u, args.reps, frames=args.frames, hidden=args.hidden)
        for u in unrolls}
  from rqvae_jax import native as native_lib  # pylint: disable=g-import-not-at-top
  native = native_lib.usable()
  if native:
    result['jax_native_fwd_bwd_s'] = {
        f'B={b}': time_jax(b, 1, args.reps, 'native', args.frames, args.hidden)
        for b in batches}
  if os.path.exists(TORCH_PYTHON):
    result['torch_fwd_bwd_s'] = {}
    result['jax_over_torch'] = {}
    for b in batches:
      tt = time_torch(b, args.reps, args.threads, args.frames, args.hidden)
      result['torch_fwd_bwd_s'][f'B={b}'] = tt
      per = result['jax_fwd_bwd_s'][f'B={b}']
      ours = per.get(f'unroll={lstm_lib.SCAN_UNROLL}') or min(
          per.values(), key=lambda d: d['cpu'])
      result['jax_over_torch'][f'B={b}'] = {
          k: round(ours[k] / tt[k], 3) for k in ('wall', 'cpu')}
      if native:
        kernel = result['jax_native_fwd_bwd_s'][f'B={b}']
        result.setdefault('native_over_torch', {})[f'B={b}'] = {
            k: round(kernel[k] / tt[k], 3) for k in ('wall', 'cpu')}
  print(json.dumps(result))


if __name__ == '__main__':
  main()
