"""The two-hop world's four arms (issue 33), one switch each from configs/world_two_hop_igpo.py:
IGPO and GRPO × seeds 0, 1, 2; IG-only and the placebo × seed 0 (add seeds when time allows).
The fifth, GRPO with dynamic sampling (grpo_ds), at the others' generated rollouts: 12 steps of
4 questions × 4 rollouts = 192, where the other arms end anyway; its extra rounds spend the
budget sooner, so it validates and ends at an earlier step (sweep_summary's "final" pairs it).

    python -m igpo_jax.sweep configs/sweeps/world_two_hop_arms.py [--launch]   # one after another
    python -m bench.sweep_summary runs/world_two_hop_arms

Seed by seed, so that a sweep cut short holds every arm for the seeds it ran; runs resume, so it
may run in parts. Each run ≤ 30 minutes on the 2-core machine (bench/results/world_two_hop.md).
"""

BASE_CONFIG = "configs/world_two_hop_igpo.py"

# arm → the one switch that makes it (the IGPO arm is the base config itself)
ARMS = {"igpo": {}, "grpo": {"algorithm.use_info_gain": False},
        "ig_only": {"algorithm.use_outcome_reward": False}, "placebo": {"algorithm.shuffle_info_gain": True},
        "grpo_ds": {"algorithm.use_info_gain": False, "algorithm.filter_groups.enable": True,
                    "trainer.rollout_budget": 192}}
SEEDS = {"igpo": (0, 1, 2), "grpo": (0, 1, 2), "ig_only": (0,), "placebo": (0,), "grpo_ds": (0,)}


def get_sweep():
    runs = {}
    for seed in (0, 1, 2):
        for arm, switch in ARMS.items():
            if seed in SEEDS[arm]:
                runs[f"{arm}_seed{seed}"] = {**switch, "seed": seed}
    return runs
