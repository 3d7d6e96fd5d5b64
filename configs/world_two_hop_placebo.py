"""The placebo on the two-hop world: configs/world_two_hop_igpo.py with each group's information
gains permuted among its turn slots before normalisation (seeded by the run's seed and the step):
the same rewards, no credit to the turn that earned one. If IGPO's gain over GRPO is credit
assignment, this arm does not get it. A control. Record: bench/results/world_two_hop.md.

    python -m igpo_jax.train --config=configs/world_two_hop_placebo.py
"""

from igpo_jax.config_base import sibling_config


def get_config():
    c = sibling_config(__file__, "world_two_hop_igpo")
    c.run_dir = "runs/world_two_hop_placebo"
    c.algorithm.shuffle_info_gain = True
    return c
