"""The shared-prefix update: the prompt of a group computed once, losses and gradients equal to the
unshared path (fp32), on ragged groups, with micro-batches, and on an 8-device simulated mesh."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from igpo_jax.model import shared_prefix
from igpo_jax.model.weights import load_hf
from igpo_jax.training.update import UpdateBatch, UpdateConfig, Updater, compute_logprobs, token_logprobs, train_step
from tests.conftest import write_tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 4


def ragged_groups(vocab: int, seed: int = 0, groups=((9, 4), (14, 7), (5, 3)), length: int = 40):
    """Host arrays of len(groups) groups of G rows: group q has a prompt of groups[q][0] tokens
    (ragged across groups) whose last groups[q][1] tokens are the shared forced prefix; then per
    row a response of two turns with a tool result between them, rows of different lengths, one
    row with a padding hole after its prompt. Advantages differ per row."""
    rng = np.random.default_rng(seed)
    n = len(groups) * G
    tokens = np.zeros((n, length), np.int32)
    valid = np.zeros((n, length), bool)
    loss = np.zeros((n, length), np.float32)
    for q, (prompt, _) in enumerate(groups):
        shared = rng.integers(1, vocab, prompt)
        for g in range(G):
            i = q * G + g
            end = prompt + 8 + 3 * g + q
            tokens[i, :prompt], tokens[i, prompt:end] = shared, rng.integers(1, vocab, end - prompt)
            valid[i, :end] = True
            loss[i, prompt:prompt + 4] = 1  # turn 1
            loss[i, prompt + 6:end] = 1  # turn 2 (prompt + 4, + 5: a tool result)
    valid[5, 14] = False  # a hole right after group 1's prompt (row 5)
    loss[5, 14] = 0
    advantage = np.where(loss > 0, rng.normal(size=(n, 1)), 0.0).astype(np.float32)
    return tokens, valid, loss, advantage


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    write_tiny_hf_model("qwen2", path)
    return load_hf(str(path))


def _layout(tokens, valid, loss):
    split = shared_prefix.group_prefix_lengths(tokens, valid, loss, G)
    return split, shared_prefix.layout_for(split, valid, G, multiple=8)


def test_group_prefix_lengths_by_hand():
    tokens = np.array([[1, 2, 3, 4], [1, 2, 3, 5], [7, 8, 0, 0], [7, 9, 0, 0]])
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], bool)
    loss = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0], [0, 1, 0, 0]])
    # group 0: tokens agree on 3 columns but column 2 is a loss token; group 1 differs at column 1
    np.testing.assert_array_equal(shared_prefix.group_prefix_lengths(tokens, valid, loss, 2), [2, 2, 1, 1])
    layout = shared_prefix.layout_for([2, 2, 1, 1], valid, 2, multiple=1)
    assert layout == shared_prefix.PrefixLayout(2, 2, 2)  # rows 0/1: columns 2, 3; rows 2/3: column 1
    assert shared_prefix.group_prefix_lengths(tokens, valid, loss, 3) is None  # 4 rows are not groups of 3
    tokens[1, 0] = 9
    assert shared_prefix.group_prefix_lengths(tokens, valid, loss, 2) is None  # nothing shared


@pytest.fixture(scope="module")
def scanned_model(model):
    """The same weights, its layers run as one lax.scan (with remat, as the accelerator configs)."""
    from igpo_jax.model.qwen import abstract_decoder

    return nnx.merge(nnx.graphdef(abstract_decoder(model.cfg.replace(scan_layers=True, remat=True))), nnx.state(model))


@pytest.mark.parametrize("scanned", [False, True])
def test_shared_logprobs_and_gradients_equal_the_unshared_forward(model, scanned_model, scanned):
    """Through the shared prefix (with the layers unrolled, or scanned with remat) as without it (unrolled)."""
    tokens, valid, loss, _ = ragged_groups(model.cfg.vocab_size)
    split, layout = _layout(tokens, valid, loss)
    np.testing.assert_array_equal(split[::G], [9, 14, 5])
    graphdef, params = nnx.split(model)
    shared_graphdef = nnx.graphdef(scanned_model) if scanned else graphdef
    weights = jnp.asarray(np.random.default_rng(1).normal(size=tokens.shape), jnp.float32) * loss

    def objective(params, shared):
        m = nnx.merge(shared_graphdef if shared else graphdef, params)
        if shared:
            lp, ent = shared_prefix.token_logprobs(m, tokens, valid, jnp.asarray(split), layout, 8, True, loss > 0)
        else:
            lp, ent = token_logprobs(m, tokens, valid, 8, True, loss > 0)
        return jnp.sum(lp * weights) + 0.1 * jnp.sum(ent * weights), (lp, ent)

    (v0, (lp0, e0)), g0 = jax.value_and_grad(objective, has_aux=True)(params, False)
    (v1, (lp1, e1)), g1 = jax.value_and_grad(objective, has_aux=True)(params, True)
    assert np.all(np.asarray(lp0)[loss > 0] < 0)
    np.testing.assert_allclose(lp1, lp0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(e1, e0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(a)))), rtol=0)


def _update_batch(model, share: bool):
    tokens, valid, loss, advantage = ragged_groups(model.cfg.vocab_size)
    split, layout = _layout(tokens, valid, loss)
    old = compute_logprobs(model, tokens, valid)
    ref = old - 0.05 * loss  # a reference policy that differs, so the KL term has a gradient
    batch = UpdateBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(loss), jnp.asarray(advantage),
                        old - 0.02 * loss, ref, jnp.asarray(split) if share else None)
    return batch, (layout if share else None)


@pytest.mark.parametrize("num_micro", [1, 3])
def test_train_step_with_a_shared_prefix_equals_the_unshared_one(model, num_micro):
    """Loss, metrics and gradients (through the params after an SGD-like step) of one mini-batch
    of 3 ragged groups, in 1 or 3 micro-batches (whole groups each)."""
    cfg = UpdateConfig(lr=1e-3, entropy_coeff=0.01, loss_agg_mode="seq-mean-token-mean")
    graphdef, params = nnx.split(model)
    out = {}
    for share in (False, True):
        batch, layout = _update_batch(model, share)
        from igpo_jax.training.update import _gradient_program

        loss, grads, metrics = _gradient_program(graphdef, params)(graphdef, params, batch, cfg, num_micro, False,
                                                                   layout)
        out[share] = (float(loss), grads, {k: float(v) for k, v in metrics.items()})
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-5)
    for key, value in out[False][2].items():
        np.testing.assert_allclose(out[True][2][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(out[False][1]), jax.tree.leaves(out[True][1])):
        np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(a)))), rtol=0)


def test_updater_and_reference_logprobs_with_a_shared_prefix(model):
    """Updater.update over two mini-batches (3 groups → not divisible: one group per mini-batch of
    G rows) and compute_logprobs with micro-batches: equal to the unshared path."""
    tokens, valid, loss, _ = ragged_groups(model.cfg.vocab_size)
    split, layout = _layout(tokens, valid, loss)
    plain = np.asarray(compute_logprobs(model, tokens, valid, micro_batch_size=G))
    shared = np.asarray(compute_logprobs(model, tokens, valid, micro_batch_size=G, prefix_len_N=jnp.asarray(split),
                                         layout=layout, needed_NL=loss > 0))
    np.testing.assert_allclose(shared[loss > 0], plain[loss > 0], atol=1e-5, rtol=0)
    assert np.all(shared[loss == 0] == 0)
    results = {}
    for share in (False, True):
        m = nnx.merge(*nnx.split(model))  # its own copy of the params: the update donates them
        m = nnx.merge(nnx.graphdef(m), jax.tree.map(jnp.copy, nnx.state(m)))
        batch, lay = _update_batch(m, share)
        metrics = Updater(m, UpdateConfig(lr=1e-3, ppo_mini_batch_size=G)).update(batch, layout=lay)
        results[share] = ([float(x["loss"]) for x in metrics], jax.tree.leaves(nnx.state(m, nnx.Param)))
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
    # Adam's steps are ≈ lr·g/|g|, which amplifies summation-order noise in tiny gradients: params
    # to 1% of a step per step (as update_test's accumulation test)
    for a, b in zip(results[False][1], results[True][1]):
        np.testing.assert_allclose(b, a, atol=1e-2 * 1e-3 * len(results[True][0]), rtol=0)


def test_shared_prefix_update_on_an_8_device_mesh_equals_the_unshared_one(tmp_path):
    write_tiny_hf_model("qwen2", tmp_path)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.shared_prefix_checks", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "shared prefix on 8 devices equals unshared" in proc.stdout
    assert "identical rows once on 8 devices (6 of 12 rows computed) equal every row on one" in proc.stdout
