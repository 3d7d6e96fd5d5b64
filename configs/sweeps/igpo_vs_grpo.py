"""IGPO vs GRPO × 3 seeds on the embedded demo (6 runs):

    python -m igpo_jax.sweep configs/sweeps/igpo_vs_grpo.py [--launch]
    python -m igpo_jax.plot runs/igpo_vs_grpo/* --by_arm   # both methods' means and seeds on one figure
"""

from igpo_jax.sweep import igpo_and_grpo

BASE_CONFIG = "configs/demo.py"


def get_sweep():
    return igpo_and_grpo(seeds=(0, 1, 2))
