"""Outcome reward (F1/EM/format) and information gain against hand-computed values."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from igpo_jax.igpo.rewards import (ANSWER_SPLIT, exact_match, extract_answer, f1_score, format_ok, info_gain,
                                   normalize_tokens, score_outcome, tags_balanced)

# ----------------------------------------------------------------------------- normalisation, F1, EM


def test_normalize_replaces_every_punctuation_char_by_space():
    assert normalize_tokens("U.S.A.") == ["u", "s", "a"]
    assert normalize_tokens("Hello,World!  New\tYork") == ["hello", "world", "new", "york"]
    assert normalize_tokens("O'Neil-Smith (born 1950)") == ["o", "neil", "smith", "born", "1950"]
    assert normalize_tokens("...") == []


@pytest.mark.parametrize("pred, gold, expected", [
    ("Paris", "paris", 1.0),
    # pred {the, city, of, paris} ∩ gold {paris} = 1: P = 1/4, R = 1/1, F1 = 2·(1/4)·1/(1/4 + 1) = 0.4
    ("The city of Paris", "Paris", 2 * (1 / 4) * 1 / (1 / 4 + 1)),
    # punctuation: "new-york!" → {new, york} = gold {new, york}
    ("new-york!", "New York", 1.0),
    # duplicates count once (sets): pred {paris} vs gold {paris, france}: P = 1, R = 1/2, F1 = 2/3
    ("paris paris paris", "Paris, France", 2 * 1 * (1 / 2) / (1 + 1 / 2)),
    # no overlap
    ("London", "Paris", 0.0),
    # empty prediction
    ("", "Paris", 0.0),
    ("  ?! ", "Paris", 0.0),
    # empty gold (after normalisation) matches nothing, not even an empty prediction
    ("Paris", "", 0.0),
    ("", "", 0.0),
    ("", "...", 0.0),
])
def test_f1(pred, gold, expected):
    assert f1_score(pred, gold) == pytest.approx(expected)


def test_f1_is_max_over_aliases():
    gold = "Barack Obama" + ANSWER_SPLIT + "Obama" + ANSWER_SPLIT + "the president"
    # vs {barack, obama}: common 1, P = 1, R = 1/2 → 2/3; vs {obama}: 1.0; vs {the, president}: 0
    assert f1_score("Obama", gold) == pytest.approx(1.0)
    # pred {president, obama}: alias 1: P = 1/2, R = 1/2 → 1/2; alias 2: P = 1/2, R = 1 → 2/3; alias 3: P = 1/2, R = 1/2 → 1/2
    assert f1_score("President Obama", gold) == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))
    # an empty alias among real ones is skipped
    assert f1_score("Paris", "" + ANSWER_SPLIT + "Paris") == 1.0


@pytest.mark.parametrize("pred, gold, expected", [
    ("Paris", "paris", 1.0),
    ("  PARIS. ", "Paris", 1.0),  # case, punctuation, surrounding space
    ("New-York", "new york", 1.0),  # "new york" after normalisation on both sides
    ("new  york", "New York", 1.0),
    ("york new", "New York", 0.0),  # order matters for EM (it does not for F1)
    ("Paris France", "Paris", 0.0),
    ("Paris France", "Paris" + ANSWER_SPLIT + "paris, france", 1.0),  # any alias
    ("", "Paris", 0.0),
    ("", "", 0.0),  # empty gold matches nothing
])
def test_exact_match(pred, gold, expected):
    assert exact_match(pred, gold) == expected


# ----------------------------------------------------------------------------- format


def test_extract_answer_takes_the_first_and_strips():
    assert extract_answer("<think>x</think><answer> A </answer><answer>B</answer>") == "A"
    assert extract_answer("<answer>\nline 1\nline 2\n</answer>") == "line 1\nline 2"
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>unclosed") is None


@pytest.mark.parametrize("text, balanced", [
    ("<think>a</think><answer>b</answer>", True),
    ("<think>a</think><tool_call>{}</tool_call>\n<think>b</think><answer>c</answer>", True),
    ("<think><think>x</think></think><answer>y</answer>", True),  # nesting of one tag balances
    ("<think>a<answer>b</answer>", False),  # think never closed
    ("</think><think>", False),  # close before open
    ("<think>a</think></answer><answer>", False),
    ("<answer>b</answer></tool_call>", False),
    ("<think>a</think><search>q</search><answer>b", False),  # answer unclosed
])
def test_tags_balanced(text, balanced):
    assert tags_balanced(text) is balanced


def test_tag_set_is_an_argument():
    text = "<think>a</think><search>q<answer>b</answer>"
    assert tags_balanced(text)  # <search> is not one of the default tags
    assert not tags_balanced(text, ("think", "search", "answer"))


@pytest.mark.parametrize("text, ok", [
    ("<think>a</think><answer>b</answer>", True),
    ("<think>a</think><answer></answer>", True),  # empty answer: well formed, F1 0
    ("<think>a</think>no answer tag", False),
    ("<think>a<answer>b</answer>", False),
])
def test_format_ok(text, ok):
    assert format_ok(text) is ok


def test_score_outcome():
    good = "<think>it is in France</think>\n<answer>The city of Paris</answer>"
    score = score_outcome(good, "Paris")
    assert score.format_ok and score.reward == pytest.approx(0.4)  # as in test_f1
    assert score.no_format_f1 == pytest.approx(0.4) and score.em == 0.0

    exact = score_outcome("<think>x</think><answer>paris.</answer>", "Paris")
    assert (exact.reward, exact.no_format_f1, exact.em) == (1.0, 1.0, 1.0)

    # missing answer tag → penalty; unbalanced tags → penalty, even with a correct answer
    for bad in ("<think>I do not know</think>", "<think>x<answer>Paris</answer>"):
        score = score_outcome(bad, "Paris")
        assert (score.reward, score.no_format_f1, score.em, score.format_ok) == (-2.0, 0.0, 0.0, False)
    assert score_outcome("<answer>Paris", "Paris", format_penalty=-1.5).reward == -1.5

    empty = score_outcome("<think>x</think><answer> </answer>", "Paris")
    assert (empty.reward, empty.no_format_f1, empty.format_ok) == (0.0, 0.0, True)


# ----------------------------------------------------------------------------- information gain

# One rollout with 4 turns in 4 slots: mean log-probs of the gold answer on the contexts before
# each turn, logP_0 (prompt alone) .. logP_3 (after turn 3). The final turn 4 gets F1 instead.
LOGP = [math.log(0.1), math.log(0.3), math.log(0.2), math.log(0.6)]


def test_prob_diff():
    out = info_gain(np.array([LOGP]), np.array([4]), "prob_diff")
    # r_1 = 0.3 - 0.1, r_2 = 0.2 - 0.3, r_3 = 0.6 - 0.2; slot 3 is the final turn
    np.testing.assert_allclose(out.reward_NT[0], [0.3 - 0.1, 0.2 - 0.3, 0.6 - 0.2, 0.0], atol=1e-6)
    np.testing.assert_array_equal(out.mask_NT[0], [True, True, True, False])


def test_log_prob_diff():
    out = info_gain(np.array([LOGP]), np.array([4]), "log_prob_diff")
    expected = [math.log(0.3 / 0.1), math.log(0.2 / 0.3), math.log(0.6 / 0.2), 0.0]
    np.testing.assert_allclose(out.reward_NT[0], expected, atol=1e-6)


def test_ragged_turns_only_non_final():
    # rollout 0: 2 turns → only turn 1 (slot 0) has an IG reward; rollout 1: 1 turn → none
    # contexts past a rollout's turns are padding and may hold anything, NaN included
    padded = [math.log(0.1), math.log(0.3), math.nan, math.nan]
    out = info_gain(np.array([padded, LOGP]), np.array([2, 1]), "prob_diff")
    np.testing.assert_allclose(out.reward_NT, [[0.3 - 0.1, 0, 0, 0], [0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_array_equal(out.mask_NT, [[True, False, False, False], [False] * 4])


def test_non_finite_is_missing_and_baseline_carries_over():
    logp = [math.log(0.1), math.nan, math.log(0.2), -math.inf, math.log(0.5)]
    out = info_gain(np.array([logp]), np.array([5]), "prob_diff")
    # turn 1 ends at the NaN context: missing. turn 2 is measured from P_0 (last present): 0.2 - 0.1.
    # turn 3 ends at a -inf log-prob: missing too (exp would give a finite P = 0, but the
    # measurement failed). turn 4 is measured from P_2: 0.5 - 0.2. turn 5 is final.
    np.testing.assert_array_equal(out.mask_NT[0], [False, True, False, True, False])
    np.testing.assert_allclose(out.reward_NT[0], [0, 0.2 - 0.1, 0, 0.5 - 0.2, 0], atol=1e-6)


def test_non_finite_log_prob_diff_and_missing_prompt_baseline():
    logp = [math.inf, math.log(0.3), math.log(0.6)]
    out = info_gain(np.array([logp]), np.array([3]), "log_prob_diff")
    # context 0 missing: turn 1 has no baseline → missing; turn 2 = log 0.6 - log 0.3
    np.testing.assert_array_equal(out.mask_NT[0], [False, True, False])
    np.testing.assert_allclose(out.reward_NT[0], [0, math.log(0.6 / 0.3), 0], atol=1e-6)
    assert np.all(np.isfinite(out.reward_NT))


def test_valid_mask_marks_unscored_contexts_missing():
    valid = np.array([[True, True, False, True]])
    out = info_gain(np.array([LOGP]), np.array([4]), "prob_diff", valid_NT=valid)
    # turn 2 ends at an unscored context; turn 3 is measured from P_1: 0.6 - 0.3
    np.testing.assert_array_equal(out.mask_NT[0], [True, False, True, False])
    np.testing.assert_allclose(out.reward_NT[0], [0.3 - 0.1, 0, 0.6 - 0.3, 0], atol=1e-6)


def test_info_gain_jits_and_validates_type():
    fn = jax.jit(info_gain, static_argnames="info_gain_type")
    out = fn(np.array([LOGP]), np.array([4]), info_gain_type="prob_diff")
    np.testing.assert_allclose(out.reward_NT[0, 0], 0.3 - 0.1, atol=1e-6)
    with pytest.raises(ValueError, match="prob_diff, log_prob_diff"):
        info_gain(np.array([LOGP]), np.array([4]), "diff")
