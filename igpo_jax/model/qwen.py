"""Flax NNX decoder for Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm) and Llama/SmolLM2 (tied
embeddings), selected by `ModelConfig` switches.

Legend: B batch, T query tokens, S key slots (T itself, or the KV-cache length), D hidden,
N query heads, K kv heads, G = N/K heads per kv head, H head dim, F mlp width, V vocab, L layers.

Attention takes an explicit mask `mask_BTS` (True = may attend): a bool [B, T, S] array, or a
compact `attention_mask.MaskSpec` (O(T + S) vectors; the dense path materialises it, the blockwise
path computes each block from it). Callers build it inside their jitted function (`causal_mask`,
the KV cache, the scoring block mask), so one decoder serves training, sampling and scoring.
`cfg.attention` picks the kernel: 'dense' (`_attend`, chunked over queries) or 'blockwise'
(blockwise_attention.py: O(length) memory in forward and backward). With `cfg.gpu_fused_attention`,
a cache-free attention whose mask cuDNN takes (fused_attention.route: right-padded causal rows,
bf16/fp16, an NVIDIA GPU) runs cuDNN's fused kernel instead, the blockwise one staying for the rest.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from igpo_jax.model import fused_attention
from igpo_jax.model.attention_mask import MaskSpec, causal_mask, positions_from_valid
from igpo_jax.model.blockwise_attention import blockwise_attention
from igpo_jax.model.config import ModelConfig
from igpo_jax.model.kv_cache import KVCache
from igpo_jax.model.projection import project
from igpo_jax.runtime.sharding import constrain, sequence_parallel_attention

_MASKED = -1e30  # finite, so a fully masked (padding) query row gives a uniform softmax, not NaN


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, scale: float | None = None) -> nnx.Param:
    """Normal(0, scale) init (scale defaults to 1/sqrt(fan_in)); `axes` are logical axis names.
    Zeros without `rngs` (`abstract_decoder`)."""
    if rngs is None:
        return nnx.Param(jnp.zeros(shape, dtype), axes=axes)
    scale = scale if scale is not None else 1.0 / math.sqrt(shape[0])
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


def _ones(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), axes=axes)


def _zeros(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), axes=axes)


def rms_norm(x, weight, eps: float):
    """RMSNorm in fp32, cast back before the scale (as transformers does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies [H/2], with the checkpoint's theta and rope scaling."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    s = cfg.rope_scaling
    if s.rope_type == "linear":
        inv = inv / s.factor
    elif s.rope_type == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * inv / s.factor + smooth * inv
        inv = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
        inv = jnp.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), smoothed, inv)
    return inv


def apply_rope(x_BTnH, positions_BT, inv_freq_h):
    """Rotary embedding, transformers' rotate-half convention (first half ↔ second half)."""
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x_BTnH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTnH.dtype)


def _attend(q_BTKGH, k, v, mask_BTS, kv_layout: str = "bskh"):
    """Grouped-query attention with fp32 scores and softmax. `k` and `v` are laid out as
    `kv_layout` says: [B, S, K, H] as projected, or [B, K, S, H] as the KV cache holds them.

    The softmax is normalised after the value matmul (as flash attention does): dividing the
    [B, T, N, H] output costs H per query instead of S, and on a CPU these elementwise passes
    over [B, N, T, S] (forward and backward) cost as much as the matmuls around them."""
    h = q_BTKGH.shape[-1]
    if isinstance(mask_BTS, MaskSpec):
        mask_BTS = mask_BTS.dense()
    scores = jnp.einsum(f"btkgh,{kv_layout}->bkgts", q_BTKGH, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _MASKED)
    # the shift cancels in the ratio: no gradient through it (as jax.nn.softmax does)
    shift = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - shift)
    total_BKGT = jnp.sum(weights, axis=-1)
    # (the dot's own [B, K, G, T, H] order, moved after: XLA's CPU backend cannot run a bf16 → f32
    # dot that writes [B, T, K, G, H] straight from a [B, K, S, H] operand)
    out = jnp.einsum(f"bkgts,{kv_layout}->bkgth", weights.astype(q_BTKGH.dtype), v, preferred_element_type=jnp.float32)
    return jnp.moveaxis(out / total_BKGT[..., None], 3, 1).astype(q_BTKGH.dtype)


def _mask_corner(mask, q0: int, num_q: int, num_k: int):
    """Queries [q0, q0 + num_q) × keys [0, num_k) of a bool mask or a MaskSpec."""
    if isinstance(mask, MaskSpec):
        return mask.block(q0, num_q, 0, num_k)
    return mask[:, q0:q0 + num_q, :num_k]


def _chunked_attend(q, k, v, mask_BTS, chunk: int):
    """`_attend` of a whole row (cache-free, causal mask) in query blocks of `chunk`."""
    t = q.shape[1]
    if not chunk or t <= chunk:
        return _attend(q, k, v, mask_BTS)
    # The mask is causal (s ≤ t), so query block [a, e) needs keys [0, e) only: skipping the
    # blocks above the diagonal nearly halves the score/softmax work, which at short head dims
    # costs more than the matmuls around it.
    return jnp.concatenate([
        _attend(q[:, a:a + chunk], k[:, :a + chunk], v[:, :a + chunk],
                _mask_corner(mask_BTS, a, min(chunk, t - a), min(a + chunk, t)))
        for a in range(0, t, chunk)], axis=1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None):
        d, n, k, h, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_param_dtype
        self.cfg = cfg
        self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd, scale=1 / math.sqrt(n * h))
        if cfg.qkv_bias:
            self.q_bias = _zeros((n, h), ("heads", "head_dim"), pd)
            self.k_bias = _zeros((k, h), ("kv_heads", "head_dim"), pd)
            self.v_bias = _zeros((k, h), ("kv_heads", "head_dim"), pd)
        if cfg.qk_norm:
            self.q_norm = _ones((h,), ("head_dim",), pd)
            self.k_norm = _ones((h,), ("head_dim",), pd)

    def __call__(self, x_BTD, positions_BT, mask_BTS, cache: KVCache | None = None, layer: int = 0):
        """Returns (out_BTD, cache). Without a cache, `mask_BTS` must be causal (never s > t).
        With one, this layer's new keys and values are written into it in place (at slot
        `cache.length`) and attention runs over all S cache slots; one cache threaded through
        every layer keeps XLA's updates in place."""
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        q = project("btd,dnh->btnh", x_BTD, self.q_proj[...])
        k = project("btd,dkh->btkh", x_BTD, self.k_proj[...])
        v = project("btd,dkh->btkh", x_BTD, self.v_proj[...])
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        inv_freq = rope_inv_freq(cfg)
        q = constrain(apply_rope(q, positions_BT, inv_freq), ("batch", "length", "heads", "head_dim"))
        k = apply_rope(k, positions_BT, inv_freq)
        b, t, n, h = q.shape
        q = q.reshape(b, t, cfg.num_kv_heads, n // cfg.num_kv_heads, h)
        chunk = cfg.attention_chunk
        blockwise = cfg.attention == "blockwise"
        if cache is not None:
            cache = cache.write(layer, k, v)
            k_BKSH, v_BKSH = cache.read(layer)
            if blockwise and t > cfg.attention_block:  # a long prefill; decoding steps stay dense
                out = blockwise_attention(q, jnp.swapaxes(k_BKSH, 1, 2).astype(dt), jnp.swapaxes(v_BKSH, 1, 2).astype(dt),
                                          mask_BTS, cfg.attention_block, cfg.attention_block)
            else:
                out = _attend(q, k_BKSH.astype(dt), v_BKSH.astype(dt), mask_BTS, kv_layout="bksh")
        elif blockwise:
            block = cfg.attention_block
            blocked = lambda *a: blockwise_attention(*a, block, block)
            attend = blocked
            if fused_attention.kernel(mask_BTS, dt, h, cfg.gpu_fused_attention) == "cudnn":
                attend = fused_attention.fused_attention
            # (a shard of a sequence-split row: blockwise, its queries do not start at key 0)
            out = sequence_parallel_attention(attend, q, k.astype(dt), v.astype(dt), mask_BTS, split_attend=blocked)
        else:
            # (split over a `sequence` mesh axis, a shard's queries are not the row's first: plain
            # dense attention there)
            out = sequence_parallel_attention(functools.partial(_chunked_attend, chunk=chunk),
                                              q, k.astype(dt), v.astype(dt), mask_BTS, split_attend=_attend)
        out = out.reshape(b, t, n, h)
        out = project("btnh,nhd->btd", out, self.o_proj[...])
        return out, cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_param_dtype
        self.cfg = cfg
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)

    def __call__(self, x_BTD):
        gate = project("btd,df->btf", x_BTD, self.gate_proj[...])
        up = project("btd,df->btf", x_BTD, self.up_proj[...])
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return project("btf,fd->btd", hidden, self.down_proj[...])


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None):
        self.cfg = cfg
        self.input_norm = _ones((cfg.hidden_size,), ("embed",), cfg.jnp_param_dtype)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = _ones((cfg.hidden_size,), ("embed",), cfg.jnp_param_dtype)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BTD, positions_BT, mask_BTS, cache: KVCache | None = None, layer: int = 0):
        eps = self.cfg.rms_norm_eps
        attn_out, cache = self.attn(rms_norm(x_BTD, self.input_norm[...], eps), positions_BT, mask_BTS,
                                    cache, layer)
        x_BTD = x_BTD + attn_out
        x_BTD = x_BTD + self.mlp(rms_norm(x_BTD, self.post_attn_norm[...], eps))
        return constrain(x_BTD, ("batch", "length", "embed")), cache


def _block_call(block: Block, x, positions, mask, cache, layer):
    return block(x, positions, mask, cache, layer)


@functools.partial(jax.jit, static_argnums=(0,))
def _one_layer_of_cache(graphdef, state, x, positions, mask, cache):
    return nnx.merge(graphdef, state)(x, positions, mask, cache, 0)


def _cached_block_call(block: Block, x, positions, mask, cache, layer):
    """`_block_call` over a cache, as one jitted function of the block's state and its layer of
    the cache: every layer of a sampling program then shares one trace and one lowered function
    (XLA inlines it; the program computes what `_block_call` does), not one per layer."""
    graphdef, state = nnx.split(block)
    one = cache.replace(k_layers=(cache.k_layers[layer],), v_layers=(cache.v_layers[layer],))
    x, one = _one_layer_of_cache(graphdef, state, x, positions, mask, one)
    put = lambda layers, new: layers[:layer] + new + layers[layer + 1:]
    return x, cache.replace(k_layers=put(cache.k_layers, one.k_layers), v_layers=put(cache.v_layers, one.v_layers))


def _pure_block(graphdef, state, x, positions, mask):
    return nnx.merge(graphdef, state)(x, positions, mask)[0]


def _remat_block_call(block: Block, x, positions, mask, cache, layer):
    """`_block_call` whose activations are recomputed in the backward pass (cache-free path only).

    A pure function of the block's state under `jax.checkpoint`, not `nnx.remat`: the latter
    writes the Params back and fails when the module was merged outside an enclosing
    lax.map/scan (a different trace level). One module-level function with the graphdef static,
    not a closure per layer: JAX caches a checkpoint's trace by function, static arguments and
    shapes, so the layers (equal graphdefs) share one trace (and one partial evaluation and
    transpose under a gradient) instead of tracing the same block num_layers times."""
    del cache, layer  # no cache here
    graphdef, state = nnx.split(block)
    return jax.checkpoint(_pure_block, static_argnums=(0,))(graphdef, state, x, positions, mask), None


def scan_layers(layers, layer_step, carry, invariants: tuple, remat: bool):
    """`carry = layer_step(graphdef, state, carry, *invariants)` for each layer in turn, as one
    `lax.scan` over the layers' states stacked along a new leading axis (cache-free forwards only).

    One layer body in the program instead of num_layers copies (smaller programs: faster to
    compile and to load from the compilation cache), and under a gradient each layer's backward,
    its weight gradients included, is done inside its own loop iteration: unrolled, XLA may defer
    the weight-gradient dots of many layers past later layers' backward and hold their [T, F]
    operands meanwhile (planning/memory.py). The stack copies the layer weights in their own dtype, so the
    gradients stay in it (float32 masters get float32 gradients, as unscanned).

    `invariants` (positions, masks: the same for every layer) ride in the carry behind an
    optimisation barrier. Closed over, or carried through unchanged, they are loop invariants, and
    the scan's partial evaluation then computes everything that depends on them alone (every
    attention block's mask, broadcast to [B, K, G, tq, tk]) once, before the loop, and keeps it for
    the backward: 120 GB a device for one 32k-token row of the 7B update."""
    graphdef = nnx.graphdef(layers[0])
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(nnx.state(block) for block in layers))

    def body(c, state):
        c, inv = c
        inv = jax.lax.optimization_barrier(inv)
        return (layer_step(graphdef, state, c, *inv), inv), None

    return jax.lax.scan(jax.checkpoint(body) if remat else body, (carry, invariants), stacked)[0][0]


class Decoder(nnx.Module):
    """Causal LM. `__call__` → logits; `hidden` + `logits_from_hidden` let callers chunk the vocab
    projection (the largest activation for small models)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None):
        self.cfg = cfg
        pd = cfg.jnp_param_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, scale=0.02)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _ones((cfg.hidden_size,), ("embed",), pd)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    def hidden(self, tokens_BT, positions_BT, mask_BTS, cache: KVCache | None = None):
        """Final-norm hidden states [B, T, D] and the updated cache (None without one).

        With a cache, the T new tokens are written at slots [cache.length, cache.length + T) and
        `mask_BTS` ranges over all S cache slots; the caller keeps the bookkeeping (KVCache.extend).
        """
        cfg = self.cfg
        # gather, then cast: the same values, but the backward's scatter-add over a token's
        # occurrences then sums in the param dtype (float32 masters), not in bf16, where a row's
        # contributions can cancel to an exact 0 and leave that weight untrained
        x = self.embed[...][tokens_BT].astype(cfg.jnp_dtype)
        x = constrain(x, ("batch", "length", "embed"))
        # remat only pays off under a gradient, which never flows through the cached (sampling) path
        remat = cfg.remat and cache is None
        if cfg.scan_layers and cache is None:
            # (the loop's carry pinned to the activations' sharding, as each layer's output is)
            step = lambda graphdef, state, x, positions, mask: _pure_block(
                graphdef, state, constrain(x, ("batch", "length", "embed")), positions, mask)
            x = scan_layers(self.layers, step, x, (positions_BT, mask_BTS), remat)
            return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), cache
        block_call = _remat_block_call if remat else _block_call if cache is None else _cached_block_call
        for i, block in enumerate(self.layers):
            x, cache = block_call(block, x, positions_BT, mask_BTS, cache, i)
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), cache

    def vocab_weight(self):
        """The vocab projection [D, V] in the param dtype: embed.T when the embeddings are tied."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def logits_from_hidden(self, hidden_BTD):
        """fp32 logits; the projection runs in the compute dtype."""
        hidden = hidden_BTD.astype(self.cfg.jnp_dtype)
        w = self.vocab_weight()
        # [B, T, V], or [rows, V] when the caller flattened positions (token_logprobs)
        x_idx, axes = ("pd", ("batch", "vocab")) if hidden.ndim == 2 else ("btd", ("batch", "length", "vocab"))
        return constrain(project(f"{x_idx},dv->{x_idx[:-1]}v", hidden, w, jnp.float32), axes)

    def __call__(self, tokens_BT, positions_BT, mask_BTS, cache: KVCache | None = None):
        hidden, cache = self.hidden(tokens_BT, positions_BT, mask_BTS, cache)
        return self.logits_from_hidden(hidden), cache


def abstract_decoder(cfg: ModelConfig) -> Decoder:
    """`Decoder(cfg)` with ShapeDtypeStructs for params (no memory), for loaders and planners to fill.

    Built without an RNG: under `nnx.eval_shape` each `rngs.params()` writes a traced counter
    back into its Variable, and JAX then composes an error message that walks the whole trace
    so far (for `getattr(tracer, 'sharding')`): 0.5-1.2 s for SmolLM2's 211 params, quadratic in
    their count, against ~0.05 s with zeros."""
    return nnx.eval_shape(lambda: Decoder(cfg, None))


def forward_padded(model: Decoder, tokens_BT, valid_BT):
    """Logits of a (left- or right-) padded batch without a cache: positions skip padding."""
    return model(tokens_BT, positions_from_valid(valid_BT), causal_mask(valid_BT))[0]
