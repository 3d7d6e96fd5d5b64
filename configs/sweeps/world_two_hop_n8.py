"""Issue 33's second attempt: the two-hop arms with groups of 8 rollouts (the paper's own knob).

    python -m igpo_jax.sweep configs/sweeps/world_two_hop_n8.py [--launch]   # one after another
    python -m bench.sweep_summary runs/world_two_hop_n8

configs/sweeps/world_two_hop_arms.py with rollout.n 4 → 8 and 2 questions a step instead of 4:
the same 16 episodes a step, steps, learning rate and validation. Why (bench/results/
world_two_hop.md): in the first attempt no outcome-collapsed group had one rollout find the
answer's document and another not, so IG had nothing to credit that the outcome did not;
more rollouts of a question make such a split likelier. IGPO and GRPO × seeds 0, 1, 2.
"""

BASE_CONFIG = "configs/world_two_hop_igpo.py"

SHARED = {"rollout.n": 8, "data.train_batch_size": 2}  # both arms, never one alone
ARMS = {"igpo": {}, "grpo": {"algorithm.use_info_gain": False}}


def get_sweep():
    return {f"{arm}_seed{seed}": {**SHARED, **switch, "seed": seed} for seed in (0, 1, 2) for arm, switch in ARMS.items()}
