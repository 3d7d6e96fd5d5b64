"""The GRPO baseline of the paper: qwen2_5_7b_igpo.py with information gain off (outcome reward
only, one advantage for every generated token of a rollout). Same command, other config:

    python -m igpo_jax.train --config=configs/qwen2_5_7b_grpo.py --config.model.path=/ckpt/Qwen2.5-7B-Instruct

Expect lower F1 than IGPO at equal steps (paper: 53.9 vs 60.2 average for the best baseline).
Not run here yet; record (the shared memory plan): bench/results/qwen2_5_7b_igpo.md.
"""

from igpo_jax.config_base import sibling_config


def get_config():
    c = sibling_config(__file__, "qwen2_5_7b_igpo")
    c.run_dir = "runs/qwen2_5_7b_grpo"
    c.algorithm.use_info_gain = False
    return c
