"""Trains an RQ-VAE separator.

  python train.py --config configs/rqvae.py[:variant] --workdir DIR [--config.optim.lr=5e-4 ...]

(`rqvae-train` after `pip install`: the same command, rqvae_jax/commands.py.) A second run
with the same command resumes from DIR's latest checkpoint. Resuming compares the config
with the saved one: fields that shape the state or the data must match (the error names
them); rqvae_jax/resume.py lists those that may change (lr, steps, logging...), and
--allow-changed=FIELD[,FIELD] accepts others you know to be safe. --config also takes a
bundled config by name (rqvae:demo). Errors are one line; --verbose adds the traceback.
"""
from rqvae_jax import commands

if __name__ == '__main__':
  commands.train()
