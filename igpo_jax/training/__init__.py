"""The update: π_θ, π_old and π_ref log-probs, mini- and micro-batches, the loss's gradients and
the optax step (update.py), the optimiser step one parameter leaf at a time (leafwise.py),
token-budget packing of micro-batches (packing.py), and checkpoints of params, optimiser and
data-iterator state (checkpoint.py). May import model/, igpo/ (the loss) and runtime/; never
rollout/, the entry points or the run's config.
"""
