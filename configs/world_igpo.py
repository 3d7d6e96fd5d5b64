"""IGPO on the embedded world, sized for one sitting on 2 CPU cores: the learning experiment.

    python -m igpo_jax.train --config=configs/world_igpo.py
    python -m bench.learning --config=configs/world_igpo.py          # fresh run dir; ends in one JSON line
    python -m igpo_jax.sweep configs/sweeps/world_igpo_vs_grpo.py    # IGPO and GRPO × seeds 0, 1, 2

SmolLM2-135M-Instruct (embedded GGUF), the synthetic world with one-hop questions whose answer is
a place or a year (the first rung of difficulty: one search finds the document that states the
answer, and the answer is a kind of word the base model writes), the embedded BM25 retriever.
configs/world_grpo.py is this file with `algorithm.use_info_gain=False`.

Validation: the first 96 of 128 held-out questions (their entities are never asked about in
training), greedy, before the first update (step 0) and every `test_freq` (4) steps;
`val/no_format_f1_se` says how large a change is noise (0.028-0.051; a change measured per
question, bench.sweep_summary's paired se, is tighter).

What a researcher would tune, tuned (the algorithm, IGPO_SPEC §2–§4, is untouched; no
supervised warm start):
- the questions asked (data.world_question_kinds): the eight one-hop kinds answered by a place or
  a year, 320 questions of which 128 held out. On the full one-hop world (every kind, measured
  below) the base model never writes a company, a college, a founder or a river: those 37 of the
  96 validation questions stayed at F1 0.00-0.13 at every step of every run (bench.sweep_summary,
  by question kind), because no rollout of a group ever answers one, so no reward ever points
  there, and they capped the mean near 0.6. Here every question is one the policy can learn.
- a two-shot system prompt (prompts.SEARCH_TAGS_FEW_SHOT_PROMPT): search for the entity, then
  copy the answer (a year, then a place) from the results;
- forced prefixes: turn 1 opens `<search>`, turn 2 opens `<answer>` (2 turns). Probes of the
  base model, greedy, 32 held-out questions: a one-shot prompt with free later turns: 9% of the
  episodes wrote an `<answer>` (F1 with the format rule −1.81); the same with `<answer>` forced on
  the last turn: 72% well formed, no-format F1 0.06 (it answered with the entity it searched);
  two examples: 78% well formed, 100% searched the right entity and got its document, no-format
  F1 0.06 (the wrong field, mostly a year). So the policy has a gradient from step 0 and room to
  rise: pick the asked-for words from the document it found.
- the pseudo answer turn continues the forced `<answer>` prefix (" {answer} </answer>"), so the
  final context's P(gold) is the probability that the policy's next turn answers with the gold;
- lr 1e-5 with 2 warm-up steps, 12 steps (at 5e-6 for 10 steps IGPO seed 0 rose 0.438 / 0.531 /
  0.604 at steps 0 / 5 / 10, still climbing), 4 questions × 4 rollouts per step (kinds mixed
  within a step), temperature 0.7 with log-probs of the raw logits (actor.temper_logprobs off,
  below); turns of ≤ 32 tokens, a 1024-slot context.

MEASURED (2026-12-06, 2-core machine, the sweep one run at a time, `bench.learning` JSON per
run): val no-format F1 at steps 0 / 4 / 8 / 12 (format error 0 at every validation but GRPO seed
2's 0.010 at steps 8 and 12):
  igpo seed 0: 0.438 / 0.604 / 0.531 / 0.917   1007 s   grpo seed 0: 0.438 / 0.615 / 0.719 / 0.896   1016 s
  igpo seed 1: 0.438 / 0.833 / 0.875 / 0.885   1046 s   grpo seed 1: 0.438 / 0.812 / 0.823 / 0.865   1041 s
  igpo seed 2: 0.438 / 0.708 / 0.708 / 0.844   1033 s   grpo seed 2: 0.438 / 0.719 / 0.844 / 0.833   1075 s
  mean IGPO:   0.438 / 0.715 / 0.705 / 0.882            mean GRPO:   0.438 / 0.715 / 0.795 / 0.865
(se of one run's F1 0.028-0.051; a step 45-75 s: rollout 9-23 s, IGPO's scoring 11-14 s,
update 27-38 s (GRPO 34-50 s: π_old is its own pass there); a validation ~80 s; niced unit
tests beside the last three runs). Per question, seeds averaged (bench.sweep_summary): IGPO
+0.444 ± 0.053 over step 0 (GRPO +0.427 ± 0.051): the target, +0.25 with a format error below
20%, is met by every run of both arms (the smallest rise +0.395, GRPO seed 2; IGPO's +0.406). Curves: bench/results/world_igpo_vs_grpo.png.

What the policy learns, by question kind (bench.sweep_summary, seeds averaged): at step 0 it
answers nearly every question with a year (years 0.76-1.00, places 0.00-0.60: birthplace 0.00 over 22
questions, the city of a company 0.00 over 12); by step 4 it answers places (birthplace 0.70,
country 0.83-0.89), at the price of years (birth year 0.63-0.70), and by step 12 it reads the
question: IGPO birth year 0.94 and birthplace 0.82, company's city 0.89 and founding year 0.83
(GRPO 0.97 / 0.79 / 0.86 / 0.89). A run can flip to "a place for everything" on its way (IGPO
seed 0 at step 8: birth year 0.05, 0.531 overall) and come back by step 12 (0.917).

IGPO against GRPO: level, not ahead. IGPO − GRPO per question, seeds averaged: +0.000 ±
0.010 at step 4, −0.090 ± 0.026 at step 8 (seeds 0 and 2 behind; seed 0 mid-flip), +0.017 ±
0.019 at step 12; diag/collapse_frac 0.56 against 0.57 over the steps. Why, from the rollouts (samples/step_*.jsonl,
steps 4 / 8 / 12, 36 IGPO groups): in 34 groups all four rollouts wrote the same query (the
question's entity: forced `<search>`, one hop, learnt before step 4: diag/answer_doc_found_frac
1.0), so every search turn of the group has the same information gain and, normalised over the
group, an IG advantage of 0: IGPO's turn reward then adds nothing to GRPO's outcome advantage.
In the other 2 the queries differed by a letter or a first name, found the same document, and
their gains differed by ~0.001 (0.8201 against 0.8189), which the group's z-score turns into
±0.6-1.7: noise on the query tokens, in one cancelling the outcome's credit to a right answer's
search. So in this world the search is never what separates a group's rollouts; what does is
which words the answer copies, and there IGPO's answer-turn advantage is GRPO's. IGPO's case,
turns whose queries decide what later turns can read, needs questions a first search does not
settle: two-hop questions (world_two_hop_fraction), the next experiment.

BEFORE: the full one-hop world (every kind, 448 questions, 192 held out; 10 steps, validation
at 0 / 5 / 10; step 0 0.281). At lr 3e-5 (2026-12-05): IGPO 0.431 / 0.418 at steps 5 / 10
(seeds 0.349 / 0.583 / 0.323 at the end), GRPO 0.386 / 0.351; IGPO − GRPO +0.046 ± 0.028 /
+0.067 ± 0.034, IGPO +0.137 ± 0.042 over step 0; the end a lottery of the seed (a run
overshoots, or its answer bias flips as a whole). At lr 5e-6 (2026-12-06): IGPO 0.448 / 0.469
(+0.188 ± 0.052), GRPO 0.457 / 0.439 (+0.158 ± 0.052), the arms level (−0.009 ± 0.017 /
+0.029 ± 0.018) though GRPO's groups were collapsed more often (diag/collapse_frac 0.74 against
0.51). By kind (5e-6, step 10): places 0.67-1.00, years 0.47-0.73, and company 0.00, river 0.00,
founder 0.00-0.04, college 0.08-0.13: the ceiling above. Curves: bench/results/
world_igpo_vs_grpo_full_world_lr3e-5.png and world_igpo_vs_grpo_full_world_lr5e-6.png.
Probes there (IGPO seed 0 at 3e-5 unless said; steps 0 / 5 / 10): temperature 1.0: 0.281 /
0.432 / 0.380; an entropy bonus 0.01: the entropy climbed to 1.1-1.9 and the format broke (seed
1: 22% malformed); lr 2e-5 × 12 steps: 0.476 and 0.313 (seeds 0, 1); actor.kl_coef 0.1: mean
+0.113 (the KL term pulls a collapsed group back to the base model's year); log-probs of logits
/ 0.7 (actor.temper_logprobs, veRL's actor): the steps 1/0.7 as large, collapsed to 0.062 by
step 10 (entropy 0.02), hence off; 8 questions × 4 rollouts: 0.344 at step 4, 150-200 s a step;
a four-shot prompt with a company and a college answer: step 0 0.427, still 0.00 on both kinds.
The entropy of steps 1-3 is the batch's, not a collapse: the same at 3e-5, 5e-6 and with a
10-step warm-up (1.06 / 0.88 / 0.33).
Next: two-hop questions, where which query a turn writes decides what the next turn can find.
"""

from igpo_jax.rollout.prompts import SEARCH_TAGS_FEW_SHOT_PROMPT
from igpo_jax.config_base import base_config

# One-hop question kinds answered by a place or a year (igpo_jax.world.QUESTION_KINDS)
ANSWERS_THE_BASE_MODEL_WRITES = (
    "person.birthplace", "person.birth_year", "company.city", "company.founded", "city.country",
    "country.capital", "university.city", "university.founded")


def get_config():
    c = base_config()
    c.run_dir = "runs/world_igpo"
    c.model.path = ""  # the embedded SmolLM2-135M-Instruct
    # the update's and the log-prob forwards' layers as one lax.scan: smaller programs (bench.step's
    # start-up, 2026-12-06: cold 41.5 -> 29.8 s, warm 24.0 -> 13.8 s), the same tokens and loss bit
    # for bit, the demo-shape step 28.7 -> 26.3 s
    c.model.scan_layers = True
    c.model.remat = False  # 16 rows of ≤ 400 tokens: activations are small, recomputing them is not
    c.data.synthetic_world = True
    c.data.world_questions = 320
    c.data.world_two_hop_fraction = 0.0  # one-hop first
    # questions whose answer is a place or a year, the two things the base model writes (docstring)
    c.data.world_question_kinds = ANSWERS_THE_BASE_MODEL_WRITES
    c.data.world_test_fraction = 0.4  # 128 held-out test questions, 192 training questions
    c.data.train_batch_size = 4  # 4 questions × 4 rollouts: field types mixed within a step
    c.data.val_batch_size = 96  # one batch: the KV cache of 96 rows × 1024 slots is 2.2 GB
    c.data.val_max_questions = 96  # the first 96 of the 128 held-out questions (see the docstring)
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
    # a search result fed to ≤ half the batch extends only its rows: the 96-row validation's
    # appends 226 -> 76 s (2026-12-06, alone); the gathered cache copy fits easily here
    c.rollout.append_gather_divisor = 2
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
    # log-probs of the raw logits, not of logits / 0.7 (veRL's, actor.temper_logprobs): tempered,
    # the steps are 1/0.7 as large and the policy collapsed, IGPO seed 0 0.281 / 0.500 / 0.062 at
    # steps 0 / 5 / 10, its entropy 0.02 by step 4 (2026-12-06; untempered 0.281 / 0.521 / 0.349)
    c.actor.temper_logprobs = False
    # 12 steps at 1e-5: every run of both arms +0.40-0.48 (2026-12-06); at 5e-6 × 10 steps IGPO
    # seed 0 rose +0.17 and was still climbing; on the full world 3e-5 made the end a seed lottery
    c.actor.lr = 1e-5
    c.actor.warmup_steps = 2  # Adam's first steps move every weight by ~lr at once
    # no entropy bonus: 0.01 kept the groups apart after step 5, but the entropy kept rising
    # (1.1-1.9) and the answer format broke (IGPO seed 1: format error 0.22 at step 10; docstring)
    c.actor.entropy_coeff = 0.0
    c.actor.ppo_mini_batch_size = 8  # two groups; two optimiser steps per RL step (π_old: the scoring pass)
    c.actor.micro_batch_size = 8
    c.trainer.total_training_steps = 12  # ~17 minutes a run here (docstring)
    c.trainer.val_before_train = True
    c.trainer.test_freq = 4  # steps 0 / 4 / 8 / 12: the first third of the run ends at step 4
    c.trainer.save_freq = 12
    c.trainer.sample_freq = 4
    return c
