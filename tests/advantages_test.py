"""Curriculum, group normalisation, discounting and token broadcast against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from igpo_jax.igpo.advantages import compute_advantages, curriculum_weights, discount, group_stats, to_tokens

EPS = 1e-6


def pop_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


# Two rollouts of one question (group 5), ragged:
#   rollout 0: 3 turns, IG rewards 3, -1 in slots 0, 1; outcome 1 in slot 2
#   rollout 1: 2 turns, IG reward 1 in slot 0;           outcome 1 in slot 1; slot 2 is padding
# (IG values are large only to keep the arithmetic readable.)
IG = np.array([[3.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
IG_MASK = np.array([[True, True, False], [True, False, False]])
OUTCOME = np.array([1.0, 1.0])
TURNS = np.array([3, 2])
GROUP = np.array([5, 5])
# tokens: prompt (−1), turn 0, tool result (−1), turn 1, ..., padding (−1)
TURN_ID = np.array([[-1, 0, 0, -1, 1, -1, 2, 2, -1],
                    [-1, -1, 0, -1, 1, 1, -1, -1, -1]])


def advantages(**options):
    return compute_advantages(OUTCOME, IG, IG_MASK, TURNS, GROUP, TURN_ID, **options)


# ----------------------------------------------------------------------------- curriculum

def test_curriculum_off_is_one_one():
    assert tuple(map(float, curriculum_weights(7, 100, use_curriculum=False))) == (1.0, 1.0)


@pytest.mark.parametrize("step, expected", [
    (0, (0.5, 1.0)),  # init
    (50, (0.5 + (1.0 - 0.5) * 0.5, 1.0 + (0.5 - 1.0) * 0.5)),  # half way: 0.75, 0.75
    (100, (1.0, 0.5)),  # final
    (150, (1.0, 0.5)),  # stays at final after total_steps
])
def test_curriculum_linear(step, expected):
    w_f1, w_ig = curriculum_weights(step, 100, use_curriculum=True, f1_init=0.5, f1_final=1.0,
                                    ig_init=1.0, ig_final=0.5)
    assert (float(w_f1), float(w_ig)) == pytest.approx(expected)


# ----------------------------------------------------------------------------- group statistics

def test_group_stats_population_std_and_single_element_rule():
    value = np.array([[1.0, 3.0], [5.0, 0.0], [4.0, 0.0], [9.0, 9.0]])
    mask = np.array([[True, True], [True, False], [True, False], [False, False]])
    group = np.array([0, 0, 2, 3])
    mean, std = group_stats(value, mask, group)
    # group 0: {1, 3, 5}: mean 3, population var (4 + 0 + 4) / 3; group 2: {4}: std := 1;
    # group 3: no value at all: mean 0, std := 1
    np.testing.assert_allclose(mean, [3.0, 3.0, 4.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(std, [math.sqrt(8 / 3), math.sqrt(8 / 3), 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("group_size", [8, 16])
@pytest.mark.parametrize("mode", ["joint", "separate", "grpo"])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(group_size, mode):
    """Equal outcomes and equal gains in a group carry no preference: every advantage is exactly 0.
    (Summed in float32 as they are, the mean was one ulp off for about half of such groups at
    G = 8, and (r − mean) / (std + 1e-6) gave every rollout ±0.056 of one sign.)"""
    turns = 3  # two searches (two gains each), then the answer
    rng = np.random.default_rng(0)
    for _ in range(25):  # equal values drawn afresh: what must hold holds for any value
        outcome, gain = rng.uniform(0, 1, size=2).astype(np.float32)
        if mode == "joint":  # one pool of outcome and gain rewards: all of them equal
            gain = outcome
        n = 2 * group_size  # two groups, the second's values differ by rollout (its advantages are not 0)
        outcome_N = np.concatenate([np.full(group_size, outcome), np.linspace(0, 1, group_size)]).astype(np.float32)
        ig_NT = np.zeros((n, turns), np.float32)
        ig_NT[:, :2] = gain
        ig_NT[group_size:, 0] = np.linspace(0, 1, group_size)
        ig_mask = np.zeros((n, turns), bool)
        ig_mask[:, :2] = True
        turn_id = np.tile(np.array([0, 0, -1, 1, 1, -1, 2, 2]), (n, 1))
        adv = compute_advantages(outcome_N, ig_NT, ig_mask, np.full(n, turns), np.repeat([0, 1], group_size),
                                 turn_id, use_info_gain=mode != "grpo", norm_mode="joint" if mode == "grpo" else mode)
        token = np.asarray(adv.token_NL)
        assert np.all(token[:group_size] == 0.0), token[:group_size]
        assert np.any(token[group_size:] != 0.0)


# ----------------------------------------------------------------------------- normalisation

def test_joint_normalisation_gamma_one():
    # R = every turn reward of the group = {3, -1, 1 | 1, 1}: mean 1, population std sqrt(8/5)
    mean, std = 1.0, pop_std([3, -1, 1, 1, 1])
    assert std == pytest.approx(math.sqrt(8 / 5))
    a0 = [(3 - mean) / (std + EPS), (-1 - mean) / (std + EPS), (1 - mean) / (std + EPS)]
    a1 = [(1 - mean) / (std + EPS), (1 - mean) / (std + EPS), 0.0]
    out = advantages(norm_mode="joint", gamma=1.0)
    np.testing.assert_allclose(out.normalized_NT, [a0, a1], atol=1e-6)
    # γ = 1: each turn gets the sum of its own and all later normalised rewards
    np.testing.assert_allclose(out.turn_NT, [[a0[0] + a0[1] + a0[2], a0[1] + a0[2], a0[2]],
                                             [a1[0] + a1[1], a1[1], 0.0]], atol=1e-6)


def test_separate_normalisation():
    # IG over {3, -1, 1}: mean 1, std sqrt(8/3); outcomes over {1, 1}: mean 1, std 0
    ig_std = pop_std([3, -1, 1])
    assert ig_std == pytest.approx(math.sqrt(8 / 3))
    out = advantages(norm_mode="separate")
    expected = [[(3 - 1) / (ig_std + EPS), (-1 - 1) / (ig_std + EPS), (1 - 1) / (0 + EPS)],
                [(1 - 1) / (ig_std + EPS), (1 - 1) / (0 + EPS), 0.0]]
    np.testing.assert_allclose(out.normalized_NT, expected, atol=1e-6)


def test_separate_with_distinct_outcomes():
    outcome = np.array([1.0, 0.0])  # mean 0.5, std 0.5 → ±0.5 / (0.5 + ε), in each final slot
    out = compute_advantages(outcome, IG, IG_MASK, TURNS, GROUP, TURN_ID, norm_mode="separate")
    final = [float(out.normalized_NT[0, 2]), float(out.normalized_NT[1, 1])]
    assert final == pytest.approx([0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS)])


def test_no_std_is_mean_centring_only():
    out = advantages(norm_mode="joint", norm_by_std=False)
    # joint mean 1: r - 1
    np.testing.assert_allclose(out.normalized_NT, [[3 - 1, -1 - 1, 1 - 1], [1 - 1, 1 - 1, 0]], atol=1e-6)
    out = advantages(norm_mode="separate", norm_by_std=False)
    np.testing.assert_allclose(out.normalized_NT, [[3 - 1, -1 - 1, 1 - 1], [1 - 1, 1 - 1, 0]], atol=1e-6)


def test_single_ig_reward_in_group_normalises_to_zero_not_nan():
    # separate mode, only one IG reward in the group: its statistic has 1 element → std := 1,
    # mean = itself → (r - r) / (1 + ε) = 0
    out = compute_advantages(np.array([1.0, 0.0]), np.array([[0.7, 0.0], [0.0, 0.0]]),
                             np.array([[True, False], [False, False]]), np.array([2, 1]), np.array([0, 0]),
                             np.array([[0, 1], [0, -1]]), norm_mode="separate")
    assert np.all(np.isfinite(out.normalized_NT))
    assert float(out.normalized_NT[0, 0]) == 0.0


def test_groups_are_normalised_separately():
    # two groups with ids 7 and 3 (any ints), one turn each (no IG): plain outcome normalisation
    outcome = np.array([1.0, 0.0, 0.2, 0.2])
    out = compute_advantages(outcome, np.zeros((4, 1)), np.zeros((4, 1), bool), np.ones(4, int),
                             np.array([7, 7, 3, 3]), np.zeros((4, 1), int))
    # group 7: {1, 0} → ±0.5 / (0.5 + ε); group 3: {0.2, 0.2}: std 0 → 0 / ε = 0
    np.testing.assert_allclose(out.turn_NT[:, 0], [0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), 0.0, 0.0], atol=1e-6)


def test_curriculum_weights_scale_rewards_before_normalising():
    # joint, no std, w_f1 = 0.5, w_ig = 2: weighted rewards {6, -2, 0.5 | 2, 0.5}, mean 7 / 5
    w = [2 * 3, 2 * -1, 0.5 * 1, 2 * 1, 0.5 * 1]
    mean = sum(w) / 5
    out = advantages(norm_mode="joint", norm_by_std=False, f1_weight=0.5, ig_weight=2.0)
    np.testing.assert_allclose(out.normalized_NT, [[w[0] - mean, w[1] - mean, w[2] - mean],
                                                   [w[3] - mean, w[4] - mean, 0.0]], atol=1e-5)
    assert float(out.stats["curriculum/ig_weight"]) == 2.0


def test_missing_ig_is_excluded_from_statistics_and_adds_zero():
    # rollout 0's slot-1 IG reward is missing: R = {3, 1 | 1, 1}: mean 1.5 (no-std for readability)
    mask = np.array([[True, False, False], [True, False, False]])
    out = compute_advantages(OUTCOME, IG, mask, TURNS, GROUP, TURN_ID, norm_by_std=False, gamma=1.0)
    mean = (3 + 1 + 1 + 1) / 4
    a0 = [3 - mean, 0.0, 1 - mean]
    np.testing.assert_allclose(out.normalized_NT[0], a0, atol=1e-6)
    # slot 1 still carries the later turn's advantage: 0 + (1 - mean)
    np.testing.assert_allclose(out.turn_NT[0], [a0[0] + a0[1] + a0[2], a0[1] + a0[2], a0[2]], atol=1e-6)


def test_ig_on_the_final_slot_is_ignored():
    # a stray IG reward in the final slot (or past it) must not count: the final slot is F1's
    mask = np.array([[True, True, True], [True, True, True]])
    ig = np.array([[3.0, -1.0, 100.0], [1.0, 100.0, 100.0]])
    a = compute_advantages(OUTCOME, ig, mask, TURNS, GROUP, TURN_ID)
    b = advantages()
    np.testing.assert_allclose(a.normalized_NT, b.normalized_NT, atol=1e-6)


# ----------------------------------------------------------------------------- discounting

def test_discount_gamma_below_one():
    adv = np.array([[1.0, 2.0, 4.0], [8.0, 16.0, 0.0]])
    g = 0.5
    expected = [[1 + g * 2 + g * g * 4, 2 + g * 4, 4], [8 + g * 16, 16, 0]]
    np.testing.assert_allclose(discount(adv, g), expected, atol=1e-6)
    np.testing.assert_allclose(discount(adv, 1.0), [[7, 6, 4], [24, 16, 0]], atol=1e-6)
    np.testing.assert_allclose(discount(adv, 0.0), adv, atol=1e-6)  # γ = 0: own reward only


def test_gamma_in_compute_advantages():
    out = advantages(norm_by_std=False, gamma=0.5)
    a0, a1 = [2.0, -2.0, 0.0], [0.0, 0.0, 0.0]  # joint mean 1, no std
    np.testing.assert_allclose(out.turn_NT[0], [a0[0] + 0.5 * a0[1] + 0.25 * a0[2], a0[1] + 0.5 * a0[2], a0[2]])
    np.testing.assert_allclose(out.turn_NT[1], a1)


# ----------------------------------------------------------------------------- tokens

def test_token_broadcast_with_turn_ids():
    turn = np.array([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    # rollout 1 has 2 turns: a token claiming turn 2 is outside its turns → 0
    ids = np.array([[-1, 0, 0, -1, 1, -1, 2, 2, -1], [-1, -1, 0, -1, 1, 1, 2, -1, -1]])
    out = to_tokens(turn, ids, np.array([3, 2]))
    np.testing.assert_array_equal(out, [[0, 10, 10, 0, 20, 0, 30, 30, 0], [0, 0, 40, 0, 50, 50, 0, 0, 0]])


def test_compute_advantages_tokens_follow_turns():
    out = advantages(norm_by_std=False)
    t0, t1 = np.asarray(out.turn_NT[0]), np.asarray(out.turn_NT[1])
    np.testing.assert_allclose(out.token_NL[0], [0, t0[0], t0[0], 0, t0[1], 0, t0[2], t0[2], 0], atol=1e-6)
    np.testing.assert_allclose(out.token_NL[1], [0, 0, t1[0], 0, t1[1], t1[1], 0, 0, 0], atol=1e-6)


# ----------------------------------------------------------------------------- plain GRPO

def test_grpo_switch():
    outcome = np.array([1.0, 0.0, 0.0, 1.0])  # G = 4: mean 0.5, population std 0.5
    ig = np.array([[9.0, 0.0], [9.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # ignored
    ig_mask = np.array([[True, False], [True, False], [False, False], [False, False]])
    turns = np.array([2, 2, 1, 1])
    ids = np.array([[-1, 0, -1, 1, 1], [0, 0, -1, 1, -1], [-1, 0, 0, -1, -1], [0, -1, -1, -1, -1]])
    out = compute_advantages(outcome, ig, ig_mask, turns, np.zeros(4, int), ids, use_info_gain=False, gamma=0.5)
    a = 0.5 / (0.5 + EPS)
    # every generated token of a rollout gets its one advantage, whatever the turn; no discount
    np.testing.assert_allclose(out.token_NL, [[0, a, 0, a, a], [-a, -a, 0, -a, 0],
                                              [0, -a, -a, 0, 0], [a, 0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(out.turn_NT, [[a, a], [-a, -a], [-a, 0], [a, 0]], atol=1e-6)


def test_grpo_single_rollout_group_gets_zero():
    out = compute_advantages(np.array([0.7]), np.zeros((1, 1)), np.zeros((1, 1), bool), np.array([1]),
                             np.array([0]), np.array([[0, 0]]), use_info_gain=False)
    np.testing.assert_array_equal(out.token_NL, [[0.0, 0.0]])


# ----------------------------------------------------------------------------- plumbing

def test_stats_and_traced_weights():
    # the curriculum weights come in as traced arrays: no recompile per step
    w_f1, w_ig = curriculum_weights(50, 100, use_curriculum=True)
    out = advantages(norm_mode="separate", gamma=0.9, f1_weight=w_f1, ig_weight=w_ig)
    assert float(out.stats["curriculum/f1_weight"]) == pytest.approx(0.75)
    stats = out.stats
    assert float(stats["reward/ig_mean"]) == pytest.approx((3 - 1 + 1) / 3)  # raw, unweighted
    assert float(stats["reward/ig_present_fraction"]) == 1.0  # 3 of 3 non-final turns
    assert float(stats["reward/outcome_mean"]) == 1.0


def test_unknown_norm_mode():
    with pytest.raises(ValueError, match="joint, separate"):
        advantages(norm_mode="both")


def test_info_gain_output_feeds_compute_advantages():
    from igpo_jax.igpo.rewards import info_gain

    # rollout 0: P = 0.1 → 0.4 after turn 1, then the final turn; rollout 1: one turn only
    logp = np.array([[math.log(0.1), math.log(0.4)], [math.log(0.2), np.nan]])
    ig = info_gain(logp, np.array([2, 1]), "prob_diff", valid_NT=np.array([[True, True], [True, False]]))
    out = compute_advantages(np.array([1.0, 0.0]), ig.reward_NT, ig.mask_NT, np.array([2, 1]), np.array([0, 0]),
                             np.array([[0, 1], [0, -1]]), norm_by_std=False)
    # joint R = {0.4 - 0.1, 1 | 0}: mean 1.3 / 3
    mean = (0.3 + 1.0 + 0.0) / 3
    np.testing.assert_allclose(out.normalized_NT, [[0.3 - mean, 1 - mean], [0 - mean, 0]], atol=1e-6)
    np.testing.assert_allclose(out.token_NL, [[0.3 - mean + 1 - mean, 1 - mean], [0 - mean, 0]], atol=1e-6)


def _with_curriculum(w_f1, w_ig, **options):
    return np.asarray(advantages(f1_weight=w_f1, ig_weight=w_ig, **options).normalized_NT)


def test_curriculum_acts_in_joint_mode():
    """Pooled, the weights change the F1 rewards' scale against the IG rewards' in one mean/std."""
    early, late = _with_curriculum(0.5, 1.0, norm_mode="joint"), _with_curriculum(1.0, 0.5, norm_mode="joint")
    assert np.max(np.abs(early - late)) > 0.1


def test_curriculum_cancels_in_separate_mode_and_in_grpo_under_std_division():
    """Each reward type z-scored on its own: a weight on it divides out (hence refused by validate)."""
    for options in ({"norm_mode": "separate"}, {"use_info_gain": False}):
        early, late = _with_curriculum(0.5, 1.0, **options), _with_curriculum(1.0, 0.5, **options)
        np.testing.assert_allclose(early, late, atol=1e-5)


def test_curriculum_scales_each_part_without_std_division():
    early = _with_curriculum(0.5, 1.0, norm_mode="separate", norm_by_std=False)
    late = _with_curriculum(1.0, 0.5, norm_mode="separate", norm_by_std=False)
    ig_slots = IG_MASK  # IG part halves from early to late
    np.testing.assert_allclose(late[ig_slots], 0.5 * early[ig_slots], atol=1e-6)


# ----------------------------------------------------------------------------- IG-only (issue 33)

@pytest.mark.parametrize("norm_mode", ["separate", "joint"])
def test_ig_only_leaves_the_outcome_out_by_hand(norm_mode):
    # the group's gains {3, −1, 1}: mean 1, population std sqrt(8/3) → 3 ↦ +2/std, −1 ↦ −2/std, 1 ↦ 0;
    # the outcomes (both 1) add nothing, in either mode; γ = 0.5 carries turn 1's −2/std back to turn 0
    z = 2.0 / (math.sqrt(8.0 / 3.0) + EPS)
    out = advantages(use_outcome=False, norm_mode=norm_mode, gamma=0.5)
    np.testing.assert_allclose(np.asarray(out.normalized_NT), [[z, -z, 0.0], [0.0, 0.0, 0.0]], rtol=1e-5, atol=1e-6)
    turn0 = z - 0.5 * z
    np.testing.assert_allclose(np.asarray(out.token_NL),
                               [[0, turn0, turn0, 0, -z, 0, 0, 0, 0], [0] * 9], rtol=1e-5, atol=1e-6)
    # the outcome is out: rewards that now differ within the group change nothing
    changed = compute_advantages(np.array([1.0, 0.0]), IG, IG_MASK, TURNS, GROUP, TURN_ID, use_outcome=False,
                                 norm_mode=norm_mode, gamma=0.5)
    np.testing.assert_allclose(np.asarray(changed.token_NL), np.asarray(out.token_NL), atol=1e-6)


def test_ig_only_needs_information_gain():
    with pytest.raises(ValueError, match="use_outcome=False needs use_info_gain=True"):
        advantages(use_outcome=False, use_info_gain=False)


# ----------------------------------------------------------------------------- IG norm scope and std floor

def test_per_turn_scope_normalises_each_turn_slot_over_the_group_by_hand():
    # the module's group: slot 0 gains {3, 1}: mean 2, std 1 → +1, −1; slot 1 holds one gain (−1):
    # nothing to compare it with → 0. Pooled ('group') it would be (−1 − 1) / sqrt(8/3).
    out = advantages(norm_mode="separate", ig_scope="turn")
    z = 1.0 / (1.0 + EPS)
    np.testing.assert_allclose(np.asarray(out.normalized_NT), [[z, 0.0, 0.0], [-z, 0.0, 0.0]], atol=1e-6)
    pooled = advantages(norm_mode="separate")
    assert float(pooled.normalized_NT[0, 1]) == pytest.approx(-2 / math.sqrt(8 / 3), rel=1e-5)


def test_identical_rollouts_get_no_ig_advantage_per_turn_but_do_pooled():
    # two identical rollouts, gains 0.1 then 0.5, the same (wrong) outcome: pooled over the group's
    # turns {0.1, 0.5, 0.1, 0.5} (mean 0.3, std 0.2) turn 1 gets −1 and turn 2 +1 in both, though
    # nothing tells them apart; per turn slot every gain equals its peers' → 0
    ig = np.array([[0.1, 0.5, 0.0], [0.1, 0.5, 0.0]])
    mask = np.array([[True, True, False]] * 2)
    args = (np.zeros(2), ig, mask, np.array([3, 3]), np.array([0, 0]), np.array([[0, 1, 2]] * 2))
    pooled = compute_advantages(*args, norm_mode="separate")
    np.testing.assert_allclose(np.asarray(pooled.turn_NT), [[0.0, 1.0, 0.0]] * 2, atol=1e-4)
    per_turn = compute_advantages(*args, norm_mode="separate", ig_scope="turn")
    np.testing.assert_array_equal(np.asarray(per_turn.turn_NT), np.zeros((2, 3)))


def test_std_floor_keeps_a_noise_level_spread_small():
    # issue 33's demo: two searches one space apart found the same document and gained 0.8741 and
    # 0.8743: std 1e-4, z-scored to ±1. With a floor of 0.5 nats: ±1e-4 / 0.5
    args = (np.zeros(2), np.array([[0.8741, 0.0], [0.8743, 0.0]]), np.array([[True, False]] * 2),
            np.array([2, 2]), np.array([0, 0]), np.array([[0, 1]] * 2))
    plain = compute_advantages(*args, norm_mode="separate")
    np.testing.assert_allclose(np.asarray(plain.normalized_NT)[:, 0], [-1.0, 1.0], atol=2e-2)
    floored = compute_advantages(*args, norm_mode="separate", ig_std_floor=0.5)
    np.testing.assert_allclose(np.asarray(floored.normalized_NT)[:, 0], [-2e-4, 2e-4], atol=1e-6)
    # a spread above the floor is z-scored as before: the module's gains {3, −1, 1}, std 1.63 > 0.5
    np.testing.assert_allclose(np.asarray(advantages(norm_mode="separate", ig_std_floor=0.5).normalized_NT),
                               np.asarray(advantages(norm_mode="separate").normalized_NT), atol=1e-6)


def test_scope_and_floor_refused_where_the_gains_share_the_outcomes_statistic():
    with pytest.raises(ValueError, match="'joint' pools them"):
        advantages(norm_mode="joint", ig_scope="turn")
    with pytest.raises(ValueError, match="'joint' pools them"):
        advantages(norm_mode="joint", ig_std_floor=0.5)
    with pytest.raises(ValueError, match="unknown info_gain_norm_scope"):
        advantages(norm_mode="separate", ig_scope="position")
    # IG-only has no outcome to pool with: allowed in either mode
    advantages(norm_mode="joint", use_outcome=False, ig_scope="turn", ig_std_floor=0.5)
