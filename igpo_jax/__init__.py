"""igpo_jax: Information Gain-based Policy Optimization for multi-turn search agents, in JAX."""

__version__ = "0.1.0"
