"""The cuDNN route (fused_attention.py): which attentions it takes, and that its call of
jax.nn.dot_product_attention (causal flag, key lengths, grouped heads) computes what the blockwise
kernel computes. cuDNN itself needs a GPU; on the CPU the same call runs with implementation='xla'
(or None), so the argument mapping is checked in values and gradients, fp32 to 1e-5."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from igpo_jax.model import attention_mask as am
from igpo_jax.model import fused_attention
from igpo_jax.model.blockwise_attention import blockwise_attention
from igpo_jax.model.config import ModelConfig
from igpo_jax.model.qwen import Decoder

B, T, K, G, H = 4, 37, 2, 3, 8  # G = 3 and K = 2: a wrong head grouping moves heads between kv heads


def _right_padded_valid():
    valid = np.ones((B, T), bool)
    valid[1, 30:] = False  # right padding
    valid[2, 1:] = False  # one token
    valid[3, :] = False  # an empty row (a micro-batch's filler)
    return valid


@pytest.mark.parametrize("form,dtype,platform,head_dim,enabled,max_head_dim,expected", [
    ("right_padded_causal", "bfloat16", "cuda", 128, True, 128, "cudnn"),
    ("right_padded_causal", "float16", "cuda", 64, True, 128, "cudnn"),
    ("right_padded_causal", "bfloat16", "cuda", 256, True, 256, "cudnn"),  # Hopper
    ("right_padded_causal", "bfloat16", "cuda", 256, True, 128, "blockwise"),  # before Hopper
    ("right_padded_causal", "bfloat16", "cuda", 100, True, 128, "blockwise"),  # not a multiple of 8
    ("right_padded_causal", "float32", "cuda", 128, True, 128, "blockwise"),  # cuDNN: bf16/fp16 only
    ("right_padded_causal", "bfloat16", "cuda", 128, False, 128, "blockwise"),  # the switch is off
    ("right_padded_causal", "bfloat16", "cpu", 128, True, 128, "blockwise"),
    ("right_padded_causal", "bfloat16", "tpu", 128, True, 128, "blockwise"),
    ("right_padded_causal", "bfloat16", "rocm", 128, True, 128, "blockwise"),
    ("causal", "bfloat16", "cuda", 128, True, 128, "blockwise"),  # left padding or holes possible
    ("packed", "bfloat16", "cuda", 128, True, 128, "blockwise"),  # segment ids
    ("cache", "bfloat16", "cuda", 128, True, 128, "blockwise"),  # KV-cache slots with holes
    ("copies", "bfloat16", "cuda", 128, True, 128, "blockwise"),  # the IG block mask
    ("general", "bfloat16", "cuda", 128, True, 128, "blockwise"),  # hand-built, or a sequence shard
    ("bool", "bfloat16", "cuda", 128, True, 128, "blockwise"),  # a materialised mask
])
def test_route(form, dtype, platform, head_dim, enabled, max_head_dim, expected):
    assert fused_attention.route(form, jnp.dtype(dtype), platform, head_dim, enabled, max_head_dim) == expected


def test_on_this_cpu_every_attention_routes_blockwise():
    assert fused_attention.platform() == "cpu"
    spec = am.causal_spec(jnp.ones((1, 8), bool), right_padded=True)
    assert fused_attention.kernel(spec, jnp.bfloat16, 128, True) == "blockwise"


def test_each_constructor_names_its_form():
    valid = jnp.asarray(_right_padded_valid())
    assert am.causal_spec(valid).form == "causal"
    spec = am.causal_spec(valid, right_padded=True)
    assert spec.form == "right_padded_causal"
    np.testing.assert_array_equal(spec.dense(), am.causal_mask(valid))  # the same mask, only named
    assert am.causal_spec(valid, jnp.zeros((B, T), jnp.int32)).form == "packed"
    assert am.cache_spec(valid, 3, 5).form == "cache"
    assert am.copies_spec(valid, jnp.zeros((B, 2), jnp.int32), jnp.ones((B, 2), bool), valid[:, :4]).form == "copies"
    assert am.mask_form(am.causal_mask(valid)) == "bool" and am.mask_form(spec) == "right_padded_causal"
    # the form is static: it survives jit and tree maps
    assert jax.jit(lambda s: s)(spec).form == "right_padded_causal"
    assert jax.tree.map(lambda x: x, spec).form == "right_padded_causal"
    with pytest.raises(ValueError, match="segment"):
        am.causal_spec(valid, jnp.zeros((B, T), jnp.int32), right_padded=True)
    with pytest.raises(ValueError, match="form"):
        am.MaskSpec(*(spec.q_slot_BT,) * 4, spec.key_valid_BS, "flash")


def _qkv(dtype):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, K, G, H)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, H)), dtype) for _ in range(2))
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    return q, k, v, w


def _values_and_grads(attend, q, k, v, w):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * w)
    out = jax.jit(attend)(q, k, v)
    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]


@pytest.mark.parametrize("implementation", ["xla", None])
def test_the_fused_call_equals_blockwise_fp32_values_and_gradients(implementation):
    spec = am.causal_spec(jnp.asarray(_right_padded_valid()), right_padded=True)
    q, k, v, w = _qkv(jnp.float32)
    ours = _values_and_grads(lambda *a: fused_attention.fused_attention(*a, spec, implementation), q, k, v, w)
    theirs = _values_and_grads(lambda *a: blockwise_attention(*a, spec, 8, 16), q, k, v, w)
    for a, b in zip(ours, theirs):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, atol=1e-5)
    # every query of a real row (its padding queries too: they see the row's n keys) is compared,
    # and the empty row gives 0 in both
    assert np.abs(ours[0][3]).max() == 0 and np.abs(ours[0][1, 30:]).min() > 0


def test_the_fused_call_equals_blockwise_in_bf16():
    spec = am.causal_spec(jnp.asarray(_right_padded_valid()), right_padded=True)
    q, k, v, w = _qkv(jnp.bfloat16)
    exact = _values_and_grads(lambda *a: blockwise_attention(*a, spec, 8, 16), *(x.astype(jnp.float32) for x in (q, k, v)), w)
    ours = _values_and_grads(lambda *a: fused_attention.fused_attention(*a, spec, "xla"), q, k, v, w)
    theirs = _values_and_grads(lambda *a: blockwise_attention(*a, spec, 8, 16), q, k, v, w)
    for a, b, x in zip(ours, theirs, exact):
        scale = np.abs(x).max()
        # each within bf16 rounding of the fp32 result: a few units of bf16's 2^-8 relative step
        assert np.abs(a - x).max() < 0.015 * scale and np.abs(b - x).max() < 0.015 * scale
        assert np.abs(a - b).max() < 0.015 * scale


def test_a_row_that_breaks_the_right_padded_claim_reads_nan():
    valid = _right_padded_valid()
    valid[0, :3] = False  # left padding under a right_padded=True claim
    spec = am.causal_spec(jnp.asarray(valid), right_padded=True)
    q, k, v, _ = _qkv(jnp.float32)
    out = np.asarray(fused_attention.fused_attention(q, k, v, spec, "xla"))
    assert np.isnan(out[0]).all()
    np.testing.assert_allclose(out[1:], np.asarray(blockwise_attention(q, k, v, spec, 8, 16))[1:], atol=1e-5)


def test_the_fused_call_refuses_other_forms():
    q, k, v, _ = _qkv(jnp.float32)
    with pytest.raises(ValueError, match="form"):
        fused_attention.fused_attention(q, k, v, am.causal_spec(jnp.asarray(_right_padded_valid())), "xla")


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=2,
                       num_heads=6, num_kv_heads=2, head_dim=8, qkv_bias=True, attention="blockwise",
                       attention_block=16, **kw)


def test_the_decoder_routes_the_update_forward_through_the_fused_call(monkeypatch):
    """update.token_logprobs on a model with gpu_fused_attention, with the backend made to read
    'cuda', jax.nn.dot_product_attention made to run its XLA implementation, and fp32 let through
    the route (cuDNN's bf16 is checked above): every layer calls it with implementation='cudnn'
    and the log-probs and gradients are the blockwise model's."""
    from igpo_jax.training.update import token_logprobs

    calls = []
    real = jax.nn.dot_product_attention

    def on_the_cpu(*args, implementation=None, **kwargs):
        calls.append((implementation, kwargs["is_causal"]))
        return real(*args, implementation="xla", **kwargs)

    rng = np.random.default_rng(1)
    valid = np.ones((3, 40), bool)
    valid[1, 25:] = False
    valid[2, 9:] = False
    tokens = jnp.asarray(rng.integers(0, 64, (3, 40)), jnp.int32)
    weights = jnp.asarray(valid, jnp.float32)

    def value_and_grad(model):
        graphdef, state = nnx.split(model)
        f = lambda st: jnp.sum(token_logprobs(nnx.merge(graphdef, st), tokens, jnp.asarray(valid), 16)[0] * weights) / jnp.sum(weights)
        return jax.jit(jax.value_and_grad(f))(state)

    blocked = value_and_grad(Decoder(_tiny(), nnx.Rngs(0)))
    fused_model = Decoder(_tiny(gpu_fused_attention=True), nnx.Rngs(0))
    monkeypatch.setattr(fused_attention, "CUDNN_DTYPES", ("float32",))
    monkeypatch.setattr(jax.nn, "dot_product_attention", on_the_cpu)
    value_and_grad(fused_model)
    assert calls == []  # on the CPU backend: blockwise
    monkeypatch.setattr(fused_attention, "platform", lambda: "cuda")
    fused = value_and_grad(fused_model)
    assert calls == [("cudnn", True)] * 2  # one per layer, traced once
    np.testing.assert_allclose(float(fused[0]), float(blocked[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(blocked[1])):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_the_switch_is_validated_and_the_accelerator_configs_use_it():
    import importlib.util
    import os

    from igpo_jax import config_base

    c = config_base.base_config()
    c.data.synthetic_world = True
    config_base.validate(c)
    c.model.gpu_fused_attention = True  # with the base 'dense' kernel
    with pytest.raises(ValueError, match="gpu_fused_attention.*blockwise"):
        config_base.validate(c)
    c.model.attention = "blockwise"
    config_base.validate(c)
    with pytest.raises(ValueError, match="gpu_fused_attention"):
        ModelConfig("llama", 64, 32, 64, 1, 2, 1, 16, gpu_fused_attention=True)

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    for name in ("qwen2_5_7b_igpo", "qwen2_5_7b_grpo", "qwen3_1_7b_igpo"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(configs, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
        config_base.validate(c)
        assert c.model.gpu_fused_attention and c.model.attention == "blockwise" and c.model.dtype == "bfloat16", name
