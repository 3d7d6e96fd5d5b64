"""Blockwise attention equals the dense attention (values and gradients, fp32) for every mask the
project uses, given as bool masks and as MaskSpecs; the decoder gives the same log-probs and
gradients with either kernel; the compiled backward at 8k tokens needs a fraction of the memory."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from igpo_jax.igpo.scoring import block_inputs
from igpo_jax.model import attention_mask as am
from igpo_jax.model.blockwise_attention import blockwise_attention
from igpo_jax.model.config import ModelConfig
from igpo_jax.model.qwen import Attention, Decoder, _attend

B, K, G, H = 2, 2, 2, 8


def _causal():
    valid = np.ones((B, 37), bool)
    valid[0, 30:] = False  # right padding
    valid[1, :5] = False  # left padding
    valid[1, 17:19] = False  # a hole inside the row
    return am.causal_spec(jnp.asarray(valid)), am.causal_mask(jnp.asarray(valid))


def _packed():
    seg = np.array([[0] * 10 + [1] * 15 + [2] * 8 + [3] * 4, [0] * 20 + [1] * 17])
    valid = np.ones(seg.shape, bool)
    valid[0, 33:] = False
    spec = am.causal_spec(jnp.asarray(valid), jnp.asarray(seg))
    dense = am.causal_mask(jnp.asarray(valid)) & (seg[:, :, None] == seg[:, None, :])
    return spec, dense


def _cache():
    slot_valid = np.ones((B, 48), bool)
    slot_valid[0, :6] = False  # a left-padded prompt
    slot_valid[1, 12:20] = False  # a hole (a shorter tool result)
    slot_valid[:, 41:] = False  # not yet written
    return am.cache_spec(jnp.asarray(slot_valid), 28, 13), am.cache_mask(jnp.asarray(slot_valid), 28, 13)


def _copies():
    ctx_valid = np.ones((B, 21), bool)
    ctx_valid[1, 16:] = False
    turn_start = np.array([[5, 12, 21], [7, 16, 0]], np.int32)
    turn_valid = np.array([[True, True, True], [True, True, False]])
    copy_valid = np.ones((B, 6), bool)
    copy_valid[1, 5:] = False
    args = tuple(jnp.asarray(x) for x in (ctx_valid, turn_start, turn_valid, copy_valid))
    return am.copies_spec(*args), block_inputs(*args)[1]


MASKS = {"causal_padding": _causal, "packed_segments": _packed, "cache_holes": _cache, "ig_copies": _copies}


def test_copies_spec_is_the_scoring_block_mask():
    spec, dense = _copies()
    np.testing.assert_array_equal(spec.dense(), dense)


@pytest.mark.parametrize("kind", sorted(MASKS))
@pytest.mark.parametrize("form", ["spec", "bool"])
def test_blockwise_equals_dense_values_and_gradients(kind, form):
    spec, dense = MASKS[kind]()
    np.testing.assert_array_equal(spec.dense(), dense)
    mask = spec if form == "spec" else dense
    b, t, s = spec.shape
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, K, G, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, K, H)), jnp.float32) for _ in range(2))
    # a query that sees no key (padding) is discarded by every caller; compare the others
    seen = np.asarray(dense).any(-1)[:, :, None, None, None]
    assert seen.any()
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * seen
    # blocks of 8 × 16: several blocks, ragged ends (T, S not multiples), skipped blocks
    ours = lambda q, k, v: blockwise_attention(q, k, v, mask, 8, 16)
    theirs = lambda q, k, v: _attend(q, k, v, dense)
    np.testing.assert_allclose(np.asarray(ours(q, k, v)) * seen, np.asarray(theirs(q, k, v)) * seen, atol=1e-5)
    g_ours = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * w), (0, 1, 2)))(q, k, v)
    g_theirs = jax.grad(lambda *a: jnp.sum(theirs(*a) * w), (0, 1, 2))(q, k, v)
    for a, b_ in zip(g_ours, g_theirs):
        assert float(jnp.max(jnp.abs(b_))) > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5)


def _tiny(attention: str, **kw) -> ModelConfig:
    return ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, attention=attention, **kw)


def _logprob_sum(model, tokens, positions, mask, weights):
    logits = model(tokens, positions, mask)[0]
    logp = jax.nn.log_softmax(logits, -1)
    return jnp.sum(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0] * weights) / jnp.sum(weights)


@pytest.mark.parametrize("kind", ["causal_bool", "causal_spec", "ig_copies"])
def test_decoder_with_blockwise_attention_equals_dense(kind):
    dense_model = Decoder(_tiny("dense", attention_chunk=16), nnx.Rngs(0))
    block_model = Decoder(_tiny("blockwise", attention_block=16), nnx.Rngs(0))
    if kind == "ig_copies":
        spec, dense_mask = _copies()
        mask = spec
        positions = block_inputs(*(jnp.asarray(x) for x in (
            np.asarray(spec.key_valid_BS[:, :21]), [[5, 12, 21], [7, 16, 0]], [[1, 1, 1], [1, 1, 0]],
            np.asarray(spec.key_valid_BS[:, 21:27]))))[0]
    else:
        valid = np.ones((B, 45), bool)
        valid[1, :7] = False
        spec = am.causal_spec(jnp.asarray(valid))
        dense_mask = am.causal_mask(jnp.asarray(valid))
        mask = spec if kind == "causal_spec" else dense_mask
        positions = am.positions_from_valid(jnp.asarray(valid))
    b, t, _ = spec.shape
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (b, t)), jnp.int32)
    weights = jnp.asarray(np.asarray(dense_mask).any(-1)[:, :-1], jnp.float32)  # queries that see a key

    def value_and_grad(model, mask):
        graphdef, state = nnx.split(model)
        f = lambda st: _logprob_sum(nnx.merge(graphdef, st), tokens, positions, mask, weights)
        return jax.jit(jax.value_and_grad(f))(state)

    v_d, g_d = value_and_grad(dense_model, dense_mask)
    v_b, g_b = value_and_grad(block_model, mask)
    np.testing.assert_allclose(float(v_b), float(v_d), rtol=1e-5)
    for a, b_ in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_d)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5, rtol=1e-4)


def _layer_backward_temp_bytes(cfg: ModelConfig, t: int, mask_of) -> int:
    """temp_size_in_bytes of the compiled backward of one attention layer over t tokens."""
    layer = Attention(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(layer)

    def loss(state, x, valid):
        out, _ = nnx.merge(graphdef, state)(x, am.positions_from_valid(valid), mask_of(valid))
        return jnp.sum(out.astype(jnp.float32) ** 2)

    x = jax.ShapeDtypeStruct((1, t, cfg.hidden_size), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, t), jnp.bool_)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x, valid).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_backward_memory_at_8k_tokens_is_a_fraction_of_the_dense():
    t = 8192
    small = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                 num_heads=2, num_kv_heads=1, head_dim=16)
    dense = _layer_backward_temp_bytes(ModelConfig(**small, attention="dense", attention_chunk=0), t,
                                       am.causal_mask)
    ours = _layer_backward_temp_bytes(ModelConfig(**small, attention="blockwise", attention_block=512), t,
                                      am.causal_spec)
    # the dense backward keeps [N, T, T] fp32 scores and weights: ≥ 2 × 2 × 8192² × 4 bytes
    assert dense >= 2 * 2 * t * t * 4
    assert ours <= dense / 4, (ours, dense)
    assert ours < 64 * 2**20  # O(T): a few [N, 512, 512] blocks and [T, ·] vectors


def test_a_long_cached_prefill_through_blockwise_attention_equals_dense():
    """With a KV cache, a prefill longer than attention_block takes the blockwise kernel (over the
    cache's slots, holes included); decoding steps stay dense. Same hidden states as 'dense'."""
    from igpo_jax.model.kv_cache import KVCache, extend

    dense_model = Decoder(_tiny("dense"), nnx.Rngs(0))
    block_model = Decoder(_tiny("blockwise", attention_block=8), nnx.Rngs(0))
    rng = np.random.default_rng(2)
    valid = np.ones((B, 30), bool)
    valid[0, :4] = False  # left padding
    valid[1, 20:23] = False  # a hole
    tokens = jnp.asarray(rng.integers(0, 64, (B, 30)), jnp.int32)
    outs = []
    for model in (dense_model, block_model):
        cache = KVCache.init(model.cfg, batch=B, size=40)
        first, cache = jax.jit(extend)(model, cache, tokens[:, :24], jnp.asarray(valid[:, :24]))
        second, cache = jax.jit(extend)(model, cache, tokens[:, 24:], jnp.asarray(valid[:, 24:]))
        outs.append(np.concatenate([np.asarray(first), np.asarray(second)], 1) * valid[:, :, None])
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_the_attention_keys_are_validated():
    from igpo_jax import config_base

    c = config_base.base_config()
    c.data.synthetic_world = True
    config_base.validate(c)
    c.model.attention = "flash"
    with pytest.raises(ValueError, match="model.attention"):
        config_base.validate(c)
    c.model.attention, c.model.attention_block = "blockwise", 0
    with pytest.raises(ValueError, match="model.attention_block"):
        config_base.validate(c)
    with pytest.raises(ValueError, match="attention"):
        _tiny("flash")


def test_update_and_scoring_forwards_pass_the_compact_mask_to_blockwise_models():
    """update.token_logprobs and the one-pass IG scoring hand a blockwise model its O(length)
    MaskSpec (causal_spec / copies_spec) and give what the dense model gives with its bool mask."""
    from igpo_jax.igpo.scoring import one_pass_mean_logp
    from igpo_jax.training.update import token_logprobs

    dense_model = Decoder(_tiny("dense", attention_chunk=16), nnx.Rngs(0))
    block_model = Decoder(_tiny("blockwise", attention_block=16), nnx.Rngs(0))
    rng = np.random.default_rng(3)
    valid = np.ones((2, 40), bool)
    valid[1, :6] = False  # left padding
    valid[0, 20:24] = False  # a hole (a clipped tool result)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 40)), jnp.int32)
    for with_entropy in (False, True):
        dense = token_logprobs(dense_model, tokens, jnp.asarray(valid), chunk=16, with_entropy=with_entropy)
        block = token_logprobs(block_model, tokens, jnp.asarray(valid), chunk=16, with_entropy=with_entropy)
        # column j is predicted at j − 1; a left-pad query sees no key (dense: a uniform average,
        # blockwise: 0), and no loss token is ever predicted there
        seen = np.cumsum(valid, axis=1) > 0
        compared = valid & np.concatenate([np.zeros((2, 1), bool), seen[:, :-1]], 1)
        for a, b_ in zip(jax.tree.leaves(dense), jax.tree.leaves(block)):
            np.testing.assert_allclose(np.asarray(a)[compared], np.asarray(b_)[compared], atol=1e-5)

    ctx_valid = jnp.asarray(valid[:, :21])
    arrays = (tokens[:, :21], ctx_valid, jnp.asarray([[5, 12, 21], [9, 16, 0]]), jnp.asarray([[1, 1, 1], [1, 1, 0]]),
              jnp.asarray(rng.integers(0, 64, (2, 6)), jnp.int32), jnp.asarray([[1] * 6, [1] * 5 + [0]]),
              jnp.asarray([[0, 1, 2], [1, 2, 3]]), jnp.asarray(rng.integers(0, 64, (2, 3)), jnp.int32),
              jnp.asarray([[1, 1, 1], [1, 1, 0]]))
    turn_valid = np.asarray(arrays[3], bool)
    dense = one_pass_mean_logp(dense_model, *arrays, chunk=16)
    block = one_pass_mean_logp(block_model, *arrays, chunk=16)
    np.testing.assert_allclose(np.asarray(dense)[turn_valid], np.asarray(block)[turn_valid], atol=1e-5)
    assert np.isfinite(np.asarray(block)[turn_valid]).all()


def test_the_blockwise_update_forward_builds_no_length_squared_mask():
    from igpo_jax.training.update import token_logprobs

    def square_bool_masks(model):
        graphdef, state = nnx.split(model)
        fn = lambda st, tok, val: token_logprobs(nnx.merge(graphdef, st), tok, val, chunk=16)[0]
        jaxpr = jax.make_jaxpr(fn)(state, jnp.zeros((2, 40), jnp.int32), jnp.ones((2, 40), bool))
        found = []

        def walk(jp):
            for eqn in jp.eqns:
                found.extend(v.aval.shape for v in eqn.outvars
                             if getattr(v.aval, "dtype", None) == jnp.bool_ and v.aval.shape[-2:] == (40, 40))
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)
        walk(jaxpr.jaxpr)
        return found

    assert square_bool_masks(Decoder(_tiny("dense", attention_chunk=0), nnx.Rngs(0)))  # the probe sees them
    assert not square_bool_masks(Decoder(_tiny("blockwise", attention_block=16), nnx.Rngs(0)))
