"""Turn rewards (IGPO_SPEC §2): the outcome reward of the final turn and the information gain of
the others. Pure functions, no config objects, no I/O.

Legend: N rollouts, T turn slots (max turns); slot k is 1-based turn k + 1.

Outcome (host side, Python strings):
    score_outcome(response, ground_truth) → OutcomeScore(reward, no_format_f1, em, format_ok)
Information gain (jnp, jitted with `info_gain_type` static):
    info_gain(mean_logp_NT, num_turns_N, info_gain_type) → InfoGain(reward_NT, mask_NT)
where mean_logp_NT[:, k] is scored on the context before slot k; the final turn's slot
(k = T_i - 1) and slots past it are never information-gain rewards.

The answer-tag extraction and balance check live here rather than in rollout/parse.py so that
rewards depend on nothing above them; they follow the reference's reward function (each tag's
opens and closes counted on their own), which is what the paper's numbers were scored with.
One difference: tags are matched case-sensitively, as rollout/parse.py reads them (the
reference lower-cases the whole response first).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string

import jax
import jax.numpy as jnp

from igpo_jax.rollout.parse import extract_answer  # one definition for rollouts and rewards
from igpo_jax.data.examples import ANSWER_SEPARATOR as ANSWER_SPLIT  # the reference's alias separator

DEFAULT_TAGS = ("think", "tool_call", "answer")  # Search-R1 dialect: ("think", "search", "answer")
DEFAULT_FORMAT_PENALTY = -2.0
INFO_GAIN_TYPES = ("prob_diff", "log_prob_diff")

# string.punctuation (ASCII), as the reference: widening it to Unicode punctuation would change
# tokens such as "o’brien" and make our F1 incomparable with the published numbers.
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


# ----------------------------------------------------------------------------- answer metrics

def normalize_tokens(text: str) -> list[str]:
    """Lower-case, every punctuation character → space, split on white space."""
    return text.lower().translate(_PUNCT_TO_SPACE).split()


def _aliases(ground_truth: str) -> list[list[str]]:
    """Normalised token lists of the gold aliases; aliases empty after normalisation are dropped:
    an empty gold can never be matched (F1 and EM alike), rather than matching an empty answer."""
    aliases = [normalize_tokens(alias) for alias in ground_truth.split(ANSWER_SPLIT)]
    return [alias for alias in aliases if alias]


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-SET F1 (duplicates count once), max over the aliases; 0 for an empty prediction."""
    pred = set(normalize_tokens(prediction))
    best = 0.0
    for alias in _aliases(ground_truth):
        gold = set(alias)
        common = len(pred & gold)
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised prediction equals a normalised alias (token sequences, so runs of
    spaces left by punctuation do not matter), else 0.0."""
    pred = normalize_tokens(prediction)
    return float(any(pred == alias for alias in _aliases(ground_truth)))


# ----------------------------------------------------------------------------- format

def tags_balanced(text: str, tags: tuple[str, ...] = DEFAULT_TAGS) -> bool:
    """Each tag on its own: no close before its open and every open closed (depth counting).
    Tags are checked independently, as the reference does; crossing different tags is allowed."""
    for tag in tags:
        depth = 0
        for match in re.finditer(f"<(/?){tag}>", text):
            depth += -1 if match.group(1) else 1
            if depth < 0:
                return False
        if depth:
            return False
    return True


def format_ok(text: str, tags: tuple[str, ...] = DEFAULT_TAGS) -> bool:
    """Well formed for the reward: tags balanced and an <answer> tag present. An empty answer is
    well formed (it scores F1 0, not the penalty), as in the reference."""
    return tags_balanced(text, tags) and extract_answer(text) is not None


@dataclasses.dataclass(frozen=True)
class OutcomeScore:
    reward: float  # the final turn's reward: F1, or the penalty when the format is bad (the reported "F1")
    no_format_f1: float  # F1 with the penalty replaced by 0
    em: float  # exact match; 0 when the format is bad (an absent answer matches nothing)
    format_ok: bool


def score_outcome(response: str, ground_truth: str, *, format_penalty: float = DEFAULT_FORMAT_PENALTY,
                  tags: tuple[str, ...] = DEFAULT_TAGS) -> OutcomeScore:
    """Outcome reward and evaluation metrics of one rollout.

    `response` is the text the format is judged on: the policy's own assistant turns (joined), not
    the tool messages, whose web text may contain stray tags. The answer is its first <answer>.
    """
    if not format_ok(response, tags):
        return OutcomeScore(reward=float(format_penalty), no_format_f1=0.0, em=0.0, format_ok=False)
    answer = extract_answer(response)
    f1 = f1_score(answer, ground_truth)
    return OutcomeScore(reward=f1, no_format_f1=f1, em=exact_match(answer, ground_truth), format_ok=True)


# ----------------------------------------------------------------------------- information gain

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InfoGain:
    reward_NT: jax.Array  # float: r in the slot of the turn it rewards; 0 where there is none
    mask_NT: jax.Array  # bool: slot holds a real (finite, non-final-turn) information-gain reward


@functools.partial(jax.jit, static_argnames="info_gain_type")
def info_gain(mean_logp_NT, num_turns_N, info_gain_type: str, valid_NT=None) -> InfoGain:
    """Information gain of each non-final turn from the gold answer's mean log-prob per context.

    mean_logp_NT[i, k] = (1/L) Σ_j log π(a_j | q, o_{<k}): the context before turn slot k, i.e.
    after 1-based turn k (k = 0: the prompt alone), the same layout as Trajectories.turn_start_NT.
    The context after the final turn is never needed (that turn is rewarded by F1), so there is no
    column for it. valid_NT marks contexts that were scored (default: all).

    Turn slot k (1-based turn t = k + 1) ends at context k + 1:
    'prob_diff': r = P_{k+1} - P_k with P = exp(mean logp); 'log_prob_diff': r = logP_{k+1} - logP_k.
    Only slots k < T_i - 1 (non-final turns) can hold a reward.

    A non-finite or unscored context is missing: the turn ending there gets no reward (mask False,
    reward 0) and the next turn is measured against the last context that was present, as in the
    reference (so the gains still telescope to P_last - P_0).
    """
    if info_gain_type not in INFO_GAIN_TYPES:
        raise ValueError(f"unknown info_gain_type {info_gain_type!r}; expected one of {', '.join(INFO_GAIN_TYPES)}")
    mean_logp_NT = jnp.asarray(mean_logp_NT, jnp.float32)
    n, t = mean_logp_NT.shape
    value_NT = jnp.exp(mean_logp_NT) if info_gain_type == "prob_diff" else mean_logp_NT
    # Judged on the log-prob itself: a -inf log-prob is a failed measurement, not P = 0.
    ok_NT = jnp.isfinite(mean_logp_NT) & jnp.isfinite(value_NT)
    if valid_NT is not None:
        ok_NT &= jnp.asarray(valid_NT, bool)
    value_NT = jnp.where(ok_NT, value_NT, 0.0)  # no NaN left to leak through a later where/grad

    # Slot k ends at context k + 1 (missing past the last column) and starts from the last
    # present context at or before k.
    end_ok_NT = jnp.concatenate([ok_NT[:, 1:], jnp.zeros((n, 1), bool)], axis=1)
    end_NT = jnp.concatenate([value_NT[:, 1:], jnp.zeros((n, 1), value_NT.dtype)], axis=1)
    base_index_NT = jax.lax.cummax(jnp.where(ok_NT, jnp.arange(t), -1), axis=1)
    base_NT = jnp.take_along_axis(value_NT, jnp.maximum(base_index_NT, 0), axis=1)

    non_final_NT = jnp.arange(t)[None, :] < jnp.asarray(num_turns_N)[:, None] - 1
    gain_NT = end_NT - base_NT
    mask_NT = end_ok_NT & (base_index_NT >= 0) & non_final_NT & jnp.isfinite(gain_NT)
    return InfoGain(reward_NT=jnp.where(mask_NT, gain_NT, 0.0), mask_NT=mask_NT)
