"""Shared by the benchmarks: the SmolLM2 models (ours and transformers') and a timer."""

from __future__ import annotations

import os
import statistics
import time

CPU_MATMUL_PEAK_FLOPS = 175e9  # measured fp32 matmul peak of the 2-core dev machine (DESIGN.md)


def timed(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` runs (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_smollm2(dtype: str = "float32"):
    """transformers + torch (CPU, fp32 unless `dtype` says) loading the same GGUF file, with as many
    threads as cores."""
    import torch
    from transformers import AutoModelForCausalLM

    from igpo_jax.model.embedded import smollm2_gguf_path

    torch.set_num_threads(os.cpu_count() or 1)
    folder, name = os.path.split(smollm2_gguf_path())
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype)).eval()


def forward_flops(cfg, tokens: int, context: int) -> float:
    """Matmul FLOPs of a forward over `tokens` tokens attending to ~`context` keys each."""
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = 2 * d * (n * h + 2 * k * h) + 2 * n * h * d + 3 * 2 * d * f + 2 * 2 * n * h * context
    return tokens * (cfg.num_layers * per_layer + 2 * d * cfg.vocab_size)
