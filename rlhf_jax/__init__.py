"""rlhf_jax: a pure-JAX functional research codebase for aligning language models."""

__version__ = "0.1.0"
