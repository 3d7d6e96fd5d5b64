"""Chunked token log-probs: the loss-position compaction computes exactly the needed positions."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from igpo_jax.model.token_logprobs import logprobs_from_hidden
from igpo_jax.model.weights import load_hf
from tests.conftest import write_tiny_hf_model

B, T = 3, 21


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_hf_model("llama", path)  # tied embeddings: the projection is embed.T
    return load_hf(str(path))


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_untied")
    write_tiny_hf_model("qwen2", path, tie_word_embeddings=False)  # its own lm_head [D, V]
    return load_hf(str(path))


def _inputs(model, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, T, model.cfg.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (B, T)), jnp.int32)
    return hidden, targets


def _reference(model, hidden, targets):
    """Plain full-vocab log-softmax and entropy, no chunks."""
    logits = np.asarray(model.logits_from_hidden(hidden), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0] - logz
    probs = np.exp(logits - logz[..., None])
    return logp, logz - (probs * logits).sum(-1)


@pytest.mark.parametrize("needed_kind", ["none_given", "ragged", "all", "nothing", "one"])
@pytest.mark.parametrize("chunk", [2, 5, 64])
def test_needed_positions_equal_the_full_computation_and_the_rest_read_zero(model, needed_kind, chunk):
    hidden, targets = _inputs(model)
    rng = np.random.default_rng(1)
    needed = {"none_given": None, "ragged": rng.random((B, T)) < 0.4, "all": np.ones((B, T), bool),
              "nothing": np.zeros((B, T), bool), "one": np.eye(B, T, 7, dtype=bool)}[needed_kind]
    logp, entropy = logprobs_from_hidden(model, hidden, targets, chunk, True,
                                         None if needed is None else jnp.asarray(needed))
    ref_logp, ref_entropy = _reference(model, hidden, targets)
    keep = np.ones((B, T), bool) if needed is None else needed
    np.testing.assert_allclose(np.asarray(logp)[keep], ref_logp[keep], atol=2e-5)
    np.testing.assert_allclose(np.asarray(entropy)[keep], ref_entropy[keep], atol=2e-5)
    assert np.all(np.asarray(logp)[~keep] == 0) and np.all(np.asarray(entropy)[~keep] == 0)


def test_gradient_of_a_masked_loss_is_the_same_with_and_without_compaction(model):
    hidden, targets = _inputs(model, seed=2)
    needed = jnp.asarray(np.random.default_rng(3).random((B, T)) < 0.5)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(B, T)), jnp.float32)

    def loss(h, compact):
        logp = logprobs_from_hidden(model, h, targets, 4, False, needed if compact else None)[0]
        return jnp.sum(jnp.where(needed, weights * logp, 0.0))

    full = jax.grad(loss)(hidden, False)
    compact = jax.grad(loss)(hidden, True)
    np.testing.assert_allclose(np.asarray(compact), np.asarray(full), atol=1e-6)
    assert np.all(np.asarray(compact)[~np.asarray(needed)] == 0)


@pytest.mark.parametrize("projection", ["tied", "untied"])
@pytest.mark.parametrize("needed_kind", ["none_given", "ragged"])
def test_written_out_gradient_equals_autodiff_of_the_full_log_softmax(model, untied_model, projection, needed_kind):
    """The chunked path's custom VJP (recomputed logits, d logits from the saved log-normaliser,
    weight gradient summed over chunks) against jax.grad of a plain log_softmax over all logits,
    for a loss that weights both log p(target) and the entropy, w.r.t. hidden and every param."""
    m = model if projection == "tied" else untied_model
    hidden, targets = _inputs(m, seed=5)
    rng = np.random.default_rng(6)
    needed = None if needed_kind == "none_given" else jnp.asarray(rng.random((B, T)) < 0.5)
    keep = jnp.ones((B, T), bool) if needed is None else needed
    w_logp, w_entropy = (jnp.asarray(rng.normal(size=(B, T)), jnp.float32) for _ in range(2))
    graphdef, state = nnx.split(m)

    def chunked(state, h):
        logp, entropy = logprobs_from_hidden(nnx.merge(graphdef, state), h, targets, 2, True, needed)
        return jnp.sum(w_logp * logp + w_entropy * entropy)

    def full(state, h):
        logq = jax.nn.log_softmax(nnx.merge(graphdef, state).logits_from_hidden(h), axis=-1)
        logp = jnp.take_along_axis(logq, targets[..., None], axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(logq) * logq, axis=-1)
        return jnp.sum(jnp.where(keep, w_logp * logp + w_entropy * entropy, 0.0))

    (got_state, got_h), (want_state, want_h) = (jax.grad(f, argnums=(0, 1))(state, hidden) for f in (chunked, full))
    np.testing.assert_allclose(np.asarray(got_h), np.asarray(want_h), atol=1e-5)
    projection_grads = 0
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=jax.tree_util.keystr(path))
        projection_grads += int(np.abs(np.asarray(want)).max() > 1e-3)
    assert projection_grads == 1  # only the vocab projection (embed or lm_head) gets a gradient here


def test_bf16_compute_keeps_a_float32_weight_gradient_close_to_the_float32_one(model):
    """With a bf16 compute dtype the projections run in bf16 (float32 accumulation); the float32
    master weight still gets a float32 gradient, within bf16 rounding of the fp32 one."""
    hidden, targets = _inputs(model, seed=7)
    bf16 = nnx.merge(*nnx.split(model))
    bf16.cfg = model.cfg.replace(dtype="bfloat16")

    def loss(weight_state, m):
        graphdef, _ = nnx.split(m)
        logp = logprobs_from_hidden(nnx.merge(graphdef, weight_state), hidden, targets, 4)[0]
        return jnp.sum(logp)

    grads = {name: jax.grad(loss)(nnx.split(m)[1], m)["embed"][...] for name, m in (("fp32", model), ("bf16", bf16))}
    assert grads["bf16"].dtype == jnp.float32
    scale = np.abs(np.asarray(grads["fp32"])).max()
    np.testing.assert_allclose(np.asarray(grads["bf16"]), np.asarray(grads["fp32"]), atol=0.02 * scale)


@pytest.fixture(scope="module")
def tempered_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tempered")
    write_tiny_hf_model("llama", path)
    return load_hf(str(path), logprob_temperature=0.7)


@pytest.mark.parametrize("needed_kind", ["none_given", "ragged"])
def test_a_tempered_model_gives_the_log_probs_entropy_and_gradient_of_logits_over_the_temperature(
        model, tempered_model, needed_kind):
    """veRL's actor: log_softmax(logits / T). The same weights at T = 0.7 against the plain model's
    logits divided by hand, values and the gradient through the custom backward."""
    nnx.update(tempered_model, nnx.state(model))  # the same weights
    hidden, targets = _inputs(model, seed=5)
    needed = None if needed_kind == "none_given" else jnp.asarray(np.random.default_rng(6).random((B, T)) < 0.5)
    keep = np.ones((B, T), bool) if needed is None else np.asarray(needed)
    logp, entropy = logprobs_from_hidden(tempered_model, hidden, targets, 4, True, needed)
    ref_logp, ref_entropy = _reference(model, hidden / 0.7, targets)  # logits / T = (hidden / T) · W
    np.testing.assert_allclose(np.asarray(logp)[keep], ref_logp[keep], atol=2e-5)
    np.testing.assert_allclose(np.asarray(entropy)[keep], ref_entropy[keep], atol=2e-5)
    untempered = logprobs_from_hidden(model, hidden, targets, 4, False, needed)[0]
    assert np.max(np.abs(np.asarray(logp - untempered))[keep]) > 0.1  # it did change them

    weights = jnp.asarray(np.random.default_rng(7).normal(size=(B, T)), jnp.float32)

    def loss(h):
        return jnp.sum(weights * logprobs_from_hidden(tempered_model, h, targets, 4, True, needed)[0])

    def plain_loss(h):
        logits = model.logits_from_hidden(h) / 0.7
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(keep, weights * lp, 0.0))

    np.testing.assert_allclose(np.asarray(jax.grad(loss)(hidden)), np.asarray(jax.grad(plain_loss)(hidden)),
                               atol=2e-5)


def test_the_policy_is_tempered_at_the_rollout_temperature_unless_switched_off():
    from igpo_jax import components
    from igpo_jax.config_base import base_config

    c = base_config()
    c.rollout.temperature = 0.7
    assert components.logprob_temperature(c) == 0.7
    c.actor.temper_logprobs = False
    assert components.logprob_temperature(c) == 1.0
    c.actor.temper_logprobs, c.rollout.temperature = True, 0.0  # greedy rollouts: nothing to temper
    assert components.logprob_temperature(c) == 1.0
    with pytest.raises(ValueError, match="logprob_temperature must be > 0"):
        dataclasses.replace(tempered_model_cfg(), logprob_temperature=0.0)


def tempered_model_cfg():
    from igpo_jax.model.config import ModelConfig

    return ModelConfig(model_type="llama", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=4)
