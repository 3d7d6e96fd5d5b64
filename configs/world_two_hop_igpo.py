"""IGPO on the embedded world's two-hop rung: questions a first search does not settle.

    python -m igpo_jax.train --config=configs/world_two_hop_igpo.py
    python -m bench.gate --config=configs/world_two_hop_igpo.py      # the base model's regime, one JSON line
    python -m igpo_jax.sweep configs/sweeps/world_two_hop_arms.py    # IGPO, GRPO, IG-only, placebo

configs/world_igpo.py (SmolLM2-135M embedded, BM25 top 1, 4 questions × 4 rollouts, lr 1e-5) on
two-hop questions answered by a place or a year: the question's entity's document names a bridge
(a company, a university, a city) but not the answer; only a second query naming the bridge finds
the answer's document. Namesake companies make a query with half the bridge's name find a
plausible wrong one. Free turns: turn 1 opens `<search>`, then the policy searches again or
answers (each free turn opens with "<", a measured departure), up to 4 turns, the 4th forced to
open `<answer>`. The prompt's four worked examples are earlier chat turns. IGPO as the paper's best and the
reference's train.sh: log-prob IG, separate normalisation, γ = 1. The other arms differ by one
switch each: world_two_hop_grpo.py, world_two_hop_ig_only.py, world_two_hop_placebo.py.
Held-out validation on entities never asked about in training. Record: bench/results/world_two_hop.md.
"""

from igpo_jax.config_base import sibling_config
from igpo_jax.rollout.prompts import SEARCH_TAGS_TWO_HOP_INSTRUCTION, TWO_HOP_EXAMPLE_TURNS

# two-hop kinds answered by a place or a year (igpo_jax.data.world.QUESTION_KINDS); the founder's
# birthplace is not among them: the founder's own document names the company, so one hop answers it
TWO_HOP_PLACES_AND_YEARS = (
    "person.birthplace.country", "person.employer.city", "person.employer.founded",
    "person.university.city", "company.city.country", "university.city.country")


def get_config():
    c = sibling_config(__file__, "world_igpo")
    c.run_dir = "runs/world_two_hop_igpo"
    c.data.world_two_hop_fraction = 1.0
    c.data.world_question_kinds = TWO_HOP_PLACES_AND_YEARS
    # 3× the default world's people and 2× its companies, so that 224 training questions and 96
    # held-out ones each find entities on their own side of the split
    c.data.world_shape.update(dict(countries=12, cities=60, universities=30, companies=80, people=240,
                                   namesakes=30))
    c.data.world_questions = 320
    c.data.world_test_fraction = 0.3  # 96 held-out questions, 224 training questions
    c.data.val_batch_size = 64
    c.data.val_max_questions = 64
    # four worked two-hop examples as earlier chat turns (one per bridge type): the base model then
    # writes a second query after the first result, naming the bridge in ~22-34% of the episodes
    c.rollout.system_prompt = SEARCH_TAGS_TWO_HOP_INSTRUCTION
    c.rollout.example_turns = TWO_HOP_EXAMPLE_TURNS
    c.rollout.first_turn_prefix = "<search>"
    # Free turns: the policy chooses to search again or answer. A departure from free text: each
    # free turn opens with "<", so the choice is between tags; left free, the 135M base model wrote
    # prose after a result in ~half the turns and the format penalty, not the search, set every
    # group's rewards apart (bench/results/world_two_hop.md, gate runs 7 and 10).
    c.rollout.forced_prefix = "<"
    c.rollout.last_turn_prefix = "<answer>"
    c.rollout.max_turns = 4
    # a free turn's context ends with its "<", which the pseudo answer turn continues
    c.algorithm.pseudo_turn_template = "answer> {answer} </answer><|im_end|>"
    # the 770-token prompt and up to 4 turns of ≤ 32 tokens and results of ≤ 128
    c.rollout.context_length = 2048
    # world_igpo's validation settings are sized for its 2 turns: the whole context here, and
    # validation as its sweep began (lockstep turns unmeasured with free turns)
    c.rollout.val_context_length = 0
    c.rollout.val_lockstep_turns = False
    # (world_igpo: 0.7) the turns are tags, so temperature 1 spreads a group's choice of query
    # without breaking the format: at 0.7, 78% of the base model's groups were outcome-collapsed
    # but only 36% of those had rollouts whose gains differed; at 1.0, 56% and 67% (gate runs 12-13)
    c.rollout.temperature = 1.0
    c.trainer.save_freq = 4  # a sweep may be cut and resumed in parts
    c.algorithm.use_info_gain = True
    c.algorithm.info_gain_type = "log_prob_diff"
    c.algorithm.info_gain_norm_mode = "separate"
    c.algorithm.gamma = 1.0
    return c
