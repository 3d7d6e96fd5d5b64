"""IGPO on the embedded world, sized for one sitting on 2 CPU cores: the learning experiment.

    python -m igpo_jax.train --config=configs/world_igpo.py
    python -m bench.learning --config=configs/world_igpo.py          # fresh run dir; ends in one JSON line
    python -m igpo_jax.sweep configs/sweeps/world_igpo_vs_grpo.py    # IGPO and GRPO × seeds 0, 1, 2

SmolLM2-135M-Instruct (embedded GGUF), the synthetic world with one-hop questions only (the first
rung of difficulty: one search finds the document that states the answer), the embedded BM25
retriever. configs/world_grpo.py is this file with `algorithm.use_info_gain=False`.

Validation: 192 held-out questions (their entities are never asked about in training), greedy,
before the first update (step 0) and every `test_freq` steps; `val/no_format_f1_se` says how
large a change is noise (≈ 0.02 at F1 ≈ 0.06, ≈ 0.03 at 0.3).

What a researcher would tune, tuned (the algorithm, IGPO_SPEC §2–§4, is untouched):
- a two-shot system prompt (prompts.SEARCH_TAGS_FEW_SHOT_PROMPT): search for the entity, then
  copy the answer from the results;
- forced prefixes: turn 1 opens `<search>`, turn 2 opens `<answer>` (2 turns). Probes of the
  base model, greedy, 32 held-out questions: a one-shot prompt with free later turns: 9% of the
  episodes wrote an `<answer>` (F1 with the format rule −1.81); the same with `<answer>` forced on
  the last turn: 72% well formed, 66% had the answer's document in their results, no-format F1
  0.06 (it answered with the entity it searched, or copied the example's entity as its query);
  two examples (search the entity, copy one fact): 78% well formed, 100% searched the right entity
  and got its document, no-format F1 0.06 (it answered with the wrong field, mostly a year, as the
  last example did; the shipped prompt ends on a place instead). So the policy has a gradient from
  step 0 and room to rise: pick the asked-for words from the document it found.
- the pseudo answer turn continues the forced `<answer>` prefix (" {answer} </answer>"), so the
  final context's P(gold) is the probability that the policy's next turn answers with the gold;
- lr 2e-5 (a 135M model, 16 steps), 2 questions × 8 rollouts per step, temperature 0.7;
  turns of ≤ 32 tokens, a 1024-slot context (the KV cache of a 64-row validation batch: 1.5 GB).

MEASURED (2026-12-02, 2-core machine, one run at a time; bench.learning JSON per run), 96
held-out questions, val no-format F1 (± se 0.046-0.05) at steps 0 / 5 / 10:
  igpo seed 0: 0.281 / 0.401 / 0.392 (format error 0 / 0.27 / 0.04), 1165 s, peak RSS 15.2 GB
  igpo seed 1: 0.281 / 0.302 / 0.177 (format error 0 / 0.01 / 0.05), 1139 s
  grpo seed 0: 0.281 / 0.479 / 0.562 (format error 0 throughout), 1051 s, collapse 0.75
  grpo seed 1: 0.281 / 0.302 / 0.333, 949 s, collapse 0.85
Means: IGPO 0.281 → 0.284, GRPO 0.281 → 0.448 (those IGPO runs: joint normalisation). Why,
as far as measured: joint normalisation (IGPO_SPEC §3) puts the search turns' positive IGs and the
answers' F1 in one pool, so in a group whose answers are all wrong (GRPO: no gradient, collapse
0.75-0.85) every answer turn gets a negative advantage of about one std: the policy was pushed
off whatever it answered (unclosed, rambling answers: format error 0.27 at step 5, seed 0).
Now `info_gain_norm_mode="separate"` (answer tokens get exactly GRPO's advantage; the search
turn adds its group-normalised IG). MEASURED (2026-12-05, with helper jobs sharing the 2 cores,
so wall times are inflated): igpo seed 0: 0.281 / 0.307 / 0.375 (format error 0 / 0.07 / 0.03),
collapse 0.2, 2053 s. The IG does teach the search: the fraction of rollouts whose search found
the answer's document went 0.56 → 1.0 by step 3 (diag/answer_doc_found_frac), diag/ig_answer_doc
0.39-0.66 vs ig_other_doc 0.0. What limits F1 is the answer, not the search: the validation
episodes (samples/val_step_*.jsonl) show the model copying the wrong field of the right document,
and which field it prefers swings as a whole: it answered with a year on 84 of the 96 questions
at step 0 (right on 20 of the 26 year questions, 7 of the 70 others), on 9 at step 5 (6 and 23
right) and on 76 at step 10 (25 and 11 right): a bias that flips, not a reading of the question. With 2
questions a step the update sees one or two field types at a time; the next experiment is 4
questions × 4 rollouts (same 16 rows): field types mixed within a step, and smaller groups,
where GRPO collapses more often and the IG still ranks the searches. One such run (igpo seed 0,
--config.data.train_batch_size=4 --config.rollout.n=4) reached 0.521 at step 5 (format error 0)
before the OOM killer stopped it at step 9 (other jobs shared the machine): the lead to follow.
"""

from igpo_jax.agent.prompts import SEARCH_TAGS_FEW_SHOT_PROMPT
from igpo_jax.config_base import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/world_igpo"
    c.model.path = ""  # the embedded SmolLM2-135M-Instruct
    c.model.remat = False  # 16 rows of ≤ 400 tokens: activations are small, recomputing them is not
    c.data.synthetic_world = True
    c.data.world_questions = 448
    c.data.world_two_hop_fraction = 0.0  # one-hop first
    c.data.world_test_fraction = 192 / 448  # 192 held-out test questions, 256 training questions
    c.data.train_batch_size = 4  # 4 questions × 4 rollouts: field types mixed within a step
    c.data.val_batch_size = 96  # one batch: the KV cache of 96 rows × 1024 slots is 2.2 GB
    c.data.val_max_questions = 96  # the first 96 of the 192 held-out questions (see the docstring)
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
    # the batch shares one slot cursor: the prompt (266 tokens) is prefilled at a power-of-two width
    # (512), then every append advances it for all rows; 512 slots cut every episode short
    c.rollout.context_length = 1024
    c.rollout.temperature = 0.7  # a 135M model at temperature 1 mostly writes noise
    c.rollout.top_p = 0.9
    c.algorithm.use_info_gain = True
    # IG over the group's IGs, F1 over its F1s (IGPO_SPEC §3): joint pooling gave every answer of an
    # all-wrong group ≈ −1 std (see the docstring); separate leaves those answers at 0, as GRPO does
    c.algorithm.info_gain_norm_mode = "separate"
    c.algorithm.pseudo_turn_template = " {answer} </answer><|im_end|>"
    c.actor.lr = 3e-5
    c.actor.warmup_steps = 2  # Adam's first steps move every weight by ~lr at once
    c.actor.ppo_mini_batch_size = 8  # two groups; two optimiser steps per RL step (π_old: the scoring pass)
    c.actor.micro_batch_size = 8
    c.trainer.total_training_steps = 10
    c.trainer.val_before_train = True
    c.trainer.test_freq = 5
    c.trainer.save_freq = 10
    c.trainer.sample_freq = 5
    return c
