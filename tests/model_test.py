"""The decoder against transformers (torch CPU, fp32) on tiny random checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from igpo_jax.model.kv_cache import KVCache, extend
from igpo_jax.model.qwen import forward_padded
from igpo_jax.model.weights import load_hf
from tests.conftest import write_tiny_hf_model

LENGTHS = (7, 3, 5)  # ragged rows, left padded to 7


def _left_padded_batch(vocab: int, lengths=LENGTHS, seed=1):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int32)
    valid = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(0, vocab, n)
        valid[i, width - n:] = True
    return tokens, valid


def _hf_logits(model, tokens, valid):
    mask = torch.tensor(valid, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=mask, position_ids=positions)
    return out.logits.numpy()


def _assert_close_on_valid(ours, ref, valid, rtol=1e-4):
    ours, ref = np.asarray(ours)[valid], np.asarray(ref)[valid]
    scale = np.abs(ref).max()
    assert np.max(np.abs(ours - ref)) <= rtol * scale, np.max(np.abs(ours - ref)) / scale


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
def test_logits_match_transformers_with_left_padding(model_type, tmp_path):
    hf = write_tiny_hf_model(model_type, tmp_path)
    ours = load_hf(str(tmp_path))
    assert ours.cfg.qkv_bias == (model_type == "qwen2")
    assert ours.cfg.qk_norm == (model_type == "qwen3")
    tokens, valid = _left_padded_batch(ours.cfg.vocab_size)
    logits = jax.jit(forward_padded)(ours, tokens, valid)
    _assert_close_on_valid(logits, _hf_logits(hf, tokens, valid), valid)


def test_tied_embeddings_and_rope_scaling_match(tmp_path):
    hf = write_tiny_hf_model("llama", tmp_path, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    ours = load_hf(str(tmp_path))
    assert ours.cfg.tie_embeddings and ours.cfg.rope_scaling.rope_type == "llama3"
    tokens, valid = _left_padded_batch(ours.cfg.vocab_size, lengths=(40, 33))
    _assert_close_on_valid(forward_padded(ours, tokens, valid), _hf_logits(hf, tokens, valid), valid)


@pytest.mark.parametrize("model_type,dtype,rtol", [("qwen2", "float32", 1e-5), ("qwen3", "float32", 1e-5),
                                                   ("qwen2", "bfloat16", 2e-2)])
def test_cached_prefill_and_decode_equal_full_forward(model_type, dtype, rtol, tmp_path):
    """bf16: the cache holds bf16 keys and values (its writes and the attention products over its
    [B, K, S, H] layout take other XLA paths than fp32's)."""
    write_tiny_hf_model(model_type, tmp_path)
    model = load_hf(str(tmp_path), param_dtype=dtype, dtype=dtype)
    tokens, valid = _left_padded_batch(model.cfg.vocab_size, lengths=(9, 4, 6))
    full = forward_padded(model, tokens, valid)

    prefill = 5  # the first 5 columns at once, then one column per step
    cache = KVCache.init(model.cfg, batch=3, size=16)
    assert cache.k_layers[0].dtype == jnp.dtype(dtype)
    step = jax.jit(lambda m, c, t, v: extend(m, c, t, v))
    hidden, cache = step(model, cache, tokens[:, :prefill], valid[:, :prefill])
    pieces = [model.logits_from_hidden(hidden)]
    for t in range(prefill, tokens.shape[1]):
        hidden, cache = step(model, cache, tokens[:, t:t + 1], valid[:, t:t + 1])
        pieces.append(model.logits_from_hidden(hidden))
    cached = jnp.concatenate(pieces, axis=1)
    _assert_close_on_valid(cached, full, valid, rtol=rtol)
    assert int(cache.length) == tokens.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.next_pos_B), valid.sum(1))


def test_bf16_compute_stays_close_to_fp32(tmp_path):
    write_tiny_hf_model("qwen2", tmp_path)
    fp32 = load_hf(str(tmp_path))
    bf16 = load_hf(str(tmp_path), param_dtype="bfloat16", dtype="bfloat16")
    assert bf16.embed[...].dtype == jnp.bfloat16
    tokens, valid = _left_padded_batch(fp32.cfg.vocab_size)
    a = np.asarray(forward_padded(fp32, tokens, valid))[valid]
    b = np.asarray(forward_padded(bf16, tokens, valid))[valid]
    assert np.max(np.abs(a - b)) < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_remat_gives_same_gradients(tmp_path):
    write_tiny_hf_model("llama", tmp_path)
    plain = load_hf(str(tmp_path))
    remat = load_hf(str(tmp_path), remat=True)
    tokens, valid = _left_padded_batch(plain.cfg.vocab_size)
    from flax import nnx

    def loss(model):
        return forward_padded(model, tokens, valid).mean()

    g1 = nnx.grad(loss)(plain)
    g2 = nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat,param_dtype,dtype,rtol", [(False, "float32", "float32", 1e-5),
                                                          (True, "float32", "bfloat16", 2e-2)])
def test_scanned_layers_equal_the_unrolled_layers(remat, param_dtype, dtype, rtol, tmp_path):
    """Logits and every gradient (in the params' own dtype) of the scanned layers equal the layer loop's."""
    from flax import nnx

    write_tiny_hf_model("qwen2", tmp_path)
    kw = dict(remat=remat, param_dtype=param_dtype, dtype=dtype)
    loop, scan = load_hf(str(tmp_path), **kw), load_hf(str(tmp_path), scan_layers=True, **kw)
    tokens, valid = _left_padded_batch(loop.cfg.vocab_size)
    _assert_close_on_valid(forward_padded(scan, tokens, valid), forward_padded(loop, tokens, valid), valid, rtol)

    def loss(model):
        return jnp.where(valid[..., None], forward_padded(model, tokens, valid), 0.0).mean()

    grads = [jax.tree.leaves(nnx.grad(loss)(m)) for m in (loop, scan)]
    for a, b in zip(*grads):
        assert a.dtype == b.dtype == jnp.dtype(param_dtype)
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * float(np.abs(a).max()) + 1e-9)


def test_remat_layers_share_one_trace(tmp_path, monkeypatch):
    """The remat body is traced once for all (identical) layers, in the plain forward and in the
    shared-prefix one: a start-up traces the update programs num_layers times faster."""
    from flax import nnx

    from igpo_jax.model import qwen, shared_prefix

    calls = {"block": 0, "layer": 0}
    real_block, real_layer = qwen._pure_block, shared_prefix._pure_layer

    def block(*args):
        calls["block"] += 1
        return real_block(*args)

    def layer(*args):
        calls["layer"] += 1
        return real_layer(*args)

    monkeypatch.setattr(qwen, "_pure_block", block)
    monkeypatch.setattr(shared_prefix, "_pure_layer", layer)
    write_tiny_hf_model("llama", tmp_path)
    model = load_hf(str(tmp_path), remat=True)
    assert model.cfg.num_layers == 2
    tokens, valid = _left_padded_batch(model.cfg.vocab_size)
    nnx.grad(lambda m: forward_padded(m, tokens, valid).mean())(model)
    split = np.full((tokens.shape[0],), 2, np.int32)
    layout = shared_prefix.PrefixLayout(1, 2, tokens.shape[1])
    nnx.grad(lambda m: shared_prefix.hidden_states(m, tokens, valid, split, layout)[1].mean())(model)
    assert calls == {"block": 1, "layer": 1}


def test_a_remat_model_also_samples_over_its_kv_cache(tmp_path):
    # the configs that train with remat sample with the same model: the cached path must not remat
    from igpo_jax.rollout.sampler import Sampler, SamplingParams

    write_tiny_hf_model("llama", tmp_path)
    outputs = []
    for remat in (False, True):
        model = load_hf(str(tmp_path), remat=remat)
        sampler = Sampler(model, None, batch_size=2, cache_size=32, params=SamplingParams(temperature=0.0))
        outputs.append([o.tokens for o in sampler.generate([[5, 6, 7], [8, 9]], [0, 1], 6)])
    assert outputs[0] == outputs[1] and all(len(t) == 6 for t in outputs[0])


def test_a_remat_model_computes_micro_batched_logprobs(tmp_path):
    from igpo_jax.training.update import compute_logprobs

    write_tiny_hf_model("llama", tmp_path)
    tokens, valid = _left_padded_batch(32)
    plain = compute_logprobs(load_hf(str(tmp_path)), tokens, valid, micro_batch_size=1)
    remat = compute_logprobs(load_hf(str(tmp_path), remat=True), tokens, valid, micro_batch_size=1)
    np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), atol=1e-6)


def test_abstract_decoder_is_the_random_decoder_without_its_rng():
    """Loaders fill `abstract_decoder` (built without an RNG, 10x faster to trace): the same
    graph, shapes, dtypes and logical axes as an abstract random-init Decoder."""
    from flax import nnx

    from igpo_jax.model import config as config_lib
    from igpo_jax.model.qwen import Decoder, abstract_decoder

    cfg = config_lib.preset("SmolLM2-135M-Instruct")
    ours = nnx.split(abstract_decoder(cfg))
    random = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
    assert ours[0] == random[0]
    describe = lambda state: [(path, v.get_value().shape, v.get_value().dtype, v.get_metadata().get("axes"))
                              for path, v in nnx.to_flat_state(state)]
    assert describe(ours[1]) == describe(random[1])


def test_the_cached_path_traces_one_layer_for_all_layers(tmp_path, monkeypatch):
    """Sampling programs trace and lower their (identical) layers once, and compute what the
    per-layer loop computes: the same hidden states and cache, bit for bit."""
    from igpo_jax.model import qwen

    write_tiny_hf_model("llama", tmp_path)
    model = load_hf(str(tmp_path))
    assert model.cfg.num_layers == 2
    tokens, valid = _left_padded_batch(model.cfg.vocab_size, lengths=(9, 4, 6))
    calls, real_call = [], qwen.Block.__call__
    monkeypatch.setattr(qwen.Block, "__call__", lambda self, *a: calls.append(1) or real_call(self, *a))
    step = lambda m, c: extend(m, c, tokens, valid)
    size = 19  # a cache no other test traces

    hidden, cache = jax.jit(step)(model, KVCache.init(model.cfg, batch=3, size=size))
    assert len(calls) == 1

    def per_layer(block, x, positions, mask, cache, layer):  # every layer traced on its own
        return block(x, positions, mask, cache, layer)

    monkeypatch.setattr(qwen, "_cached_block_call", per_layer)
    step_apart = lambda m, c: extend(m, c, tokens, valid)  # a new function: traced again
    hidden_apart, cache_apart = jax.jit(step_apart)(model, KVCache.init(model.cfg, batch=3, size=size))
    assert len(calls) == 1 + 2
    np.testing.assert_array_equal(np.asarray(hidden), np.asarray(hidden_apart))
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(cache_apart)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
