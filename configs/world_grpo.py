"""The GRPO baseline on the embedded world: configs/world_igpo.py with information gain off
(outcome reward only: one advantage for every generated token of a rollout). Same command:

    python -m igpo_jax.train --config=configs/world_grpo.py
    python -m bench.learning --config=configs/world_grpo.py

Everything else (prompt, forced prefixes, world, held-out validation, lr, batch, steps) is
world_igpo's, so the two arms differ only in the switch. What to expect: the groups in which every
rollout scores the same give GRPO no gradient (diag/collapse_frac); IGPO still has the search
turn's information gain there when the group's searches differ. Time per run: ~17 minutes on 2
cores (2026-12-06; world_igpo's docstring has both arms' curves and why they run level here).
"""

from igpo_jax.config_base import sibling_config


def get_config():
    c = sibling_config(__file__, "world_igpo")
    c.run_dir = "runs/world_grpo"
    c.algorithm.use_info_gain = False
    return c
