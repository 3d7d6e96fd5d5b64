"""IG-only on the two-hop world (the paper's Table 3 ablation): configs/world_two_hop_igpo.py with
the outcome reward left out of the advantages, which come from the information gains alone.
A departure from IGPO, a control. Record: bench/results/world_two_hop.md.

    python -m igpo_jax.train --config=configs/world_two_hop_ig_only.py
"""

from igpo_jax.config_base import sibling_config


def get_config():
    c = sibling_config(__file__, "world_two_hop_igpo")
    c.run_dir = "runs/world_two_hop_ig_only"
    c.algorithm.use_outcome_reward = False
    return c
