"""rqvae-jax: a JAX/Flax residual-quantized VAE that separates a mixture into four stems."""
