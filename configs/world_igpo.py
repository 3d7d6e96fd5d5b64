"""IGPO on the embedded world, sized for one sitting on 2 CPU cores: the learning experiment.

    python -m igpo_jax.train --config=configs/world_igpo.py
    python -m bench.learning --config=configs/world_igpo.py          # fresh run dir; ends in one JSON line
    python -m igpo_jax.sweep configs/sweeps/world_igpo_vs_grpo.py    # IGPO and GRPO × seeds 0, 1, 2

SmolLM2-135M-Instruct (embedded GGUF) on the synthetic world's one-hop questions whose answer is
a place or a year (the kinds the base model writes: one search finds the document that states
the answer), with the embedded BM25 retriever. A two-shot prompt; turn 1 is forced to open
`<search>`, turn 2 `<answer>`; 12 steps of 4 questions × 4 rollouts at lr 1e-5, no supervised
warm start. configs/world_grpo.py is this file with `algorithm.use_info_gain=False`.
Validation: greedy, the first 96 of 128 held-out questions (their entities are never asked about
in training), at steps 0 / 4 / 8 / 12; `val/no_format_f1_se` says how large a change is noise.

Expect ~17 minutes a run on 2 cores (a step 45-75 s, a validation ~80 s) and validation
no-format F1 from 0.438 at step 0 to 0.882 at step 12 (mean of 3 seeds, 2026-12-06), the format
error near 0. IGPO runs level with GRPO here: every group's searches find the same document, so
the information gain separates nothing; two-hop questions are the next experiment.
Record (per-seed tables, by question kind, why IGPO is level, probes, what was tried and dropped):
bench/results/world_igpo.md; curves: bench/results/world_igpo_vs_grpo.png.
"""

from igpo_jax.rollout.prompts import SEARCH_TAGS_FEW_SHOT_PROMPT
from igpo_jax.config_base import base_config

# One-hop question kinds answered by a place or a year (igpo_jax.data.world.QUESTION_KINDS)
ANSWERS_THE_BASE_MODEL_WRITES = (
    "person.birthplace", "person.birth_year", "company.city", "company.founded", "city.country",
    "country.capital", "university.city", "university.founded")


def get_config():
    c = base_config()
    c.run_dir = "runs/world_igpo"
    c.model.path = ""  # the embedded SmolLM2-135M-Instruct
    # the layers as one lax.scan: smaller programs, a faster start-up, the same tokens and loss
    c.model.scan_layers = True
    c.model.remat = False  # 16 rows of ≤ 400 tokens: activations are small, recomputing them is not
    c.data.synthetic_world = True
    c.data.world_questions = 320
    c.data.world_two_hop_fraction = 0.0  # one-hop first
    # questions whose answer is a place or a year, the two things the base model writes
    c.data.world_question_kinds = ANSWERS_THE_BASE_MODEL_WRITES
    c.data.world_test_fraction = 0.4  # 128 held-out test questions, 192 training questions
    c.data.train_batch_size = 4  # 4 questions × 4 rollouts: field types mixed within a step
    c.data.val_batch_size = 96  # one batch: the fp32 KV cache of 96 rows × 512 slots (val_context_length) is 2.3 GB
    c.data.val_max_questions = 96  # the first 96 of the 128 held-out questions
    c.search.engine = "local"
    c.search.top_k = 1  # as in the prompt's examples: the first result is the entity searched for
    c.rollout.n = 4
    c.rollout.today = "2026-01-01"  # the system prompt's {today}, pinned: the same prompts on any day
    c.rollout.dialect = "search_tags"
    c.rollout.system_prompt = SEARCH_TAGS_FEW_SHOT_PROMPT
    c.rollout.first_turn_prefix = "<search>"
    c.rollout.forced_prefix = "<answer>"  # every later turn, i.e. (max_turns = 2) the final one
    c.rollout.max_turns = 2
    c.rollout.max_new_tokens = 32  # a query or an answer: a few words (and the closing tag)
    c.rollout.max_tool_tokens = 128
    # a search result fed to ≤ half the batch extends only its rows (validation's appends 3× faster)
    c.rollout.append_gather_divisor = 2
    # validation's 96 rows finish each turn apart: its searches and appends wait for the turn's
    # last row (one append a turn, not one per decode call; same greedy episodes, bench/results/dedup.md)
    c.rollout.val_lockstep_turns = True
    # ...so its cursor ends below 512: prompt ≤ 272 slots, a query ≤ 32, one append ≤ 160 (results
    # ≤ 128 tokens), an answer ≤ 32. A 512-slot cache: the same log-probs bit for bit, decode and
    # appends read half the cache (validation 1.4× faster); a row that did not fit would end 'context'
    c.rollout.val_context_length = 512
    # the batch shares one slot cursor: the prompt (266 tokens) is prefilled at a power-of-two width
    # (512), then every append advances it for all rows; 512 slots cut every episode short
    c.rollout.context_length = 1024
    c.rollout.temperature = 0.7  # a 135M model at temperature 1 mostly writes noise
    c.rollout.top_p = 0.9
    c.algorithm.use_info_gain = True
    # IG over the group's IGs, F1 over its F1s: joint pooling gave every answer of an all-wrong
    # group ≈ −1 std; separate leaves those answers at 0, as GRPO does
    c.algorithm.info_gain_norm_mode = "separate"
    c.algorithm.pseudo_turn_template = " {answer} </answer><|im_end|>"
    # log-probs of the raw logits: tempered (logits / 0.7, veRL's) the steps were 1/0.7 as large
    # and the policy collapsed
    c.actor.temper_logprobs = False
    # 5e-6 was still climbing at the end; 3e-5 made the end a lottery of the seed
    c.actor.lr = 1e-5
    c.actor.warmup_steps = 2  # Adam's first steps move every weight by ~lr at once
    # no entropy bonus: 0.01 let the entropy climb until the answer format broke
    c.actor.entropy_coeff = 0.0
    c.actor.ppo_mini_batch_size = 8  # two groups; two optimiser steps per RL step (π_old: the scoring pass)
    c.actor.micro_batch_size = 8
    c.trainer.total_training_steps = 12  # ~17 minutes a run on 2 cores
    c.trainer.val_before_train = True
    c.trainer.test_freq = 4  # steps 0 / 4 / 8 / 12: the first third of the run ends at step 4
    c.trainer.save_freq = 12
    c.trainer.sample_freq = 4
    return c
