"""Chunked token log-probs: the loss-position compaction computes exactly the needed positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpo_jax.model.token_logprobs import logprobs_from_hidden
from igpo_jax.model.weights import load_hf
from tests.conftest import write_tiny_hf_model

B, T = 3, 21


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_hf_model("llama", path)  # tied embeddings: the projection is embed.T
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
