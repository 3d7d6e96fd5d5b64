"""Positions and boolean attention masks (True = may attend) built from compact descriptors.

Legend: B batch, T query tokens, S key slots.

`MaskSpec` is the compact form itself: O(T + S) integers from which any [tq, tk] block of the
mask is computed on demand. The blockwise attention (blockwise_attention.py) builds each block it
needs from it, so no [T, S] array exists at all; the dense attention materialises it (`dense`).
Every mask the project uses is one rule over per-query and per-key vectors:

    visible(q, k) = key_valid[k] & k ≤ q_slot[q] & (key_seg[k] == q_seg[q]  |  k < q_limit[q])

plain causal with padding (one segment), packed rows (segment ids), a KV cache with holes (q_slot
= the query's cache slot), and the information-gain copies (context segment −1, copy t segment t,
a copy sees the context before its turn through q_limit).

`MaskSpec.form` (static: part of the pytree's structure, known while tracing) names the constructor
and so what the vectors are guaranteed to hold; a kernel that takes only some masks decides from it
(fused_attention.route: cuDNN takes 'right_padded_causal' alone). `mask_form` gives a bool mask's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


# MaskSpec forms, by constructor: 'causal' (one segment, padding anywhere), 'right_padded_causal'
# (one segment, each row's valid keys are its first n: the caller's guarantee), 'packed' (segment
# ids), 'cache' (KV-cache slots, holes allowed), 'copies' (the IG scoring mask), 'general' (built
# by hand, or a shard of a row under sequence parallelism). A materialised bool mask is 'bool'.
FORMS = ("general", "causal", "right_padded_causal", "packed", "cache", "copies")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    q_slot_BT: jax.Array  # int32: the query's own key slot (causality: k ≤ q_slot)
    q_seg_BT: jax.Array  # int32
    q_limit_BT: jax.Array  # int32: keys k < q_limit are visible whatever their segment
    key_seg_BS: jax.Array  # int32
    key_valid_BS: jax.Array  # bool
    form: str = dataclasses.field(default="general", metadata=dict(static=True))  # one of FORMS

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"MaskSpec form {self.form!r} is not one of {FORMS}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.q_slot_BT.shape, self.key_valid_BS.shape[1])

    def block(self, q0, num_q: int, k0, num_k: int) -> jax.Array:
        """mask [B, num_q, num_k] of queries [q0, q0 + num_q) × keys [k0, k0 + num_k) (starts may
        be traced)."""
        sl = lambda x, start, n: jax.lax.dynamic_slice_in_dim(x, start, n, axis=1)
        q_slot, q_seg, q_limit = (sl(x, q0, num_q)[:, :, None] for x in (self.q_slot_BT, self.q_seg_BT, self.q_limit_BT))
        k_seg, k_valid = (sl(x, k0, num_k)[:, None, :] for x in (self.key_seg_BS, self.key_valid_BS))
        k = (k0 + jnp.arange(num_k, dtype=jnp.int32))[None, None, :]
        return k_valid & (k <= q_slot) & ((k_seg == q_seg) | (k < q_limit))

    def dense(self) -> jax.Array:
        """The whole mask_BTS."""
        b, t, s = self.shape
        return self.block(0, t, 0, s)


def mask_form(mask) -> str:
    """A MaskSpec's `form`; 'bool' for a materialised bool mask."""
    return mask.form if isinstance(mask, MaskSpec) else "bool"


def causal_spec(valid_BT, segment_ids_BT=None, right_padded: bool = False) -> MaskSpec:
    """`causal_mask` as a MaskSpec; with `segment_ids_BT`, packed rows: a key is visible only from
    its own segment. `right_padded=True` is the caller's word that each row's valid tokens are its
    first n (no left padding, no holes), so that a kernel reading only n may take it (form
    'right_padded_causal'; fused_attention.py makes a row that breaks it read NaN)."""
    b, t = valid_BT.shape
    if right_padded and segment_ids_BT is not None:
        raise ValueError("right_padded describes one segment per row; packed rows have segment ids")
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    slot = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    form = "packed" if segment_ids_BT is not None else "right_padded_causal" if right_padded else "causal"
    return MaskSpec(slot, seg, jnp.zeros((b, t), jnp.int32), seg, valid_BT.astype(bool), form)


def cache_spec(slot_valid_BS, first_query_slot, num_queries: int) -> MaskSpec:
    """`cache_mask` as a MaskSpec."""
    b, s = slot_valid_BS.shape
    slot = jnp.broadcast_to(first_query_slot + jnp.arange(num_queries, dtype=jnp.int32), (b, num_queries))
    zeros_T, zeros_S = jnp.zeros((b, num_queries), jnp.int32), jnp.zeros((b, s), jnp.int32)
    return MaskSpec(slot.astype(jnp.int32), zeros_T, zeros_T, zeros_S, slot_valid_BS.astype(bool), "cache")


def copies_spec(ctx_valid_BC, turn_start_BT, turn_valid_BT, copy_valid_BP) -> MaskSpec:
    """The information-gain scoring mask over [context ‖ T copies of P tokens] (scoring.block_inputs'
    mask_BSS): context causal; copy t sees the real context before turn_start[t] (nothing for a
    padded turn) and its own earlier tokens."""
    b, c = ctx_valid_BC.shape
    t, p = turn_start_BT.shape[1], copy_valid_BP.shape[1]
    s = c + t * p
    seg_S = jnp.concatenate([jnp.full((c,), -1, jnp.int32), jnp.repeat(jnp.arange(t, dtype=jnp.int32), p)])
    limit_BS = jnp.concatenate([jnp.zeros((b, c), jnp.int32),
                                jnp.repeat(jnp.where(turn_valid_BT.astype(bool), turn_start_BT, 0).astype(jnp.int32),
                                           p, axis=1)], 1)
    key_valid_BS = jnp.concatenate([ctx_valid_BC.astype(bool), jnp.tile(copy_valid_BP.astype(bool), (1, t))], 1)
    seg_BS = jnp.broadcast_to(seg_S, (b, s))
    slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return MaskSpec(slot, seg_BS, limit_BS, seg_BS, key_valid_BS, "copies")


def positions_from_valid(valid_BT, start_B=None) -> jnp.ndarray:
    """RoPE positions that skip padding: the k-th real token of a row gets start + k."""
    pos = jnp.maximum(jnp.cumsum(valid_BT.astype(jnp.int32), axis=1) - 1, 0)
    return pos if start_B is None else pos + start_B[:, None]


def causal_mask(valid_BT) -> jnp.ndarray:
    """mask_BTT for a plain forward: key s visible from query t iff s ≤ t and s is a real token."""
    t = valid_BT.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    return causal[None] & valid_BT[:, None, :].astype(bool)


def cache_mask(slot_valid_BS, first_query_slot, num_queries: int) -> jnp.ndarray:
    """mask_BTS for T queries written at slots [first, first + T) of a cache of S slots."""
    s = slot_valid_BS.shape[1]
    query_slot_T = first_query_slot + jnp.arange(num_queries)
    causal_TS = jnp.arange(s)[None, :] <= query_slot_T[:, None]
    return causal_TS[None] & slot_valid_BS[:, None, :]
