"""IGPO vs GRPO × 3 seeds on the embedded demo (6 runs):

    python -m igpo_jax.sweep configs/sweeps/igpo_vs_grpo.py [--launch]
    python -m igpo_jax.plot runs/igpo_vs_grpo/*      # both methods on one figure
"""

from igpo_jax.sweep import grid

BASE_CONFIG = "configs/demo.py"


def get_sweep():
    runs = {}
    for point in grid(use_info_gain=[True, False], seed=[0, 1, 2]):
        name = f"{'igpo' if point['use_info_gain'] else 'grpo'}_seed{point['seed']}"
        runs[name] = {"algorithm.use_info_gain": point["use_info_gain"], "seed": point["seed"]}
    return runs
