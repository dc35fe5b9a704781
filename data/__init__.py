"""Datasets for rqvae-jax: Slakh2100 (prepared layout), the synthetic default, eval windows."""
