"""Blockwise (flash-style) grouped-query attention with O(length) memory in forward and backward.

Legend: B batch, T queries, S keys, K kv heads, G query heads per kv head, H head dim;
tq / tk the query / key block sizes.

The forward walks key blocks with an online softmax (running max m, running sum l, unnormalised
output) and keeps only the output and the log-sum-exp per query; the backward (`custom_vjp`)
recomputes each block's scores from q, k and the lse (FlashAttention-2's recurrence:
dS = P ∘ (dP − rowsum(dO ∘ O))). Live memory is a few [B, K, G, tq, tk] blocks plus O(T + S)
vectors, against the dense path's [B, K, G, T, S] scores and weights, which its backward keeps.

The mask is either a materialised bool mask_BTS (sliced per block) or a `MaskSpec` (a block is
computed from O(T + S) vectors: no [T, S] array at all). A block with no visible entry is skipped
(`lax.cond`), so a causal mask costs about half the blocks. Plain JAX loops: CPU, GPU and TPU.

Semantics match `qwen._attend` for every query that sees at least one key; a query that sees
none (padding) gets 0 here (the dense path gives a uniform average; both are discarded).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from igpo_jax.model.attention_mask import MaskSpec

_NEG = -1e30


def _mask_block(mask, q0, tq: int, k0, tk: int):
    if isinstance(mask, MaskSpec):
        return mask.block(q0, tq, k0, tk)
    return jax.lax.dynamic_slice(mask, (0, q0, k0), (mask.shape[0], tq, tk))


def _pad_axis(x, axis: int, size: int, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _pad_mask(mask, t: int, s: int):
    """Padded queries see nothing; padded keys are invisible."""
    if not isinstance(mask, MaskSpec):
        return _pad_axis(_pad_axis(mask.astype(bool), 1, t, False), 2, s, False)
    return MaskSpec(_pad_axis(mask.q_slot_BT, 1, t, -1), _pad_axis(mask.q_seg_BT, 1, t),
                    _pad_axis(mask.q_limit_BT, 1, t), _pad_axis(mask.key_seg_BS, 1, s),
                    _pad_axis(mask.key_valid_BS, 1, s, False))  # (padded queries see nothing: no named form)


def blockwise_attention(q_BTKGH, k_BSKH, v_BSKH, mask, block_q: int = 512, block_k: int = 512):
    """out_BTKGH = softmax(q·kᵀ/√H, masked) · v, in blocks of `block_q` queries × `block_k` keys.
    `mask` is a bool [B, T, S] (True = may attend) or a `MaskSpec`."""
    b, t, kh, g, h = q_BTKGH.shape
    s = k_BSKH.shape[1]
    tq, tk = min(block_q, t), min(block_k, s)
    t_pad, s_pad = -(-t // tq) * tq, -(-s // tk) * tk
    q = _pad_axis(q_BTKGH, 1, t_pad)
    k, v = _pad_axis(k_BSKH, 1, s_pad), _pad_axis(v_BSKH, 1, s_pad)
    out = _attention(tq, tk, q, k, v, _pad_mask(mask, t_pad, s_pad))
    return out[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(tq, tk, q, k, v, mask):
    return _forward(tq, tk, q, k, v, mask)[0]


def _forward(tq, tk, q, k, v, mask):
    b, t, kh, g, h = q.shape
    s = k.shape[1]
    scale = 1.0 / math.sqrt(h)

    def query_block(i):
        q0 = i * tq
        qi = jax.lax.dynamic_slice_in_dim(q, q0, tq, axis=1)

        def key_block(j, carry):
            k0 = j * tk
            visible = _mask_block(mask, q0, tq, k0, tk)[:, None, None]  # [B, 1, 1, tq, tk]

            def compute(carry):
                m, l, acc = carry
                kj = jax.lax.dynamic_slice_in_dim(k, k0, tk, axis=1)
                vj = jax.lax.dynamic_slice_in_dim(v, k0, tk, axis=1)
                scores = jnp.einsum("btkgh,bskh->bkgts", qi, kj, preferred_element_type=jnp.float32) * scale
                m_new = jnp.maximum(m, jnp.max(jnp.where(visible, scores, _NEG), axis=-1))
                p = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                l = l * corr + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(q.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, l, acc * corr[..., None] + pv

            return jax.lax.cond(jnp.any(visible), compute, lambda c: c, carry)

        init = (jnp.full((b, kh, g, tq), _NEG, jnp.float32), jnp.zeros((b, kh, g, tq), jnp.float32),
                jnp.zeros((b, kh, g, tq, h), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, s // tk, key_block, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return jnp.moveaxis(out, 3, 1).astype(q.dtype), lse  # [B, tq, K, G, H], [B, K, G, tq]

    outs, lses = jax.lax.map(query_block, jnp.arange(t // tq))
    out = jnp.moveaxis(outs, 0, 1).reshape(b, t, kh, g, h)
    lse = jnp.moveaxis(lses, 0, 3).reshape(b, kh, g, t)
    return out, (q, k, v, mask, out, lse)


def _backward(tq, tk, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    b, t, kh, g, h = q.shape
    s = k.shape[1]
    scale = 1.0 / math.sqrt(h)
    d_out = d_out.astype(q.dtype)
    # rowsum(dO ∘ O) per query: [B, K, G, T]
    delta = jnp.einsum("btkgh,btkgh->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(j, carry):
        dq, dk, dv = carry
        k0 = j * tk
        kj = jax.lax.dynamic_slice_in_dim(k, k0, tk, axis=1)
        vj = jax.lax.dynamic_slice_in_dim(v, k0, tk, axis=1)

        def query_block(i, inner):
            q0 = i * tq
            visible = _mask_block(mask, q0, tq, k0, tk)[:, None, None]

            def compute(inner):
                dq, dk_j, dv_j = inner
                qi = jax.lax.dynamic_slice_in_dim(q, q0, tq, axis=1)
                doi = jax.lax.dynamic_slice_in_dim(d_out, q0, tq, axis=1)
                lse_i = jax.lax.dynamic_slice_in_dim(lse, q0, tq, axis=3)
                delta_i = jax.lax.dynamic_slice_in_dim(delta, q0, tq, axis=3)
                scores = jnp.einsum("btkgh,bskh->bkgts", qi, kj, preferred_element_type=jnp.float32) * scale
                p = jnp.where(visible, jnp.exp(scores - lse_i[..., None]), 0.0)
                dv_j = dv_j + jnp.einsum("bkgts,btkgh->bskh", p.astype(q.dtype), doi,
                                         preferred_element_type=jnp.float32)
                dp = jnp.einsum("btkgh,bskh->bkgts", doi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
                dq_i = jnp.einsum("bkgts,bskh->btkgh", ds, kj, preferred_element_type=jnp.float32)
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, jax.lax.dynamic_slice_in_dim(dq, q0, tq, axis=1) + dq_i, q0, axis=1)
                dk_j = dk_j + jnp.einsum("bkgts,btkgh->bskh", ds, qi, preferred_element_type=jnp.float32)
                return dq, dk_j, dv_j

            return jax.lax.cond(jnp.any(visible), compute, lambda c: c, inner)

        zeros = jnp.zeros((b, tk, kh, h), jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(0, t // tq, query_block, (dq, zeros, zeros))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, k0, axis=1)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, k0, axis=1)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, s // tk, key_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_forward, _backward)
