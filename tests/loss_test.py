"""Dual-clip PPO loss, KL estimators, entropy bonus and aggregation modes against hand-computed values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpo_jax.igpo.loss import AGG_MODES, agg_loss, aggregation_weights, kl_penalty, policy_loss

# Six loss tokens and one masked one; ε_low = ε_high = 0.2, c = 3. Per token:
#   A = +1, ρ = 1.5: max(−1.5, −1.2) = −1.2            (upper clip)
#   A = +1, ρ = 0.5: max(−0.5, −0.8) = −0.5            (no clip)
#   A = −1, ρ = 0.5: max(0.5, 0.8) = 0.8, min(0.8, 3)  (lower clip)
#   A = −1, ρ = 1.5: max(1.5, 1.2) = 1.5, min(1.5, 3)  (no clip)
#   A = −1, ρ = 5:   max(5, 1.2) = 5,   min(5, 3) = 3  (dual clip)
#   A = +2, ρ = 1:   −2
RATIO = [1.5, 0.5, 0.5, 1.5, 5.0, 1.0, 7.0]
ADV = [1.0, 1.0, -1.0, -1.0, -1.0, 2.0, -9.0]
MASK = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
PG = [-1.2, -0.5, 0.8, 1.5, 3.0, -2.0]
OLD = np.full((1, 7), math.log(0.1), np.float32)
LOGP = OLD + np.log(np.array([RATIO], np.float32))


def ppo(**options):
    return policy_loss(jnp.asarray(LOGP), OLD, np.array([ADV]), np.array([MASK]), **options)


def test_ppo_clip_both_sides_and_dual_clip():
    loss, metrics = ppo()
    assert float(loss) == pytest.approx(sum(PG) / 6, abs=1e-6)
    assert float(metrics["pg_loss"]) == pytest.approx(sum(PG) / 6, abs=1e-6)
    assert float(metrics["pg_clipfrac_upper"]) == pytest.approx(1 / 6)
    assert float(metrics["pg_clipfrac_lower"]) == pytest.approx(1 / 6)
    assert float(metrics["dual_clipfrac"]) == pytest.approx(1 / 6)
    # approx KL (old vs new) = mean(old − new) = −mean(log ρ)
    expected_kl = -sum(math.log(r) for r in RATIO[:6]) / 6
    assert float(metrics["approx_kl"]) == pytest.approx(expected_kl, abs=1e-6)
    assert "kl_loss" not in metrics and "entropy" not in metrics


def test_gradient_flows_only_through_unclipped_tokens():
    grad = jax.grad(lambda logp: ppo_loss(logp))(jnp.asarray(LOGP))
    # d(−A·ρ)/d logp = −A·ρ for unclipped tokens (token-mean over 6): token 1: −0.5/6, token 3: 1.5/6,
    # token 5: −2/6; clipped (0, 2) and dual-clipped (4) tokens and the masked token: 0
    np.testing.assert_allclose(grad[0], [0, -0.5 / 6, 0, 1.5 / 6, 0, -2 / 6, 0], atol=1e-6)


def ppo_loss(logp):
    return policy_loss(logp, OLD, np.array([ADV]), np.array([MASK]))[0]


def test_asymmetric_clip_range():
    # ε_high = 0.6: ρ = 1.5 is inside [0.8, 1.6] → −1.5, no upper clip
    loss, metrics = ppo(clip_ratio_high=0.6)
    assert float(loss) == pytest.approx((-1.5 - 0.5 + 0.8 + 1.5 + 3.0 - 2.0) / 6, abs=1e-6)
    assert float(metrics["pg_clipfrac_upper"]) == 0.0
    # ε_low = 0.6: the range is [0.4, 1.2], ρ = 0.5 is inside: the A = −1 token gives 0.5
    loss, metrics = ppo(clip_ratio_low=0.6)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 0.5 + 1.5 + 3.0 - 2.0) / 6, abs=1e-6)
    assert float(metrics["pg_clipfrac_lower"]) == 0.0


def test_ratio_one_is_minus_advantage():
    logp = np.array([[-1.0, -2.0]], np.float32)
    loss, metrics = policy_loss(logp, logp, np.array([[0.5, -1.5]]), np.array([[1, 1]]))
    assert float(loss) == pytest.approx((-0.5 + 1.5) / 2)
    assert float(metrics["approx_kl"]) == 0.0 and float(metrics["pg_clipfrac_upper"]) == 0.0


# ----------------------------------------------------------------------------- KL to the reference

def test_kl_estimators():
    logp, ref = np.array([[math.log(0.5)]]), np.array([[math.log(0.25)]])
    d = math.log(0.5) - math.log(0.25)  # = log 2
    assert float(kl_penalty(logp, ref, "kl")[0, 0]) == pytest.approx(d)
    assert float(kl_penalty(ref, logp, "kl")[0, 0]) == pytest.approx(-d)
    assert float(kl_penalty(ref, logp, "abs")[0, 0]) == pytest.approx(d)
    assert float(kl_penalty(logp, ref, "mse")[0, 0]) == pytest.approx(0.5 * d * d)
    # k3 with x = ref − logp = −log 2: exp(−log 2) − (−log 2) − 1 = 0.5 + log 2 − 1
    assert float(kl_penalty(logp, ref, "low_var_kl")[0, 0]) == pytest.approx(0.5 + math.log(2) - 1)
    assert float(kl_penalty(logp, logp, "low_var_kl")[0, 0]) == 0.0


def test_low_var_kl_is_clamped_to_ten():
    logp = np.array([[-15.0, 0.0, -40.0]], np.float32)
    ref = np.array([[0.0, -15.0, 0.0]], np.float32)
    # x = 15: e^15 − 16 ≫ 10; x = −15: e^−15 + 14 > 10; x = 40: beyond the log-ratio bound, still 10
    np.testing.assert_allclose(kl_penalty(logp, ref, "low_var_kl"), [[10.0, 10.0, 10.0]])
    # and no gradient comes through a clamped value
    grad = jax.grad(lambda lp: jnp.sum(kl_penalty(lp, ref, "low_var_kl")))(jnp.asarray(logp))
    np.testing.assert_array_equal(grad, [[0.0, 0.0, 0.0]])


def test_kl_loss_term():
    ref = LOGP - np.log(2.0).astype(np.float32)  # logp − ref = log 2 on every token
    loss, metrics = ppo(ref_logp_BL=ref, kl_coef=0.1, kl_estimator="kl")
    assert float(metrics["kl_loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["kl_ref"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(loss) == pytest.approx(sum(PG) / 6 + 0.1 * math.log(2), abs=1e-6)


# ----------------------------------------------------------------------------- entropy bonus

def test_entropy_bonus():
    entropy = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0]])  # masked token's 100 ignored
    loss, metrics = ppo(entropy_BL=entropy, entropy_coeff=0.01)
    mean_entropy = (1 + 2 + 3 + 4 + 5 + 6) / 6
    assert float(metrics["entropy"]) == pytest.approx(mean_entropy)
    assert float(loss) == pytest.approx(sum(PG) / 6 - 0.01 * mean_entropy, abs=1e-6)


# ----------------------------------------------------------------------------- aggregation

# Row 0: 3 loss tokens (1, 2, 3), row 1: 1 loss token (5), row 2: padding row, no loss token.
LOSS = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
AGG_MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("mode, options, expected", [
    ("token-mean", {}, (1 + 2 + 3 + 5) / 4),
    ("token-mean", {"num_tokens": 8}, (1 + 2 + 3 + 5) / 8),  # mini-batch total given
    ("seq-mean-token-sum", {}, ((1 + 2 + 3) + 5) / 2),  # the padding row is not a sequence
    ("seq-mean-token-sum", {"num_seqs": 4}, ((1 + 2 + 3) + 5) / 4),
    ("seq-mean-token-mean", {}, ((1 + 2 + 3) / 3 + 5 / 1) / 2),
    ("seq-mean-token-sum-norm", {"loss_scale_factor": 10}, ((1 + 2 + 3) / 10 + 5 / 10) / 2),
])
def test_agg_modes(mode, options, expected):
    assert float(agg_loss(jnp.asarray(LOSS), AGG_MASK, mode, **options)) == pytest.approx(expected)


def test_sum_norm_needs_a_constant_and_ignores_padding():
    """C is given, never the padded length: more padding columns leave the loss as it was."""
    with pytest.raises(ValueError, match="needs loss_scale_factor > 0"):
        agg_loss(jnp.asarray(LOSS), AGG_MASK, "seq-mean-token-sum-norm")
    wider = lambda x: np.pad(x, ((0, 0), (0, 5)))
    losses = [float(agg_loss(jnp.asarray(loss), mask, "seq-mean-token-sum-norm", loss_scale_factor=10))
              for loss, mask in ((LOSS, AGG_MASK), (wider(LOSS), wider(AGG_MASK)))]
    assert losses[0] == losses[1] == pytest.approx(((1 + 2 + 3) / 10 + 5 / 10) / 2)


def test_agg_ignores_non_finite_values_on_masked_tokens():
    loss = np.array([[1.0, np.inf], [np.nan, 3.0]])
    mask = np.array([[1, 0], [0, 1]])
    assert float(agg_loss(jnp.asarray(loss), mask, "token-mean")) == pytest.approx(2.0)


def test_agg_mode_in_policy_loss():
    # seq-mean-token-mean over one row is the token mean; over two rows it weights rows equally
    logp = np.zeros((2, 3), np.float32)
    adv = np.array([[1.0, 1.0, 1.0], [-2.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1], [1, 0, 0]])
    loss, _ = policy_loss(logp, logp, adv, mask, loss_agg_mode="seq-mean-token-mean")
    assert float(loss) == pytest.approx((-1.0 + 2.0) / 2)
    loss, _ = policy_loss(logp, logp, adv, mask, loss_agg_mode="token-mean")
    assert float(loss) == pytest.approx((-1 - 1 - 1 + 2) / 4)


def test_jit_and_validation():
    fn = jax.jit(policy_loss, static_argnames=("kl_estimator", "loss_agg_mode"))
    loss, _ = fn(jnp.asarray(LOGP), OLD, np.array([ADV]), np.array([MASK]), loss_agg_mode="seq-mean-token-sum")
    assert float(loss) == pytest.approx(sum(PG), abs=1e-5)  # one sequence: the token sum
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-sum"):
        ppo(loss_agg_mode="mean")
    with pytest.raises(ValueError, match="kl, abs, mse, low_var_kl"):
        ppo(kl_estimator="k3")  # checked even without a reference policy


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregation_weights_reproduce_agg_loss_with_rows_standing_for_copies(mode):
    rng = np.random.default_rng(1)
    mask = (rng.random((6, 8)) < 0.5).astype(np.float32)
    mask[2] = 0  # a row without loss tokens is not a sequence
    loss = rng.normal(size=(6, 8)).astype(np.float32)
    w = aggregation_weights(mask, mode, loss_scale_factor=20.0)  # C: used by seq-mean-token-sum-norm only
    expected = float(agg_loss(loss, mask, mode, loss_scale_factor=20.0))
    assert float(np.sum(np.asarray(w) * loss)) == pytest.approx(expected, rel=1e-5)
    # rows 0 and 4 stand for 3 and 2 copies, row 5 for none: the loss of the batch written out
    copies = np.asarray([3, 1, 1, 1, 2, 0], np.float32)
    expanded = np.repeat(np.arange(6), copies.astype(int))
    expected = float(agg_loss(loss[expanded], mask[expanded], mode, loss_scale_factor=20.0))
    w = aggregation_weights(mask, mode, loss_scale_factor=20.0, row_weight_B=copies)
    assert float(np.sum(np.asarray(w) * loss)) == pytest.approx(expected, rel=1e-5)
    # totals of a larger batch: these rows are its first part, the loss sums over the parts
    first, second = np.arange(3), np.arange(3, 6)
    totals = dict(num_tokens=float((mask * copies[:, None]).sum()),
                  num_seqs=float(((mask.sum(1) > 0) * copies).sum()))
    parts = sum(float(np.sum(np.asarray(aggregation_weights(mask[r], mode, loss_scale_factor=20.0,
                                                            row_weight_B=copies[r], **totals)) * loss[r]))
                for r in (first, second))
    assert parts == pytest.approx(expected, rel=1e-5)
    if mode == "seq-mean-token-sum-norm":
        with pytest.raises(ValueError, match="needs loss_scale_factor > 0"):
            aggregation_weights(mask, mode)  # no default from the padded length


def test_policy_loss_with_token_weights_equals_the_aggregated_loss():
    rng = np.random.default_rng(2)
    shape = (4, 6)
    logp, old, ref = (jnp.asarray(rng.normal(-1.0, 0.3, shape), jnp.float32) for _ in range(3))
    adv = jnp.asarray(rng.normal(size=shape), jnp.float32)
    ent = jnp.asarray(rng.random(shape), jnp.float32)
    mask = jnp.asarray(rng.random(shape) < 0.7, jnp.float32)
    options = dict(ref_logp_BL=ref, entropy_BL=ent, entropy_coeff=0.01, kl_coef=0.1, loss_agg_mode="seq-mean-token-mean")
    loss, m = policy_loss(logp, old, adv, mask, **options)
    w = aggregation_weights(mask, "seq-mean-token-mean")
    weighted, mw = policy_loss(logp, old, adv, mask, token_weight_BL=w, **options)
    assert float(weighted) == pytest.approx(float(loss), rel=1e-6)
    for k in m:
        assert float(mw[k]) == pytest.approx(float(m[k]), rel=1e-5, abs=1e-7), k
