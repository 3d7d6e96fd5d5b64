"""igpo.diagnostics on hand-built arrays with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from igpo_jax.rollout.trajectories import Episode
from igpo_jax.igpo import diagnostics


def _episode(support=("7",), retrieved=(), answer="x"):
    return Episode("q", ("gold",), "s", "", "", answer, "answer", supporting_doc_ids=support,
                   retrieved_ids_per_turn=retrieved)


def test_collapse_counts_groups_without_a_nonzero_advantage_on_generated_tokens():
    # groups: {0, 1} all zero on their loss tokens (a 5.0 off the mask does not count),
    # {2, 3} one live token, {4} nothing generated → collapsed. 2 of 3 groups collapsed.
    adv = np.array([[0, 0, 5.0], [0, 0, 0], [0, 0.3, 0], [0, 0, 0], [0, 0, 0]])
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    assert diagnostics.collapse_fraction(adv, mask, np.array([0, 0, 1, 1, 2])) == pytest.approx(2 / 3)
    assert diagnostics.collapse_fraction(adv * 0 + 1e-7, mask, np.array([0, 0, 1, 1, 2])) == 1.0
    assert diagnostics.collapse_fraction(np.ones((2, 1)), np.ones((2, 1), bool), np.array([3, 9])) == 0.0


def test_turn_retrieval_marks_search_turns_and_the_answer_document():
    eps = [_episode(("3", "7"), (("1", "3"), ("7", "2"), None)),  # hop 1 doc, then the answer's doc
           _episode(("7",), (None, ("8",))),  # searched in turn 1, wrong document
           _episode((), (("7",),))]  # no supporting ids: never "the answer's"
    searched, found = diagnostics.turn_retrieval(eps, 3)
    np.testing.assert_array_equal(searched, [[1, 1, 0], [0, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(found, [[0, 1, 0], [0, 0, 0], [0, 0, 0]])


def test_behaviour_fractions():
    searched = np.array([[1, 0], [0, 0], [0, 1], [0, 0]], bool)
    found = np.array([[1, 0], [0, 0], [0, 0], [0, 0]], bool)
    out = diagnostics.behaviour(searched, np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool), found)
    assert out == {"diag/searched_frac": 0.5, "diag/answer_doc_found_frac": 0.25, "diag/answered_frac": 0.5,
                   "diag/format_ok_frac": 0.25}


def test_p_gold_before_the_first_search_and_in_the_final_context():
    p = np.array([[0.01, 0.2, 0.5], [0.02, 0.4, 0.9], [0.03, 0.6, 0.9]])
    valid = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]], bool)
    searched = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], bool)
    num_turns = np.array([3, 3, 2])
    out = diagnostics.p_gold(np.log(p), valid, num_turns, searched)
    # before the first search: row 0 slot 0 (0.01), row 1 slot 1 (0.4); row 2 never searched
    assert out["diag/p_gold_before_search"] == pytest.approx((0.01 + 0.4) / 2)
    # final context: row 0 slot 2 (0.5), row 1 slot 2 not scored → left out, row 2 slot 1 (0.6)
    assert out["diag/p_gold_final_context"] == pytest.approx((0.5 + 0.6) / 2)


def test_p_gold_over_nothing_is_nan_and_dropped():
    out = diagnostics.p_gold(np.zeros((1, 2)), np.zeros((1, 2), bool), np.array([2]), np.zeros((1, 2), bool))
    assert all(math.isnan(v) for v in out.values())
    assert diagnostics.drop_nan({**out, "a": 1.0}) == {"a": 1.0}


def test_ig_split_by_whether_the_search_found_the_answer_document():
    ig = np.array([[0.3, 0.0, 0.0], [-0.1, 0.05, 0.0]])
    ig_mask = np.array([[1, 0, 0], [1, 1, 0]], bool)
    searched = np.array([[1, 1, 0], [1, 0, 0]], bool)  # row 1 slot 1: a format-error turn
    found = np.array([[1, 0, 0], [0, 0, 0]], bool)
    out = diagnostics.ig_by_retrieval(ig, ig_mask, searched, found)
    assert out["diag/ig_answer_doc"] == pytest.approx(0.3) and out["diag/ig_answer_doc_count"] == 1
    # row 0 slot 1 searched but has no IG (masked); row 1 slot 0 (−0.1) is the only other one
    assert out["diag/ig_other_doc"] == pytest.approx(-0.1) and out["diag/ig_other_doc_count"] == 1


def test_outcome_collapse_counts_collapsed_groups_split_by_retrieval():
    # group 0: outcomes differ (not collapsed); group 1: all 0, one rollout found the answer's
    # document (split); group 2: all 1, all found it (collapsed, not split)
    outcome_N = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    found_N = np.array([True, False, True, False, True, True])
    out = diagnostics.outcome_collapse(outcome_N, found_N, np.array([0, 0, 1, 1, 2, 2]))
    assert out == {"diag/outcome_collapse_frac": pytest.approx(2 / 3), "diag/collapsed_retrieval_split_frac": 0.5}
    none = diagnostics.outcome_collapse(np.array([1.0, 0.0]), np.array([True, False]), np.array([0, 0]))
    assert none["diag/outcome_collapse_frac"] == 0.0 and np.isnan(none["diag/collapsed_retrieval_split_frac"])
