"""Token-budget packing: layouts by hand, pack/unpack round trips, and
packed micro-batches giving the padded path's loss and gradients (fp32 tiny model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from igpo_jax.training import packing
from igpo_jax.igpo.loss import AGG_MODES, agg_loss
from igpo_jax.model.config import ModelConfig
from igpo_jax.model.qwen import Decoder


def test_first_fit_decreasing_layout_by_hand():
    # row lengths 3, 5, 2, 4 (left and right padding), budget 7: 5 → bin 0, 4 → bin 1, 3 → bin 1, 2 → bin 0
    valid = np.array([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    lay = packing.plan_packing(valid, budget=7)
    assert lay.shape == (2, 7) and lay.bins_N.tolist() == [1, 0, 0, 1]
    # bin 0: row 1 (5 tokens, segment 1), then row 2 (2 tokens, segment 2)
    assert lay.row_PW[0].tolist() == [1, 1, 1, 1, 1, 2, 2]
    assert lay.col_PW[0].tolist() == [0, 1, 2, 3, 4, 4, 5]
    assert lay.segment_PW[0].tolist() == [1, 1, 1, 1, 1, 2, 2]
    assert lay.position_PW[0].tolist() == [0, 1, 2, 3, 4, 0, 1]
    # bin 1: row 3 (4 tokens) placed first (decreasing), then row 0; segments numbered in row order
    assert lay.row_PW[1].tolist()[:7] == [3, 3, 3, 3, 0, 0, 0]
    assert lay.segment_PW[1].tolist() == [2, 2, 2, 2, 1, 1, 1]
    assert lay.valid_PW.sum() == valid.sum()
    assert packing.plan_packing(valid, budget=7, multiple=4).shape == (4, 7)


def test_pack_unpack_round_trip_and_refusals():
    rng = np.random.default_rng(0)
    valid = np.zeros((5, 9), bool)
    for r, (a, k) in enumerate([(0, 9), (2, 4), (5, 4), (0, 1), (3, 6)]):
        valid[r, a:a + k] = True
    x = rng.integers(1, 100, (5, 9))
    lay = packing.plan_packing(valid, budget=10)
    packed = packing.pack(x, lay)
    assert packed.sum() == (x * valid).sum()
    back = packing.unpack(packed, lay)
    assert np.array_equal(back, np.where(valid, x, 0))
    assert np.array_equal(np.asarray(packing.unpack(jnp.asarray(packed), lay)), back)  # jnp too
    with pytest.raises(ValueError, match="does not fit"):
        packing.plan_packing(valid, budget=8)
    with pytest.raises(ValueError, match="contiguous"):
        packing.plan_packing(np.array([[1, 0, 1]], bool), budget=4)


def _tiny_model():
    cfg = ModelConfig("qwen2", 64, 32, 48, 2, 4, 2, 8, qkv_bias=True)
    return Decoder(cfg, nnx.Rngs(0))


def _mixed_rows(length: int = 16):
    """4 rows of 16, 9, 6 and 5 tokens (left, middle and right padding) right-padded to `length`
    columns, as an UpdateBatch with advantages, π_old and π_ref on the tokens after a 2-token prompt."""
    from igpo_jax.training import update

    rng = np.random.default_rng(2)
    n, l = 4, 16
    valid = np.zeros((n, l), bool)
    for r, (a, k) in enumerate([(0, 16), (4, 9), (10, 6), (0, 5)]):
        valid[r, a:a + k] = True
    tokens = np.where(valid, rng.integers(1, 64, (n, l)), 0).astype(np.int32)
    loss_mask = np.zeros((n, l), np.float32)
    for r in range(n):
        cols = np.flatnonzero(valid[r])
        loss_mask[r, cols[2:]] = 1.0  # after a 2-token prompt
    adv = (rng.normal(size=(n, 1)) * loss_mask).astype(np.float32)
    old = (rng.normal(size=(n, l)) * 0.1 * loss_mask - 3.0 * loss_mask).astype(np.float32)
    ref = (rng.normal(size=(n, l)) * 0.1 * loss_mask - 3.0 * loss_mask).astype(np.float32)
    grow = lambda x: np.pad(x, ((0, 0), (0, length - l)))
    return update.UpdateBatch(*(jnp.asarray(grow(x)) for x in (tokens, valid, loss_mask, adv, old, ref)))


def _loss_and_gradients(graphdef, params, batch, cfg, budget: int):
    """(loss, gradients) of one mini-batch: two padded micro-batches, or packed into rows of `budget`."""
    from igpo_jax.training import update

    if not budget:
        loss, grads, _ = update.summed_gradients(graphdef, params, batch, cfg, 2, False, None)
        return loss, grads
    micro = update.packed_micro_batches(batch, cfg, budget=budget)
    loss, grads, _ = update.summed_packed_gradients(graphdef, params, micro, cfg, False)
    return loss, grads


def test_packed_micro_batches_give_the_padded_loss_and_gradients():
    """The same mini-batch, (a) padded, one micro-batch per 2 rows, (b) packed to a 24-token budget:
    equal loss and gradients (fp32, 1e-5), in every loss_agg_mode."""
    from igpo_jax.training import update

    graphdef, params = nnx.split(_tiny_model())
    batch = _mixed_rows()
    for mode in AGG_MODES:
        cfg = update.UpdateConfig(loss_agg_mode=mode, entropy_coeff=0.01, loss_scale_factor=40.0)
        loss_a, grads_a = _loss_and_gradients(graphdef, params, batch, cfg, 0)
        micro = update.packed_micro_batches(batch, cfg, budget=24)
        assert micro.tokens_NL.shape[1:] == (1, 24)  # one packed row per micro-batch
        loss_b, grads_b = _loss_and_gradients(graphdef, params, batch, cfg, 24)
        assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-5, abs=1e-7), mode
        for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
            np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), rtol=1e-4, atol=1e-6, err_msg=mode)


@pytest.mark.parametrize("budget", [0, 24])  # padded and packed micro-batches
def test_sum_norm_loss_does_not_depend_on_the_padded_length(budget):
    """seq-mean-token-sum-norm divides each row's token sum by a constant of the run (the config's
    default: rollout.max_turns × rollout.max_new_tokens), not by the step's padded row length: the
    same rows padded to 16 and to 40 columns give the same loss and gradients."""
    import dataclasses

    from igpo_jax.config_base import base_config
    from igpo_jax.train import update_config

    c = base_config()
    c.actor.loss_agg_mode = "seq-mean-token-sum-norm"
    cfg = dataclasses.replace(update_config(c), entropy_coeff=0.01)
    graphdef, params = nnx.split(_tiny_model())
    (loss_a, grads_a), (loss_b, grads_b) = (_loss_and_gradients(graphdef, params, _mixed_rows(length), cfg, budget)
                                            for length in (16, 40))
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-6)
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), rtol=1e-5, atol=1e-8)
    assert cfg.loss_scale_factor == c.rollout.max_turns * c.rollout.max_new_tokens == 20000
    c.actor.loss_scale_factor = 512
    assert update_config(c).loss_scale_factor == 512  # set explicitly: taken as it is


def test_updater_with_a_token_budget_matches_padded_micro_batches():
    """Updater.update, two optimiser steps: padded micro-batches vs packed ones give the same params."""
    from igpo_jax.training import update

    rng = np.random.default_rng(3)
    n, l = 4, 12
    valid = np.ones((n, l), bool)
    valid[1, :5] = valid[3, 8:] = False
    tokens = np.where(valid, rng.integers(1, 64, (n, l)), 0).astype(np.int32)
    mask = (valid & (np.arange(l)[None] >= 7)).astype(np.float32)
    adv = (rng.normal(size=(n, 1)) * mask).astype(np.float32)
    batch = update.UpdateBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(mask), jnp.asarray(adv),
                               jnp.asarray(-2.0 * mask), jnp.asarray(-2.0 * mask))
    results = []
    for budget in (0, 16):
        model = _tiny_model()
        cfg = update.UpdateConfig(lr=1e-3, ppo_mini_batch_size=2, micro_batch_size=1,
                                  max_tokens_per_micro_batch=budget, loss_agg_mode="seq-mean-token-mean")
        metrics = update.Updater(model, cfg).update(batch)
        assert len(metrics) == 2 and all(float(m["skipped"]) == 0 for m in metrics)
        results.append(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for a, b in zip(*results):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(results[0], jax.tree.leaves(
        nnx.state(_tiny_model(), nnx.Param))))  # the update moved the params


def test_config_refuses_a_budget_below_the_context():
    from igpo_jax.config_base import base_config, validate

    c = base_config()
    c.data.synthetic_world = True
    c.rollout.context_length = 4096
    c.actor.max_tokens_per_micro_batch = 2048
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=2048"):
        validate(c)
    c.actor.max_tokens_per_micro_batch = 4096
    validate(c)
