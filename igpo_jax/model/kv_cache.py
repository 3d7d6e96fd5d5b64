"""The KV cache: one pytree carried through jitted prefill/decode loops.

Legend: L layers, B batch rows, K kv heads, S cache slots, H head dim.

Each layer has its own key and value arrays, laid out [B, K, S, H]:
- attention reads a layer's array as it is. One [L, ...] array would be sliced, a copy of every
  layer at every decode step; and with S before K, the score and value products need a
  transposed copy as well.
- a write touches only its own layer's array. XLA's CPU backend widens a bf16 array to float32
  around an update, so writing into one whole-model array cost a pass over the entire cache for
  each layer (measured: bf16 decoding ran slower than fp32 because of it).

All rows write at the same slot cursor `length`, so every update is one in-place
`dynamic_update_slice` of a fixed-shape array. Rows differ through `valid_BS` (which slots hold
a real token: left padding, or the shorter tool results of a ragged append leave holes) and
`next_pos_B` (each row's next RoPE position), so holes cost memory but never change the math.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from igpo_jax.model.attention_mask import cache_mask, positions_from_valid


# Logical axes of each layer's key and value arrays (the planner sizes the cache from these too).
KV_AXES = ("batch", "kv_heads", "cache_length", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k_layers: tuple  # per layer, keys [B, K, S, H]
    v_layers: tuple  # per layer, values [B, K, S, H]
    valid_BS: jax.Array  # bool: slot holds a real token of that row
    next_pos_B: jax.Array  # int32: RoPE position of the row's next real token
    length: jax.Array  # int32 scalar: slots [0, length) are written

    @classmethod
    def init(cls, cfg, batch: int, size: int, dtype=None, mesh=None, rules=None) -> "KVCache":
        """Empty cache; with `mesh` (and logical-axis `rules`) each array is created sharded."""
        shape = (batch, cfg.num_kv_heads, size, cfg.head_dim)
        dtype = jnp.dtype(dtype or cfg.jnp_dtype)

        def zeros(shape, dtype, axes):
            if mesh is None:
                return jnp.zeros(shape, dtype)
            from igpo_jax.runtime import sharding

            rule_table = rules if rules is not None else sharding.DEFAULT_RULES
            return jnp.zeros(shape, dtype, device=sharding.named_sharding(mesh, rule_table, axes, shape))

        per_layer = lambda: tuple(zeros(shape, dtype, KV_AXES) for _ in range(cfg.num_layers))
        return cls(k_layers=per_layer(), v_layers=per_layer(),
                   valid_BS=zeros((batch, size), bool, ("batch", "cache_length")),
                   next_pos_B=zeros((batch,), jnp.int32, ("batch",)),
                   length=jnp.zeros((), jnp.int32))

    @property
    def size(self) -> int:
        return self.valid_BS.shape[1]

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    def write(self, layer: int, k_BTKH, v_BTKH) -> "KVCache":
        """Layer `layer`'s keys and values of T new tokens at slots [length, length + T), in place.
        (The caller advances `length` once every layer has written: see `extend`.)"""
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, self.length, zero)

        def written(layers, x_BTKH):
            x_BKTH = jnp.swapaxes(x_BTKH, 1, 2).astype(layers[layer].dtype)
            updated = jax.lax.dynamic_update_slice(layers[layer], x_BKTH, start)
            return layers[:layer] + (updated,) + layers[layer + 1:]

        return self.replace(k_layers=written(self.k_layers, k_BTKH), v_layers=written(self.v_layers, v_BTKH))

    def read(self, layer: int):
        """(keys, values) of layer `layer`, each [B, K, S, H]."""
        return self.k_layers[layer], self.v_layers[layer]

    def window(self, span: int) -> "KVCache":
        """Slots [0, span) as a cache of their own (a copy), for calls that write below `span`:
        attention then reads only those. (Slicing inside the model instead makes XLA's CPU
        backend fuse the slice with the layer's write, which then copies the whole array.)"""
        if span == self.size:
            return self
        first = lambda layers: tuple(x[:, :, :span] for x in layers)
        return self.replace(k_layers=first(self.k_layers), v_layers=first(self.v_layers),
                            valid_BS=self.valid_BS[:, :span])

    def put_window(self, window: "KVCache") -> "KVCache":
        """This cache with `window` (from `self.window`, then written to) put back in place."""
        if window.size == self.size:
            return window
        zero = jnp.zeros((), jnp.int32)
        put = lambda old, new: jax.lax.dynamic_update_slice(old, new, (zero,) * old.ndim)
        return self.replace(k_layers=tuple(map(put, self.k_layers, window.k_layers)),
                            v_layers=tuple(map(put, self.v_layers, window.v_layers)),
                            valid_BS=put(self.valid_BS, window.valid_BS),
                            next_pos_B=window.next_pos_B, length=window.length)


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
