"""Identical rows computed once, rows without a gradient not at all: the selection by hand, and
the update, π_ref and π_old passes equal to computing every row (loss, gradients, params)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from igpo_jax.igpo.loss import AGG_MODES
from igpo_jax.model.weights import load_hf
from igpo_jax.training import row_selection
from igpo_jax.training.row_selection import RowFacts, select
from igpo_jax.training.update import (UpdateBatch, UpdateConfig, Updater, _gradient_program, _rows_of,
                                      compute_logprobs, packed_micro_batches, summed_packed_gradients)
from tests.conftest import write_tiny_hf_model
from tests.shared_prefix_test import G, _layout, ragged_groups


def test_selection_by_hand():
    # rows 0 = 1, 2 = 3, 4 = 6; row 5 has no gradient; 8 rows in 4 strided micro-batches of 2
    facts = RowFacts(np.array([0, 0, 2, 2, 4, 5, 4, 7]), np.array([1, 1, 1, 1, 1, 0, 1, 1], bool),
                     np.array([3, 3, 2, 2, 1, 4, 1, 5]))
    sel = select(facts, np.arange(8), num_micro=4)
    # classes 0, 2, 4, 7 fill micro-batches 0 (slots 0, 4) and 1 (slots 1, 5); 2 and 3 are padding
    np.testing.assert_array_equal(sel.rows_U, [0, 4, 0, 0, 2, 7, 0, 0])
    np.testing.assert_array_equal(sel.weight_U, [2, 2, 0, 0, 2, 1, 0, 0])
    np.testing.assert_array_equal(sel.slot_M, [0, 0, 4, 4, 1, -1, 1, 5])
    assert (sel.computed, sel.num_tokens, sel.num_seqs, sel.group_size) == (4, 21.0, 8.0, 0)
    # a shuffled pass: representatives are its first rows of each class
    sel = select(facts, [6, 5, 4, 3, 2, 1, 0, 7], num_micro=1)
    np.testing.assert_array_equal(sel.rows_U[:4], [6, 3, 1, 7])
    np.testing.assert_array_equal(sel.weight_U, [2, 2, 2, 1, 0, 0, 0, 0])
    # groups of 4: two classes each (group 1: 4 = 6, 5 skipped, 7) → G_u = 2 rows per group
    sel = select(facts, np.arange(8), num_micro=1, group_size=4)
    assert sel.group_size == 2
    np.testing.assert_array_equal(sel.rows_U, [0, 2, 4, 7])
    np.testing.assert_array_equal(sel.weight_U, [2, 2, 2, 1])
    np.testing.assert_array_equal(sel.slot_M, [0, 0, 1, 1, 2, -1, 2, 3])
    # three classes in group 0 → G_u = 4 (a power of two), padded with its own first row
    sel = select(RowFacts(np.array([0, 1, 2, 2, 4, 4, 4, 4]), np.ones(8, bool)), np.arange(8), 2, group_size=4)
    assert sel.group_size == 4
    np.testing.assert_array_equal(sel.rows_U, [0, 1, 2, 0, 4, 4, 4, 4])
    np.testing.assert_array_equal(sel.weight_U, [1, 1, 2, 0, 4, 0, 0, 0])
    # identical rows of different groups stay apart; a group with nothing to compute is padding
    facts = RowFacts(np.array([0, 0, 0, 0, 0, 0, 6, 6]), np.array([1, 1, 1, 1, 0, 0, 0, 0], bool))
    sel = select(facts, np.arange(8), num_micro=2, group_size=4)
    assert sel.group_size == 1 and sel.num_tokens is None
    np.testing.assert_array_equal(sel.rows_U, [0, 0])
    np.testing.assert_array_equal(sel.weight_U, [4, 0])
    np.testing.assert_array_equal(sel.slot_M, [0, 0, 0, 0, -1, -1, -1, -1])
    with pytest.raises(ValueError, match="do not split"):
        select(facts, np.arange(8), num_micro=3)


def test_rows_with_gradient():
    mask = np.array([[0, 1, 1], [0, 1, 1], [0, 0, 0]], bool)
    adv = np.array([[5.0, 0.0, 0.0], [0.0, 0.0, -1.0], [1.0, 1.0, 1.0]])  # row 0: advantage off the mask only
    np.testing.assert_array_equal(row_selection.rows_with_gradient(adv, mask, kl_or_entropy=False), [0, 1, 0])
    np.testing.assert_array_equal(row_selection.rows_with_gradient(adv, mask, kl_or_entropy=True), [1, 1, 0])


# ----------------------------------------------------------------------------- equal to every row

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    write_tiny_hf_model("qwen2", path)
    return load_hf(str(path))


def duplicated_groups(vocab: int, zero_rows=(), contiguous: bool = False):
    """shared_prefix_test's 3 ragged groups of G = 4 with repeats, as a sampler at a low temperature
    writes them: group 0's rows 1 and 2 copy row 0, group 1 is distinct, group 2 is one row four
    times. Rows in `zero_rows` get a zero advantage; `contiguous`: row 5's padding hole filled
    (packing needs it). Returns the host arrays and each row's first identical row."""
    tokens, valid, loss, advantage = ragged_groups(vocab)
    if contiguous:
        valid[5, 14] = True
    for src, dst in ((0, 1), (0, 2), (8, 9), (8, 10), (8, 11)):
        tokens[dst], valid[dst], loss[dst], advantage[dst] = tokens[src], valid[src], loss[src], advantage[src]
    advantage[list(zero_rows)] = 0.0
    first = np.array([0, 0, 0, 3, 4, 5, 6, 7, 8, 8, 8, 8])
    return (tokens, valid, loss, advantage), first


def _batch(model, arrays, share: bool):
    tokens, valid, loss, advantage = arrays
    split, layout = _layout(tokens, valid, loss)
    old = compute_logprobs(model, tokens, valid)
    batch = UpdateBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(loss), jnp.asarray(advantage),
                        old - 0.02 * loss, old - 0.05 * loss, jnp.asarray(split) if share else None)
    return batch, (layout if share else None)


def _selected(batch, sel):
    return dataclasses.replace(_rows_of(batch, jnp.asarray(sel.rows_U)), weight_N=jnp.asarray(sel.weight_U))


def _assert_same(got, want, what):
    (loss_a, grads_a), (loss_b, grads_b) = got, want
    # a sum of terms of order 1 that cancel to ~0.02: fp32 summation order shows at 1e-6 absolute
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5, atol=2e-6, err_msg=what)
    for a, b in zip(jax.tree.leaves(grads_b), jax.tree.leaves(grads_a)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(a)))),
                                   rtol=0, err_msg=what)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_identical_rows_once_give_the_loss_and_gradients_of_every_row(model, mode):
    """Every aggregation mode, rows and shared-prefix groups, 1 and 3 micro-batches, and packed:
    7 distinct rows of 12 computed, each weighted by its multiplicity."""
    cfg = UpdateConfig(lr=1e-3, entropy_coeff=0.01, loss_agg_mode=mode, loss_scale_factor=30.0)
    graphdef, params = nnx.split(model)
    arrays, first = duplicated_groups(model.cfg.vocab_size)
    facts = RowFacts(first, np.ones(12, bool))
    program = _gradient_program(graphdef, params)
    for share in (False, True):
        batch, layout = _batch(model, arrays, share)
        for num_micro in (1, 3):
            loss, grads, _ = program(graphdef, params, batch, cfg, num_micro, False, layout)
            sel = select(facts, np.arange(12), num_micro, G if share else 0)
            assert sel.computed == 7 and sel.group_size == (4 if share else 0)
            lay = None if layout is None else dataclasses.replace(layout, group_size=sel.group_size)
            got = program(graphdef, params, _selected(batch, sel), cfg, num_micro, False, lay)
            _assert_same(got[:2], (loss, grads), f"{mode} share={share} micro={num_micro}")
    batch, _ = _batch(model, duplicated_groups(model.cfg.vocab_size, contiguous=True)[0], False)
    want = program(graphdef, params, batch, cfg, 1, False, None)[:2]
    sel = select(facts, np.arange(12), 1)
    got = summed_packed_gradients(graphdef, params, packed_micro_batches(_selected(batch, sel), cfg, 64), cfg, False)
    _assert_same(got[:2], want, f"{mode} packed")


def test_rows_without_a_gradient_skipped_give_the_full_update_with_kl_and_entropy_off(model):
    """Rows 3, 5 and all of group 2 have zero advantages: with KL and entropy off they are not
    computed (group 2, the whole second micro-batch, not at all) and the loss keeps the whole
    mini-batch's normaliser, in every aggregation mode."""
    graphdef, params = nnx.split(model)
    arrays, first = duplicated_groups(model.cfg.vocab_size, zero_rows=(3, 5, 8, 9, 10, 11))
    active = row_selection.rows_with_gradient(arrays[3], arrays[2], kl_or_entropy=False)
    np.testing.assert_array_equal(np.flatnonzero(~active), [3, 5, 8, 9, 10, 11])
    facts = RowFacts(first, active, arrays[2].sum(1).astype(int))
    program = _gradient_program(graphdef, params)
    for mode in AGG_MODES:
        cfg = UpdateConfig(lr=1e-3, use_kl_loss=False, entropy_coeff=0.0, loss_agg_mode=mode, loss_scale_factor=30.0)
        for share in (False, True):
            batch, layout = _batch(model, arrays, share)
            want = program(graphdef, params, batch, cfg, 3, False, layout)[:2]
            sel = select(facts, np.arange(12), 3, G if share else 0)
            assert sel.computed == 4  # rows 0 (×3), 4, 6, 7
            lay = None if layout is None else dataclasses.replace(layout, group_size=sel.group_size)
            got = program(graphdef, params, _selected(batch, sel), cfg, 3, False, lay,
                          (np.float32(sel.num_tokens), np.float32(sel.num_seqs)))
            _assert_same(got[:2], want, f"{mode} share={share}")


def _updated(model, batch, layout, cfg, facts):
    m = nnx.merge(nnx.graphdef(model), jax.tree.map(jnp.copy, nnx.state(model)))  # the update donates params
    metrics = Updater(m, cfg).update(batch, layout=layout, facts=facts)
    return metrics, jax.tree.leaves(nnx.state(m, nnx.Param))


@pytest.mark.parametrize("budget", [0, 64])
def test_updater_with_row_facts_equals_the_update_of_every_row(model, budget):
    """Two mini-batches (π_old from the batch on the second), micro-batches of whole groups, a
    shared prefix (or packed rows): params after the update, losses and metrics match."""
    arrays, first = duplicated_groups(model.cfg.vocab_size, zero_rows=(5,), contiguous=bool(budget))
    cfg = UpdateConfig(lr=1e-3, ppo_mini_batch_size=8 if budget else 4, micro_batch_size=4,
                       max_tokens_per_micro_batch=budget, entropy_coeff=0.0, loss_agg_mode="seq-mean-token-mean")
    batch, layout = _batch(model, arrays, share=not budget)
    if budget:
        batch = dataclasses.replace(batch, tokens_NL=batch.tokens_NL[:8], valid_NL=batch.valid_NL[:8],
                                    loss_mask_NL=batch.loss_mask_NL[:8], advantage_NL=batch.advantage_NL[:8],
                                    old_logp_NL=batch.old_logp_NL[:8], ref_logp_NL=batch.ref_logp_NL[:8])
        first = first[:8]
    facts = RowFacts(first, np.ones(len(first), bool), arrays[2][:len(first)].sum(1).astype(int))
    m_all, p_all = _updated(model, batch, layout, cfg, None)
    m_once, p_once = _updated(model, batch, layout, cfg, facts)
    assert [float(m["rows_computed_frac"]) for m in m_all] == [1.0] * len(m_all)
    assert [float(m["rows_computed_frac"]) for m in m_once] == ([6 / 8] if budget else [2 / 4, 4 / 4, 1 / 4])
    for a, b in zip(m_all, m_once):
        for k in ("loss", "pg_loss", "kl_loss", "approx_kl", "entropy", "grad_norm"):
            np.testing.assert_allclose(float(b[k]), float(a[k]), rtol=1e-4, atol=1e-7, err_msg=k)
    # Adam's steps are ≈ lr·g/|g|: summation-order noise in tiny gradients shows up to 1% of a step
    for a, b in zip(p_all, p_once):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-2 * 1e-3 * len(m_all), rtol=0)


def test_a_mini_batch_with_nothing_to_compute_still_takes_the_optimiser_step(model):
    """All advantages zero, KL and entropy off: no forward runs, and the step is the full update's
    (AdamW with a zero gradient still decays the weights and moves with its moments)."""
    arrays, first = duplicated_groups(model.cfg.vocab_size, zero_rows=range(12))
    cfg = UpdateConfig(lr=1e-3, use_kl_loss=False, entropy_coeff=0.0, weight_decay=0.1)
    batch, _ = _batch(model, arrays, share=False)
    facts = RowFacts(first, np.zeros(12, bool), arrays[2].sum(1).astype(int))
    m_all, p_all = _updated(model, batch, None, cfg, None)
    m_none, p_none = _updated(model, batch, None, cfg, facts)
    assert float(m_none[0]["rows_computed_frac"]) == 0.0 and float(m_none[0]["loss"]) == 0.0
    assert float(m_all[0]["grad_norm"]) == 0.0 and float(m_none[0]["grad_norm"]) == 0.0
    for a, b in zip(p_all, p_none):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(p_all, jax.tree.leaves(nnx.state(model, nnx.Param))))  # weight decay moved them


def test_reference_logprobs_of_a_selection_equal_every_row(model):
    arrays, first = duplicated_groups(model.cfg.vocab_size)
    tokens, valid, loss, _ = arrays
    split, layout = _layout(tokens, valid, loss)
    facts = RowFacts(first, loss.any(1))
    plain = np.asarray(compute_logprobs(model, tokens, valid, micro_batch_size=G))
    for share in (False, True):
        shared = dict(prefix_len_N=jnp.asarray(split), layout=layout, needed_NL=loss > 0) if share else {}
        sel = select(facts, np.arange(12), 3, G if share else 0)
        once = np.asarray(compute_logprobs(model, tokens, valid, micro_batch_size=G, selection=sel, **shared))
        np.testing.assert_allclose(once[loss > 0], plain[loss > 0], atol=1e-5, rtol=0)
        assert once[1].tobytes() == once[0].tobytes() and once[11].tobytes() == once[8].tobytes()
