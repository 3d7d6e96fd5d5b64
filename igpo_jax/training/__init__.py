"""Optimiser plumbing: how an optax transformation is applied to the policy's parameters."""
