"""The GRPO baseline on the embedded world: configs/world_igpo.py with information gain off
(outcome reward only: one advantage for every generated token of a rollout). Same command:

    python -m igpo_jax.train --config=configs/world_grpo.py
    python -m bench.learning --config=configs/world_grpo.py

Everything else (prompt, forced prefixes, world, held-out validation, lr, batch, steps) is
world_igpo's, so the two arms differ only in the switch. The groups in which every rollout scores
the same give GRPO no gradient (diag/collapse_frac); IGPO still has the search turn's information
gain there when the group's searches differ.

Expect ~17 minutes a run on 2 cores and validation no-format F1 from 0.438 at step 0 to 0.865 at
step 12 (mean of 3 seeds, 2026-12-06), level with IGPO. Record (both arms' runs, and why they run
level here): bench/results/world_igpo.md.
"""

from igpo_jax.config_base import sibling_config


def get_config():
    c = sibling_config(__file__, "world_igpo")
    c.run_dir = "runs/world_grpo"
    c.algorithm.use_info_gain = False
    return c
