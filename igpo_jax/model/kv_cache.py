"""The KV cache: one pytree carried through jitted prefill/decode loops.

Legend: L layers, B batch rows, S cache slots, K kv heads, H head dim.

All rows write at the same slot cursor `length`, so every update is one in-place
`dynamic_update_slice` of a fixed-shape array. Rows differ through `valid_BS` (which slots hold a
real token: left padding, or the shorter tool results of a ragged append leave holes) and
`next_pos_B` (each row's next RoPE position), so holes cost memory but never change the math.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from igpo_jax.model.attention_mask import cache_mask, positions_from_valid


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    valid_BS: jax.Array  # bool: slot holds a real token of that row
    next_pos_B: jax.Array  # int32: RoPE position of the row's next real token
    length: jax.Array  # int32 scalar: slots [0, length) are written

    @classmethod
    def init(cls, cfg, batch: int, size: int, dtype=None, mesh=None, rules=None) -> "KVCache":
        """Empty cache; with `mesh` (and logical-axis `rules`) each array is created sharded."""
        shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.jnp_dtype
        kv_axes = ("layers", "batch", "cache_length", "kv_heads", "head_dim")

        def zeros(shape, dtype, axes):
            if mesh is None:
                return jnp.zeros(shape, dtype)
            from igpo_jax import sharding

            rule_table = rules if rules is not None else sharding.DEFAULT_RULES
            return jnp.zeros(shape, dtype, device=sharding.named_sharding(mesh, rule_table, axes, shape))

        return cls(k_LBSKH=zeros(shape, dtype, kv_axes), v_LBSKH=zeros(shape, dtype, kv_axes),
                   valid_BS=zeros((batch, size), bool, ("batch", "cache_length")),
                   next_pos_B=zeros((batch,), jnp.int32, ("batch",)),
                   length=jnp.zeros((), jnp.int32))

    @property
    def size(self) -> int:
        return self.valid_BS.shape[1]

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)


def extend(model, cache: KVCache, tokens_BT, valid_BT):
    """Feed T new tokens per row (padding where `valid_BT` is False) through `model`, writing
    them at slots [length, length + T). Returns (final hidden [B, T, D], updated cache).

    The caller guarantees length + T ≤ cache.size (inside jit an overflowing write would be
    clamped by XLA, silently); the sampler checks this on the host.
    """
    valid_BT = valid_BT.astype(bool)
    t = tokens_BT.shape[1]
    positions_BT = positions_from_valid(valid_BT, cache.next_pos_B)
    zero = jnp.zeros((), jnp.int32)
    slot_valid_BS = jax.lax.dynamic_update_slice(cache.valid_BS, valid_BT, (zero, cache.length))
    mask_BTS = cache_mask(slot_valid_BS, cache.length, t)
    hidden_BTD, cache = model.hidden(tokens_BT, positions_BT, mask_BTS, cache)
    return hidden_BTD, cache.replace(
        valid_BS=slot_valid_BS,
        next_pos_B=cache.next_pos_B + valid_BT.sum(axis=1, dtype=jnp.int32),
        length=cache.length + t,
    )
