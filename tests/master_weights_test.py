"""float32 master weights with bf16 compute: bf16 params are refused for training (their updates
round away), the mixed setup trains every weight the float32 path trains, and the frozen
reference policy is stored in the compute dtype without changing its log-probs."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from igpo_jax import components, config_base
from igpo_jax.training import update
from igpo_jax.model.weights import load_hf
from igpo_jax.training.update import UpdateBatch, UpdateConfig, Updater, compute_logprobs
from tests.conftest import load_config, write_tiny_hf_model

_config = load_config


def _trainable_config():
    c = config_base.base_config()
    c.data.synthetic_world = True
    return c


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_params_are_refused_with_the_reason(dtype):
    c = _trainable_config()
    c.model.param_dtype = c.model.dtype = dtype
    with pytest.raises(ValueError, match="round away") as err:
        config_base.validate(c)
    assert "model.param_dtype" in str(err.value) and "allow_low_precision_params" in str(err.value)
    c.model.allow_low_precision_params = True  # the explicit opt-in
    config_base.validate(c)
    c.model.param_dtype = "float32"  # master weights, low-precision compute: fine
    c.model.allow_low_precision_params = False
    config_base.validate(c)


@pytest.mark.parametrize("name", ["qwen2_5_7b_igpo", "qwen2_5_7b_grpo", "qwen3_1_7b_igpo"])
def test_accelerator_configs_train_float32_masters_with_bf16_compute(name):
    c = _config(name)
    assert (c.model.param_dtype, c.model.dtype, c.rollout.dtype) == ("float32", "bfloat16", "bfloat16")
    assert not c.model.allow_low_precision_params
    config_base.validate(c)


def _batch(model):
    rng = np.random.default_rng(0)
    n, length = 4, 12
    tokens = rng.integers(0, model.cfg.vocab_size, (n, length)).astype(np.int32)
    valid = np.ones((n, length), bool)
    valid[1, 9:] = False
    loss_mask = np.zeros((n, length), np.float32)
    loss_mask[:, 3:11] = 1
    loss_mask[1, 9:] = 0
    advantage = np.where(loss_mask > 0, np.array([[1.0], [-0.5], [0.25], [-1.0]]), 0.0).astype(np.float32)
    zeros = jnp.zeros((n, length), jnp.float32)
    return UpdateBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(loss_mask), jnp.asarray(advantage),
                       None, zeros)


def _changed(model, batch):
    before = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.state(model, nnx.Param))
    Updater(model, UpdateConfig(lr=1e-6, use_kl_loss=False)).update(batch)
    after = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.state(model, nnx.Param))
    return [b != a for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after))]


def _gradient(model, batch):
    """The update's own float32 gradient of this one-step batch (ρ = 1)."""
    graphdef, params = nnx.split(model)
    _, grads, _ = update.summed_gradients(graphdef, params, batch, UpdateConfig(lr=1e-6, use_kl_loss=False), 1, True)
    return [np.asarray(g) for g in jax.tree.leaves(grads)]


def test_fp32_masters_with_bf16_compute_change_every_weight_the_fp32_path_changes(tmp_path):
    write_tiny_hf_model("qwen2", tmp_path)
    fp32 = _changed(load_hf(str(tmp_path)), _batch(load_hf(str(tmp_path))))
    mixed_model = load_hf(str(tmp_path), param_dtype="float32", dtype="bfloat16")
    grads = _gradient(mixed_model, _batch(mixed_model))
    mixed = _changed(mixed_model, _batch(mixed_model))
    total = sum(x.size for x in fp32)
    # AdamW's first step moves every weight with a gradient (embedding rows of unseen tokens have none)
    assert sum(x.sum() for x in fp32) > 0.8 * total
    missing = 0
    for ref, ours, g in zip(fp32, mixed, grads):
        assert np.all(ours[np.abs(g) > 1e-7]), "a weight with a gradient did not move: its update rounded away"
        # the only exceptions: gradients that bf16 activations round to an exact 0 (a cancellation in
        # a bf16 sum of cotangents; measured: 1 of 78400 here, the fp32 gradient there ~1% of its row's)
        assert np.all(g[ref & ~ours] == 0)
        missing += int((ref & ~ours).sum())
    assert missing <= 1e-3 * total
    # what the validation refuses: bf16 params keep almost none of the same step
    bf16_model = load_hf(str(tmp_path), param_dtype="bfloat16", dtype="bfloat16")
    bf16 = _changed(bf16_model, _batch(bf16_model))
    assert sum(x.sum() for x in bf16) < 0.1 * total


def test_the_frozen_reference_is_stored_in_the_compute_dtype_with_the_same_logprobs(tmp_path):
    write_tiny_hf_model("qwen2", tmp_path)
    policy = load_hf(str(tmp_path), param_dtype="float32", dtype="bfloat16")
    reference = components.frozen_copy(policy)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(reference, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    batch = _batch(policy)
    np.testing.assert_array_equal(compute_logprobs(reference, batch.tokens_NL, batch.valid_NL),
                                  compute_logprobs(policy, batch.tokens_NL, batch.valid_NL))
    # its own buffers: the policy's update (which donates the policy's arrays) leaves it intact
    ref_before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(reference))]
    Updater(policy, UpdateConfig(lr=1e-3, use_kl_loss=False)).update(batch)
    for x, y in zip(ref_before, jax.tree.leaves(nnx.state(reference))):
        np.testing.assert_array_equal(x, np.asarray(y))
    fp32 = load_hf(str(tmp_path))  # one dtype: a plain copy
    assert {x.dtype for x in jax.tree.leaves(nnx.state(components.frozen_copy(fp32), nnx.Param))} == {jnp.dtype(jnp.float32)}
