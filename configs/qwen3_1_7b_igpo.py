"""IGPO on a small Qwen3 (1.7B) on one GPU: 8 questions × 8 rollouts, up to 6 turns.

    python -m igpo_jax.train --config=configs/qwen3_1_7b_igpo.py --config.model.path=/ckpt/Qwen3-1.7B \\
        --config.data.train_files=data/train.parquet --config.data.test_files=data/test.parquet

Meant for one 80 GB GPU (fp32 master weights, bf16 compute, remat). Plan it first:
`python -m igpo_jax.plan --config=configs/qwen3_1_7b_igpo.py --devices=1 --device=H100-80G`
says a 148 GB peak at these settings (the KV cache of 64 rows × 16384 slots is 120 GB;
2026-12-07): bound --config.rollout.max_concurrent_rows (e.g. 16) before a run.
Qwen3's chat template has its own <think> handling; the forced prefix stays '<think>'.
Not run here yet: no record in bench/results/.
"""

from igpo_jax.config_base import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/qwen3_1_7b_igpo"
    c.model.path = "/ckpt/Qwen3-1.7B"
    # float32 master weights, bf16 compute (the reference's FSDP mixed precision): bf16 params
    # would not train at lr 1e-6 (config_base.validate says why)
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.attention = "blockwise"  # O(length) attention memory in forward and backward
    c.model.attention_block = 512
    # on an NVIDIA GPU, the update's and π_ref's attention (right-padded rows, unpacked, no shared
    # prefix: micro-batches of 4 < n = 8) runs cuDNN's fused kernel; the IG copies stay blockwise
    c.model.gpu_fused_attention = True
    c.rollout.dtype = "bfloat16"
    c.data.train_files = "data/train.parquet"
    c.data.test_files = "data/test.parquet"
    c.data.train_batch_size = 8
    c.rollout.n = 8
    c.rollout.today = "2026-01-01"  # the system prompt's {today}, pinned: the same prompts on any day
    c.rollout.max_turns = 6
    c.rollout.max_new_tokens = 1024
    c.rollout.context_length = 16384
    c.actor.micro_batch_size = 4
    c.trainer.total_training_steps = 100
    return c
