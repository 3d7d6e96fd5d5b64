"""Dynamic sampling's pure logic: which groups are informative, and a batch of whole groups gathered
over rounds (igpo_jax/igpo/group_filter.py)."""

from __future__ import annotations

import numpy as np
import pytest

from igpo_jax.igpo import group_filter
from igpo_jax.igpo.advantages import compute_advantages
from igpo_jax.igpo.scoring import TurnScores
from igpo_jax.rollout.trajectories import Episode, Trajectories

G, T = 2, 3


def _groups(lengths_B, tag: str, with_scores: bool = True) -> group_filter.Groups:
    """B groups of G rollouts; group b's rows have lengths_B[b] tokens, each row's tokens identify it
    (100·b + row in group), every token generated in turn 0."""
    n, length = len(lengths_B) * G, max(lengths_B)
    tokens = np.zeros((n, length), np.int32)
    valid = np.zeros((n, length), bool)
    for i in range(n):
        tokens[i, :lengths_B[i // G]] = 100 * (i // G) + i % G + 1
        valid[i, :lengths_B[i // G]] = True
    traj = Trajectories(tokens_NL=tokens, valid_NL=valid, loss_mask_NL=valid.copy(),
                        turn_id_NL=np.where(valid, 0, -1).astype(np.int32),
                        turn_start_NT=np.tile(np.array([0, -1, -1], np.int32), (n, 1)),
                        num_turns_N=np.ones(n, np.int32), group_id_N=np.repeat(np.arange(len(lengths_B)), G),
                        sampled_logprob_NL=np.where(valid, -0.5, 0.0).astype(np.float32),
                        episodes=tuple(Episode(f"{tag}{i // G}", ("a",), "src", "", "", None, "answer")
                                       for i in range(n)))
    scores = TurnScores(np.full((n, T), 0.25, np.float32), np.ones((n, T), bool),
                        np.where(valid, -1.0, 0.0).astype(np.float32)) if with_scores else None
    advantage = np.where(valid, np.arange(n, dtype=np.float32)[:, None] - 1.5, 0.0).astype(np.float32)
    return group_filter.Groups(tuple(f"{tag}{b}" for b in range(len(lengths_B))), traj, scores, advantage)


def test_grpo_groups_with_tied_outcome_rewards_are_the_uninformative_ones():
    reward_N = np.array([1.0, 1.0, 0.0, 0.5, -2.0, -2.0, 0.0, 0.0], np.float32)  # tied, mixed, tied, tied
    group_N = np.repeat(np.arange(4), G)
    turn_id_NL = np.zeros((8, 4), np.int32)
    adv = compute_advantages(reward_N, np.zeros((8, 1), np.float32), np.zeros((8, 1), bool), np.ones(8, np.int32),
                             group_N, turn_id_NL, use_info_gain=False)
    advantage_NL, mask_NL = np.asarray(adv.token_NL), np.ones((8, 4), bool)
    expected = [False, True, False, False]
    for metric in group_filter.OUTCOME_METRICS + ("advantage",):
        got = group_filter.informative_groups(metric, G, advantage_NL, mask_NL, reward_N=reward_N)
        assert got.tolist() == expected, metric


def test_igpo_groups_with_tied_outcomes_but_different_gains_keep_a_signal():
    """Both rollouts answer equally well, but one search gained information and the other did not:
    the advantages differ, so 'advantage' keeps the group; 'score' drops it on the tied outcome."""
    reward_N = np.array([1.0, 1.0, 0.0, 0.0], np.float32)
    # group 1: the gains tie with each other and with the outcomes (joint normalisation pools them)
    ig_NT = np.array([[0.4, 0], [0.0, 0], [0.0, 0], [0.0, 0]], np.float32)
    turn_id_NL = np.array([[0, 0, 1, 1]] * 4, np.int32)
    adv = compute_advantages(reward_N, ig_NT, np.array([[True, False]] * 4), np.full(4, 2, np.int32),
                             np.array([0, 0, 1, 1]), turn_id_NL)
    advantage_NL, mask_NL = np.asarray(adv.token_NL), np.ones((4, 4), bool)
    assert group_filter.informative_groups("advantage", G, advantage_NL, mask_NL).tolist() == [True, False]
    assert group_filter.informative_groups("score", G, advantage_NL, mask_NL, reward_N=reward_N).tolist() == \
        [False, False]


def test_acc_looks_at_exact_match_only_and_off_mask_advantages_do_not_count():
    em_N = np.array([1, 0, 1, 1], np.float32)
    advantage_NL = np.array([[0, 0, 5.0]] * 4, np.float32)  # non-zero only where no token is generated
    mask_NL = np.array([[1, 1, 0]] * 4, bool)
    assert group_filter.informative_groups("acc", G, advantage_NL, mask_NL, em_N=em_N).tolist() == [True, False]
    assert group_filter.informative_groups("advantage", G, advantage_NL, mask_NL).tolist() == [False, False]
    with pytest.raises(ValueError, match="needs the rollouts' exact match"):
        group_filter.informative_groups("acc", G, advantage_NL, mask_NL)
    with pytest.raises(ValueError, match="unknown filter_groups metric 'std'"):
        group_filter.informative_groups("std", G, advantage_NL, mask_NL)


def test_take_and_concatenate_keep_whole_groups_row_aligned_with_padding_and_new_ids():
    first, second = _groups([3, 5], "r0q"), _groups([2, 7, 4], "r1q", )
    picked = group_filter.concatenate([group_filter.take_groups(first, [1]),
                                       group_filter.take_groups(second, [2, 0])])
    traj = picked.traj
    assert picked.examples == ("r0q1", "r1q2", "r1q0")
    assert [e.question_index for e in traj.episodes] == ["r0q1", "r0q1", "r1q2", "r1q2", "r1q0", "r1q0"]
    assert traj.tokens_NL.shape == (6, 5)  # the longest kept row (5), not the longest rolled out (7)
    assert traj.tokens_NL[:, 0].tolist() == [101, 102, 201, 202, 1, 2]
    assert traj.valid_NL.sum(axis=1).tolist() == [5, 5, 4, 4, 2, 2]
    assert traj.group_id_N.tolist() == [0, 0, 1, 1, 2, 2]
    # padding: off every mask, turn id −1, advantage and old log-prob 0
    pad = ~traj.valid_NL
    assert not traj.loss_mask_NL[pad].any() and (traj.turn_id_NL[pad] == -1).all()
    assert (picked.advantage_NL[pad] == 0).all() and (picked.scores.token_logp_NL[pad] == 0).all()
    # each row keeps its own values
    np.testing.assert_array_equal(picked.advantage_NL[:, 0], [0.5, 1.5, 2.5, 3.5, -1.5, -0.5])
    assert picked.scores.mean_logp_NT.shape == (6, T) and picked.scores.valid_NT.all()
    grpo = group_filter.concatenate([_groups([3], "a", with_scores=False), _groups([4], "b", with_scores=False)])
    assert grpo.scores is None and grpo.num_groups == 2


def test_selection_takes_informative_groups_from_later_rounds_until_the_batch_is_full():
    selection = group_filter.Selection(quota=3)
    selection.add(_groups([3, 4, 5], "r0q"), [False, True, False])
    assert selection.missing == 2
    selection.add(_groups([6, 2, 3], "r1q"), [True, False, True])
    assert selection.missing == 0
    batch = selection.batch()
    assert batch.examples == ("r0q1", "r1q0", "r1q2")
    assert batch.traj.num_rollouts == 3 * G and batch.traj.tokens_NL.shape[1] == 6
    assert selection.metrics(rounds=2, cap_hit=False) == {
        "filter_groups/rounds": 2.0, "filter_groups/generated": 6.0, "filter_groups/informative": 3.0,
        "filter_groups/dropped": 3.0, "filter_groups/kept": 3.0, "filter_groups/filled": 0.0,
        "filter_groups/cap_hit": 0.0}


def test_surplus_informative_groups_of_the_last_round_are_left_out():
    selection = group_filter.Selection(quota=2)
    selection.add(_groups([3, 3, 3], "r0q"), [True, True, True])
    assert selection.batch().examples == ("r0q0", "r0q1")
    assert selection.metrics(1, False)["filter_groups/informative"] == 3.0
    assert selection.metrics(1, False)["filter_groups/kept"] == 2.0


def test_at_the_cap_the_remaining_slots_hold_the_earliest_dropped_groups():
    selection = group_filter.Selection(quota=4)
    selection.add(_groups([3, 4], "r0q"), [False, True])
    selection.add(_groups([5, 2], "r1q"), [False, False])
    assert selection.missing == 3
    batch = selection.batch()
    assert batch.examples == ("r0q1", "r0q0", "r1q0", "r1q1")  # informative first, then dropped in order
    assert batch.traj.num_rollouts == 4 * G  # the update batch's shape does not change
    assert batch.traj.group_id_N.tolist() == np.repeat(np.arange(4), G).tolist()
    metrics = selection.metrics(rounds=2, cap_hit=True)
    assert metrics["filter_groups/kept"] == 1.0 and metrics["filter_groups/filled"] == 3.0
    assert metrics["filter_groups/dropped"] == 3.0 and metrics["filter_groups/cap_hit"] == 1.0


def test_round_cap_zero_means_one_pass_over_the_data():
    assert group_filter.round_cap(3, batches_per_epoch=50) == 3
    assert group_filter.round_cap(0, batches_per_epoch=50) == 50
    with pytest.raises(ValueError, match="must be ≥ 0"):
        group_filter.round_cap(-1, 5)


def test_extra_rounds_sample_with_seeds_of_their_own_and_the_first_round_keeps_todays():
    from igpo_jax.rollout.episodes import row_seeds

    first = row_seeds(7, 8)
    assert row_seeds(7, 8, round_index=0) == first  # a run without extra rounds samples as before
    rounds = [row_seeds(7, 8, round_index=r) for r in range(4)]
    assert len({s for seeds in rounds for s in seeds}) == 4 * 8  # every row of every round its own
    assert rounds[2] == row_seeds(7, 8, round_index=2)  # deterministic: a resumed step samples the same
    assert row_seeds(8, 8, round_index=1) != rounds[1]


def test_filter_groups_metrics_combine_across_processes_by_meaning():
    """Each process fills its own share: group counts add up; the rounds are decided together and a
    cap hit on any process is the step's."""
    from igpo_jax.reporting import host_metrics

    a = group_filter.Selection(2)
    a.add(_groups([3, 3], "a"), [True, True])
    b = group_filter.Selection(2)
    b.add(_groups([3, 3], "b"), [False, True])
    b.add(_groups([3, 3], "c"), [False, False])
    out = host_metrics.combine([a.metrics(2, cap_hit=False), b.metrics(2, cap_hit=True)], [4, 8], [1, 1])
    assert out == {"filter_groups/rounds": 2.0, "filter_groups/generated": 6.0, "filter_groups/informative": 3.0,
                   "filter_groups/dropped": 3.0, "filter_groups/kept": 3.0, "filter_groups/filled": 1.0,
                   "filter_groups/cap_hit": 1.0}
