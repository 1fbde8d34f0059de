"""sea_jax: SEA (Supervised Embedding Alignment) for multimodal LLMs in JAX/Flax."""
