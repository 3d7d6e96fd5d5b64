"""The GRPO baseline of the paper: qwen2_5_7b_igpo.py with information gain off (outcome reward
only, one advantage for every generated token of a rollout). Same command, other config:

    python -m igpo_jax.train --config=configs/qwen2_5_7b_grpo.py --config.model.path=/ckpt/Qwen2.5-7B-Instruct

Expect lower F1 than IGPO at equal steps (paper: 53.9 vs 60.2 average for the best baseline).
"""

import importlib.util
import os


def _igpo_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_7b_igpo.py")
    spec = importlib.util.spec_from_file_location("qwen2_5_7b_igpo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _igpo_config()
    c.run_dir = "runs/qwen2_5_7b_grpo"
    c.algorithm.use_info_gain = False
    return c
