"""XLA flags the programs set before JAX starts its backends.

XLA's CPU scheduler optimises for concurrency by default: it keeps more buffers alive at once so
that independent ops can overlap. For the policy update that means ~2 extra param-sized fp32
copies (SmolLM2 demo: 4.2 GB of temporaries vs 2.2 GB with it off, measured with
`compiled.memory_analysis()`), which is the difference between fitting a laptop or not. Only
the CPU backend reads these flags; GPU/TPU runs are unaffected.

`FP32_TRAIN_STEP_COMPILER_OPTIONS` are per-program options (`jax.jit(..., compiler_options=...)`), so
the library gets them without any environment set-up.
"""

from __future__ import annotations

import os

CPU_MEMORY_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def add_cpu_memory_flags(environ=os.environ) -> None:
    """Append CPU_MEMORY_FLAGS to XLA_FLAGS unless the user already set them (theirs win).

    Call before the first JAX operation (flags are read once, when the backend starts)."""
    current = environ.get("XLA_FLAGS", "")
    for flag in CPU_MEMORY_FLAGS:
        if flag.split("=")[0] not in current:
            current = f"{current} {flag}".strip()
    environ["XLA_FLAGS"] = current


# By default XLA's CPU backend hands each dot to YNNPACK on its own (timed the same as
# LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT) and fuses the elementwise ops around it into plain loops;
# the weight-gradient dots of the backward pass want their inputs transposed, and XLA then
# fuses that transpose into the elementwise producer: the SwiGLU backward
# became a strided write reading four [B·T, F] arrays (~75 ms per layer and micro-batch for
# SmolLM2, 2.9 s of a 31 s train step). With YNNPACK fusing around dots, the transposes are plain
# one-array copies (0.2 s in all) and the SmolLM2 train step (8 × 512 tokens) took 26.9 s instead of
# 30.3 s on the 2-core dev machine. Forward-only programs (scoring, π_old log-probs) measured the
# same either way, and a bf16-compute train step was slower with it (25.8 s against 16.7 s), so
# only the fp32 gradient program uses it. The field is CPU-only: other backends ignore it.
FP32_TRAIN_STEP_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
