"""dsran_jax: Dual Semantic Relations Attention Network (DSRAN) in JAX/Flax."""
__version__ = "0.1.0"
