"""GRPO on the two-hop world: configs/world_two_hop_igpo.py with information gain off (outcome
reward only). Everything else is the IGPO arm's. Record: bench/results/world_two_hop.md.

    python -m igpo_jax.train --config=configs/world_two_hop_grpo.py
"""

from igpo_jax.config_base import sibling_config


def get_config():
    c = sibling_config(__file__, "world_two_hop_igpo")
    c.run_dir = "runs/world_two_hop_grpo"
    c.algorithm.use_info_gain = False
    return c
