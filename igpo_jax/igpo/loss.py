"""Per-token policy loss (IGPO_SPEC §4): dual-clip PPO, KL to the reference policy, entropy bonus,
aggregated as veRL's `loss_agg_mode`. jnp only, differentiable in `logp_BL` (and `entropy_BL`);
the public functions are jitted with their string options static.

Legend: B sequences, L tokens.

    loss, metrics = policy_loss(logp_BL, old_logp_BL, advantage_BL, mask_BL, ref_logp_BL=..., ...)
    loss = pg_loss + kl_coef · kl_loss − entropy_coeff · entropy_loss   (each aggregated the same way)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("kl", "abs", "mse", "low_var_kl")
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_LOG_RATIO_BOUND = 20.0  # as veRL: exp(±20) keeps ρ finite when π drifts far, so 0·∞ cannot make NaN


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")


@functools.partial(jax.jit, static_argnames="estimator")
def kl_penalty(logp_BL, ref_logp_BL, estimator: str = "low_var_kl"):
    """Per-token estimate of KL(π_θ ‖ π_ref) from sampled tokens (veRL's kl_penalty).

    'kl' k1 = logp − ref; 'abs' |logp − ref|; 'mse' k2 = ½(logp − ref)²;
    'low_var_kl' k3 = exp(ref − logp) − (ref − logp) − 1, clamped to [−10, 10].
    """
    _check("kl estimator", estimator, KL_ESTIMATORS)
    diff_BL = logp_BL - ref_logp_BL
    if estimator == "kl":
        return diff_BL
    if estimator == "abs":
        return jnp.abs(diff_BL)
    if estimator == "mse":
        return 0.5 * jnp.square(diff_BL)
    # k3 ≥ 0 is unbiased and low-variance; the inner bound only keeps exp finite (k3 at ±20 is
    # already past the outer clamp, so it changes no value).
    x_BL = jnp.clip(ref_logp_BL - logp_BL, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return jnp.clip(jnp.exp(x_BL) - x_BL - 1.0, -10.0, 10.0)


def check_loss_scale_factor(mode: str, loss_scale_factor) -> None:
    """'seq-mean-token-sum-norm' divides by a constant C that the caller must give: no default
    from the array's shape, whose padded length changes from batch to batch."""
    if mode == "seq-mean-token-sum-norm" and (loss_scale_factor is None or (
            isinstance(loss_scale_factor, (int, float)) and loss_scale_factor <= 0)):
        raise ValueError(f"loss_agg_mode='seq-mean-token-sum-norm' needs loss_scale_factor > 0 (the constant C "
                         f"each sequence's token sum is divided by), got {loss_scale_factor!r}")


@functools.partial(jax.jit, static_argnames="mode")
def agg_loss(loss_BL, mask_BL, mode: str, *, loss_scale_factor=None, num_tokens=None, num_seqs=None):
    """Aggregate a per-token loss to a scalar.

    'token-mean': Σ mask·loss / Σ mask.
    'seq-mean-token-sum': mean over sequences of each sequence's token sum.
    'seq-mean-token-mean': mean over sequences of each sequence's token mean.
    'seq-mean-token-sum-norm' (Dr. GRPO): mean over sequences of token sum / C, C = loss_scale_factor
      (required: a constant of the run, e.g. the most tokens an episode can generate; the padded
      length L would change the gradient's scale with each batch's longest row). veRL divides the
      SUM over sequences by C; we take the mean, as the mode's name and Dr. GRPO's 1/G say, so that
      the loss scale does not grow with the (micro-)batch size.
    Sequences without any loss token (padding rows) are not counted in a sequence mean.

    num_tokens / num_seqs replace the local token / sequence counts: with gradient accumulation,
    pass the mini-batch totals and sum the micro-batch losses to get exactly the mini-batch loss.
    """
    _check("loss_agg_mode", mode, AGG_MODES)
    check_loss_scale_factor(mode, loss_scale_factor)
    loss_BL = jnp.asarray(loss_BL)
    mask_BL = jnp.asarray(mask_BL, loss_BL.dtype)
    # where, not only a product: a non-finite value on a masked token must not poison the sum
    token_sum_B = jnp.sum(jnp.where(mask_BL != 0, loss_BL * mask_BL, 0.0), axis=-1)
    if mode == "token-mean":
        denominator = jnp.sum(mask_BL) if num_tokens is None else num_tokens
        return jnp.sum(token_sum_B) / jnp.maximum(denominator, 1)
    count_B = jnp.sum(mask_BL, axis=-1)
    if num_seqs is None:
        num_seqs = jnp.sum(count_B > 0)
    if mode == "seq-mean-token-sum":
        per_seq_B = token_sum_B
    elif mode == "seq-mean-token-mean":
        per_seq_B = token_sum_B / jnp.maximum(count_B, 1)
    else:
        per_seq_B = token_sum_B / loss_scale_factor
    return jnp.sum(per_seq_B) / jnp.maximum(num_seqs, 1)


def aggregation_weights(mask_BL, mode: str, *, loss_scale_factor=None, row_weight_B=None, num_tokens=None,
                        num_seqs=None):
    """Per-token weights w with Σ w · x = `agg_loss(x, mask, mode)`, where row b stands for
    `row_weight_B[b]` identical rows (default 1; 0: a row that is not there). num_tokens / num_seqs:
    the totals of a larger batch (with multiplicity) when these rows are a part of it — a
    micro-batch, or a mini-batch some of whose rows are not computed — so that the parts' sums add
    up to the whole's loss. The loss-mask-weighted token count of a row is its own (its mean in
    'seq-mean-token-mean' does not depend on its copies).

    token-mean k/T; seq-mean-token-sum k/S; seq-mean-token-mean k/(S · n_row);
    seq-mean-token-sum-norm k/(S · C), C = loss_scale_factor (k the row's multiplicity, T tokens,
    S rows with a loss token)."""
    _check("loss_agg_mode", mode, AGG_MODES)
    check_loss_scale_factor(mode, loss_scale_factor)
    mask_BL = jnp.asarray(mask_BL, jnp.float32)
    row_B = jnp.ones(mask_BL.shape[:1], jnp.float32) if row_weight_B is None else jnp.asarray(row_weight_B, jnp.float32)
    counted_BL = mask_BL * row_B[:, None]
    count_B = jnp.sum(mask_BL, axis=-1)
    tokens = jnp.sum(counted_BL) if num_tokens is None else num_tokens
    seqs = jnp.sum(jnp.where(count_B > 0, row_B, 0.0)) if num_seqs is None else num_seqs
    if mode == "token-mean":
        return counted_BL / jnp.maximum(tokens, 1)
    per_row_B = jnp.broadcast_to(1.0 / jnp.maximum(seqs, 1), count_B.shape)
    if mode == "seq-mean-token-mean":
        per_row_B = per_row_B / jnp.maximum(count_B, 1)
    elif mode == "seq-mean-token-sum-norm":
        per_row_B = per_row_B / loss_scale_factor
    return counted_BL * per_row_B[:, None]


def _weighted_sum(x_BL, weight_BL):
    return jnp.sum(jnp.where(weight_BL != 0, x_BL * weight_BL, 0.0))


def _masked_mean(x_BL, mask_BL):
    return jnp.sum(jnp.where(mask_BL != 0, x_BL * mask_BL, 0.0)) / jnp.maximum(jnp.sum(mask_BL), 1)


@functools.partial(jax.jit, static_argnames=("kl_estimator", "loss_agg_mode"))
def policy_loss(logp_BL, old_logp_BL, advantage_BL, mask_BL, *, ref_logp_BL=None, entropy_BL=None,
                clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.2, clip_ratio_c: float = 3.0,
                kl_coef: float = 0.001, kl_estimator: str = "low_var_kl", entropy_coeff: float = 0.0,
                loss_agg_mode: str = "token-mean", loss_scale_factor=None, num_tokens=None, num_seqs=None,
                token_weight_BL=None):
    """Dual-clip PPO loss with optional KL-to-reference and entropy terms; returns (loss, metrics).

    logp_BL: log π_θ of the taken tokens (differentiated); old_logp_BL: log π_old (the sampling
    policy); advantage_BL: token advantages; mask_BL: tokens with loss (float or bool).
    ref_logp_BL: log π_ref, or None for no KL term (`use_kl_loss=False`). entropy_BL: per-token
    entropy of π_θ, or None for no entropy term. loss_scale_factor: C of 'seq-mean-token-sum-norm'
    (required there, see agg_loss). token_weight_BL (`aggregation_weights`): each loss term is
    Σ weight · term instead (the aggregation's options are then unused): how micro-batches, packed
    rows and rows standing for several identical ones add up to a mini-batch's loss.
    Metrics are token means over mask_BL (a float mask weights them: a row's multiplicity); note
    that veRL's `pg_clipfrac_lower` is our `dual_clipfrac`, ours is the lower PPO clip.
    """
    _check("loss_agg_mode", loss_agg_mode, AGG_MODES)
    _check("kl estimator", kl_estimator, KL_ESTIMATORS)  # even when KL is off: a typo should not wait
    # fp32 whatever the model computes in: ratios of bf16 log-probs are too coarse to clip on
    logp_BL, old_logp_BL, advantage_BL, mask_BL = (jnp.asarray(x, jnp.float32)
                                                   for x in (logp_BL, old_logp_BL, advantage_BL, mask_BL))
    log_ratio_BL = jnp.clip(logp_BL - old_logp_BL, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio_BL = jnp.exp(log_ratio_BL)

    unclipped_BL = -advantage_BL * ratio_BL
    clipped_BL = -advantage_BL * jnp.clip(ratio_BL, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    ppo_BL = jnp.maximum(unclipped_BL, clipped_BL)
    # Dual clip: for A < 0 a huge ρ would make the loss unbounded; cap it at −A·c.
    dual_cap_BL = -advantage_BL * clip_ratio_c
    negative_BL = advantage_BL < 0
    pg_BL = jnp.where(negative_BL, jnp.minimum(ppo_BL, dual_cap_BL), ppo_BL)

    if token_weight_BL is None:
        agg = dict(loss_scale_factor=loss_scale_factor, num_tokens=num_tokens, num_seqs=num_seqs)
        aggregate = lambda x_BL: agg_loss(x_BL, mask_BL, loss_agg_mode, **agg)
    else:
        aggregate = lambda x_BL: _weighted_sum(x_BL, jnp.asarray(token_weight_BL, jnp.float32))
    pg_loss = aggregate(pg_BL)
    clip_active_BL = clipped_BL > unclipped_BL  # the clipped branch is the max: no gradient
    metrics = {
        "pg_loss": pg_loss,
        "pg_clipfrac_upper": _masked_mean(clip_active_BL & (advantage_BL > 0), mask_BL),  # ρ > 1 + ε_high
        "pg_clipfrac_lower": _masked_mean(clip_active_BL & negative_BL, mask_BL),  # ρ < 1 − ε_low
        "dual_clipfrac": _masked_mean(negative_BL & (ppo_BL > dual_cap_BL), mask_BL),
        "approx_kl": _masked_mean(-log_ratio_BL, mask_BL),  # old vs new, veRL's ppo_kl
    }
    loss = pg_loss
    if ref_logp_BL is not None:
        kl_BL = kl_penalty(logp_BL, jnp.asarray(ref_logp_BL, jnp.float32), kl_estimator)
        kl_loss = aggregate(kl_BL)
        loss = loss + kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss
        metrics["kl_ref"] = _masked_mean(kl_BL, mask_BL)
    if entropy_BL is not None:
        entropy_BL = jnp.asarray(entropy_BL, jnp.float32)
        entropy_loss = aggregate(entropy_BL)
        loss = loss - entropy_coeff * entropy_loss
        metrics["entropy"] = _masked_mean(entropy_BL, mask_BL)
    metrics["loss"] = loss
    return loss, metrics
