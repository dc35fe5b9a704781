"""Evaluates a trained workdir on a split with the SI-SDRi protocol.

  python eval.py --workdir DIR [--split test] [--checkpoint best|latest|STEP] [--shifts N]
                 [--config configs/rqvae.py:variant --config.data.root=...]

(`rqvae-eval` after `pip install`: the same command, rqvae_jax/commands.py.) Without
--config the workdir's saved config is used; with it, its model fields must match the
checkpoint's. Writes DIR/eval/<split>/metrics.json and example WAVs, prints a table.
Errors are one line; --verbose adds the traceback.
"""
from rqvae_jax import commands

if __name__ == '__main__':
  commands.evaluate()
