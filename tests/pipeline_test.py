"""Trajectories → advantages glue, on a hand-built batch with hand-computed values."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from igpo_jax.rollout.trajectories import Episode, Trajectories
from igpo_jax.igpo.pipeline import AlgorithmConfig, advantages_for, score_outcomes, shuffle_within_groups


def _traj():
    # two rollouts of one question; rollout 0: two turns (search, answer); rollout 1: one turn
    tokens = np.zeros((2, 8), np.int32)
    loss = np.array([[0, 1, 1, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0, 0]], bool)
    turn = np.where(loss, np.array([[-1, 0, 0, -1, -1, 1, 1, -1], [-1, 0, 0, 0, -1, -1, -1, -1]]), -1)
    eps = (Episode("q", ("Kesmarin",), "s", "<search>a</search><answer>Kesmarin</answer>", "", "Kesmarin", "answer",
                   supporting_doc_ids=("4",), retrieved_ids_per_turn=(("9", "4"), None),
                   policy_text="<search>a</search>\n<answer>Kesmarin</answer>"),
           Episode("q", ("Kesmarin",), "s", "<answer>Rome</answer>", "", "Rome", "answer",
                   supporting_doc_ids=("4",), retrieved_ids_per_turn=(None,), policy_text="<answer>Rome</answer>"))
    return Trajectories(tokens, np.ones((2, 8), bool), loss, turn.astype(np.int32),
                        np.array([[1, 5], [1, -1]], np.int32), np.array([2, 1], np.int32),
                        np.array([0, 0], np.int32), np.zeros((2, 8), np.float32), eps)


def test_igpo_advantages_by_hand():
    traj = _traj()
    outcomes = score_outcomes(traj, "search_tags", -2.0)
    np.testing.assert_array_equal(outcomes.reward_N, [1.0, 0.0])
    # P before turn 0 = 0.1, before turn 1 = 0.4 → IG of rollout 0's turn 0 = 0.3 (prob_diff)
    mean_logp = np.log(np.array([[0.1, 0.4], [0.1, 1.0]], np.float32))  # [1, 1] is not scored
    scored = np.array([[True, True], [True, False]])
    adv, metrics = advantages_for(traj, outcomes, mean_logp, scored, AlgorithmConfig(gamma=1.0), 0, 10)
    # joint normalisation over the group's rewards {0.3 (IG), 1.0, 0.0}: mean 13/30,
    # population std sqrt(((0.3−m)² + (1−m)² + m²)/3)
    rewards = np.array([0.3, 1.0, 0.0])
    m, s = rewards.mean(), rewards.std()
    ig_hat, f1_hat0, f1_hat1 = (rewards - m) / (s + 1e-6)
    # γ = 1: turn 0 of rollout 0 gets its own plus the final turn's; turn 1 its own
    turn0, turn1 = ig_hat + f1_hat0, f1_hat0
    np.testing.assert_allclose(adv[0], [0, turn0, turn0, 0, 0, turn1, turn1, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv[1], [0, f1_hat1, f1_hat1, f1_hat1, 0, 0, 0, 0], rtol=1e-5, atol=1e-6)
    assert metrics["ig/mean"] == pytest.approx(0.3, abs=1e-6) and metrics["ig/count"] == 1
    assert metrics["reward/f1"] == pytest.approx(0.5) and metrics["reward/format_error_rate"] == 0
    # diagnostics: one live group; rollout 0 searched and found doc 4 (IG 0.3); P before its search 0.1,
    # final contexts: rollout 0 slot 1 (0.4), rollout 1 slot 0 (0.1)
    assert metrics["diag/collapse_frac"] == 0 and metrics["diag/searched_frac"] == 0.5
    assert metrics["diag/answer_doc_found_frac"] == 0.5 and metrics["diag/format_ok_frac"] == 1
    assert metrics["diag/ig_answer_doc"] == pytest.approx(0.3) and metrics["diag/ig_other_doc_count"] == 0
    assert "diag/ig_other_doc" not in metrics  # a mean over no turns is absent, not 0
    assert metrics["diag/p_gold_before_search"] == pytest.approx(0.1, rel=1e-5)
    assert metrics["diag/p_gold_final_context"] == pytest.approx(0.25, rel=1e-5)


def test_grpo_switch_gives_one_advantage_per_rollout():
    traj = _traj()
    outcomes = score_outcomes(traj, "search_tags", -2.0)
    adv, metrics = advantages_for(traj, outcomes, None, None, AlgorithmConfig(use_info_gain=False), 0, 10)
    # outcomes {1, 0}: mean 0.5, std 0.5 → ±1/(0.5 + 1e-6)·0.5 ≈ ±1
    np.testing.assert_allclose(adv[0][traj.loss_mask_NL[0]], 0.5 / (0.5 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(adv[1][traj.loss_mask_NL[1]], -0.5 / (0.5 + 1e-6), rtol=1e-6)
    assert np.all(adv[~traj.loss_mask_NL] == 0) and metrics["ig/count"] == 0


def test_info_gain_needs_scores():
    traj = _traj()
    with pytest.raises(ValueError, match="needs the per-turn gold-answer scores"):
        advantages_for(traj, score_outcomes(traj, "search_tags", -2.0), None, None, AlgorithmConfig(), 0, 10)


def test_grpo_groups_that_all_score_the_same_are_collapsed():
    traj = _traj()
    same = dataclasses.replace(traj, episodes=tuple(dataclasses.replace(ep, policy_text="no answer")
                                                    for ep in traj.episodes))
    _, metrics = advantages_for(same, score_outcomes(same, "search_tags", -2.0), None, None,
                                AlgorithmConfig(use_info_gain=False), 0, 10)
    assert metrics["diag/collapse_frac"] == 1.0 and metrics["diag/format_ok_frac"] == 0
    assert "diag/p_gold_before_search" not in metrics and "diag/ig_answer_doc_count" not in metrics


def test_the_last_step_gets_the_final_curriculum_weights_and_the_first_is_one_step_in():
    traj = _traj()
    outcomes = score_outcomes(traj, "search_tags", -2.0)
    mean_logp = np.log(np.array([[0.1, 0.4], [0.1, 1.0]], np.float32))
    scored = np.array([[True, True], [True, False]])
    cfg = AlgorithmConfig(use_curriculum=True, curriculum_f1_init=0.5, curriculum_f1_final=1.0,
                          curriculum_ig_init=1.0, curriculum_ig_final=0.5)
    weights = lambda step: [advantages_for(traj, outcomes, mean_logp, scored, cfg, step, 4)[1][k]
                            for k in ("curriculum/w_f1", "curriculum/w_ig")]
    assert weights(0) == pytest.approx([0.625, 0.875])  # step 1 of 4
    assert weights(3) == pytest.approx([1.0, 0.5])  # step 4 of 4: the final weights


# ----------------------------------------------------------------------------- controls (issue 33)

def test_the_placebo_permutes_gains_within_each_group_only():
    ig = np.array([[1.0, 2.0, 9.0], [3.0, 0.0, 0.0], [10.0, 20.0, 0.0], [30.0, 40.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]], bool)
    groups = np.array([0, 0, 1, 1])
    out = shuffle_within_groups(ig, mask, groups, np.random.default_rng([0, 3]))
    assert sorted(out[:2][mask[:2]]) == [1.0, 2.0, 3.0]  # group 0's multiset, on group 0's slots
    assert sorted(out[2:][mask[2:]]) == [10.0, 20.0, 30.0, 40.0]
    np.testing.assert_array_equal(out[~mask], ig[~mask])  # slots without a gain untouched (9 stays)
    again = shuffle_within_groups(ig, mask, groups, np.random.default_rng([0, 3]))
    np.testing.assert_array_equal(out, again)  # seeded: the same permutation every time
    assert not np.array_equal(out, ig)


def _four_searches():
    """One group of 4 rollouts, each a search turn then a wrong answer (outcome rewards all 0)."""
    loss = np.array([[0, 1, 1, 0, 1, 1]] * 4, bool)
    turn = np.where(loss, np.array([[-1, 0, 0, -1, 1, 1]] * 4), -1).astype(np.int32)
    ep = Episode("q", ("Kesmarin",), "s", "", "", "Rome", "answer", policy_text="<search>a</search>\n<answer>Rome</answer>")
    return Trajectories(np.zeros((4, 6), np.int32), np.ones((4, 6), bool), loss, turn,
                        np.array([[1, 4]] * 4, np.int32), np.full(4, 2, np.int32), np.zeros(4, np.int32),
                        np.zeros((4, 6), np.float32), (ep,) * 4)


def test_the_placebo_credits_the_shuffled_gains_and_ig_only_drops_the_outcome():
    traj = _four_searches()
    outcomes = score_outcomes(traj, "search_tags", -2.0)
    gains = np.array([0.1, 0.5, 0.2, 0.9], np.float32)
    mean_logp = np.stack([np.zeros(4, np.float32), gains], axis=1)  # log_prob_diff: turn 0 gains `gains`
    igpo = AlgorithmConfig(info_gain_type="log_prob_diff", info_gain_norm_mode="separate")
    zscore = lambda g: (g - g.mean()) / (g.std() + 1e-6)
    adv, metrics = advantages_for(traj, outcomes, mean_logp, None, igpo, 2, 10)
    np.testing.assert_allclose(adv[:, 1], zscore(gains), rtol=1e-5)  # the outcomes tie: IG alone
    placebo = dataclasses.replace(igpo, shuffle_info_gain=True, shuffle_seed=7)
    shuffled = shuffle_within_groups(gains[:, None], np.ones((4, 1), bool), np.zeros(4),
                                     np.random.default_rng([7, 2]))[:, 0]
    assert not np.array_equal(shuffled, gains)
    p_adv, p_metrics = advantages_for(traj, outcomes, mean_logp, None, placebo, 2, 10)
    np.testing.assert_allclose(p_adv[:, 1], zscore(shuffled), rtol=1e-5)
    assert p_metrics["ig/mean"] == pytest.approx(metrics["ig/mean"])  # metrics report the gains as earned
    # IG-only: an outcome that now differs (rollout 0 right) leaves the advantages as they were
    right = dataclasses.replace(traj, episodes=(dataclasses.replace(traj.episodes[0], policy_text="<answer>Kesmarin</answer>"),)
                                + traj.episodes[1:])
    ig_only = dataclasses.replace(igpo, use_outcome_reward=False)
    o_adv, _ = advantages_for(right, score_outcomes(right, "search_tags", -2.0), mean_logp, None, ig_only, 2, 10)
    np.testing.assert_allclose(o_adv, adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(o_adv[:, 4:], 0.0)  # the answer turn earns nothing of its own


def test_the_gains_std_floor_reaches_the_advantages():
    traj = _four_searches()
    outcomes = score_outcomes(traj, "search_tags", -2.0)
    gains = np.array([0.1, 0.5, 0.2, 0.9], np.float32)  # std 0.3082
    mean_logp = np.stack([np.zeros(4, np.float32), gains], axis=1)
    floored = AlgorithmConfig(info_gain_type="log_prob_diff", info_gain_norm_mode="separate", info_gain_std_floor=2.0)
    adv, _ = advantages_for(traj, outcomes, mean_logp, None, floored, 2, 10)
    np.testing.assert_allclose(adv[:, 1], (gains - gains.mean()) / (2.0 + 1e-6), rtol=1e-5)
