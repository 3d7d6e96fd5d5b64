"""Positions and boolean attention masks (True = may attend) built from compact descriptors.

Legend: B batch, T query tokens, S key slots.
"""

from __future__ import annotations

import jax.numpy as jnp


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
