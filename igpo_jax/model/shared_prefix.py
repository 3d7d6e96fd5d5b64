"""The decoder over groups of rows that share a prompt: each group's prompt is computed once and
its keys/values are shared by the group's G responses (verl's "prefix grouper").

Legend: N rows = Q groups × G, L tokens per row, P prefix tokens per group, R suffix tokens per
row, D hidden, K kv heads, H head dim.

The G rollouts of a question start with the same tokens (system prompt, question, the first
assistant header and forced prefix): in the update that prefix is most of a row, and running it
through the forward, the backward and the π_ref forward G times is work done G − 1 times too
often. Here, per layer, the Q prefixes [Q, P] run through the block once; their keys and values
are repeated to the G rows of their group and the rows' own tokens [N, R] (from the split on)
attend to them and causally to each other, through the block's KV-cache path (the prefix K/V
sit in the cache's first P slots). Automatic differentiation through the repeat sums the G
rows' gradients into the one prefix, so the gradient equals the unshared one.

Exactness: every position sees the keys it sees in a plain forward over its row, with the same
RoPE positions (gathered from the row's own `positions_from_valid`), so logits agree up to float
summation order. The split of a group is where its rows first differ in token or validity or
carry a loss token (`group_prefix_lengths`, on the host), so no loss token is in a prefix; the
first response token is predicted by the prefix's last hidden state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from igpo_jax.model.attention_mask import causal_mask, positions_from_valid
from igpo_jax.model.kv_cache import KVCache
from igpo_jax.model.qwen import rms_norm, scan_layers
from igpo_jax.model.token_logprobs import logprobs_from_hidden


@dataclasses.dataclass(frozen=True)
class PrefixLayout:
    """Static shapes of a shared-prefix forward (a jit static argument)."""

    group_size: int  # G: rows per group, consecutive in the batch
    prefix_len: int  # P ≥ every group's split
    suffix_len: int  # R ≥ every row's tokens from its split to its last real token


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def group_prefix_lengths(tokens_NL, valid_NL, loss_mask_NL, group_size: int) -> np.ndarray | None:
    """split_N (int32): for each row, its group's shared prefix length — the leading columns where
    all G rows have the same token and validity and none has a loss token. None when the rows do
    not form groups of `group_size` or some group shares no first token (nothing to share)."""
    tokens_NL, valid_NL = np.asarray(tokens_NL), np.asarray(valid_NL).astype(bool)
    loss_NL = np.asarray(loss_mask_NL) > 0
    n, length = tokens_NL.shape
    if group_size < 2 or n % group_size:
        return None
    shape = (n // group_size, group_size, length)
    t, v, m = tokens_NL.reshape(shape), valid_NL.reshape(shape), loss_NL.reshape(shape)
    same_QL = np.all(t == t[:, :1], axis=1) & np.all(v == v[:, :1], axis=1) & ~np.any(m, axis=1)
    split_Q = np.where(same_QL.all(axis=1), length, np.argmin(same_QL, axis=1))
    if split_Q.min() < 1:
        return None
    return np.repeat(split_Q, group_size).astype(np.int32)


def layout_for(split_N, valid_NL, group_size: int, multiple: int = 32) -> PrefixLayout:
    """The smallest layout (P, R rounded up to `multiple`, so that steps reuse compiled programs)."""
    split_N, valid_NL = np.asarray(split_N), np.asarray(valid_NL).astype(bool)
    end_N = np.where(valid_NL.any(1), valid_NL.shape[1] - np.argmax(valid_NL[:, ::-1], axis=1), 0)
    return PrefixLayout(group_size, _round_up(int(split_N.max()), multiple),
                        _round_up(int(np.maximum(end_N - split_N, 1).max()), multiple))


def _gather_columns(x_NL, start_N, width: int):
    """x[n, start_n : start_n + width] per row (zeros past the end)."""
    x = jnp.pad(x_NL, ((0, 0), (0, width)))
    return jnp.take_along_axis(x, start_N[:, None] + jnp.arange(width)[None, :], axis=1)


def _layer(block, x_QPD, x_NRD, pos_QP, pos_NR, mask_QPP, mask_NRS, group_size: int):
    """One decoder block over the prefixes, then over the rows (attending to their prefix's K/V)."""
    cfg = block.cfg
    q, p = x_QPD.shape[:2]
    n, r = x_NRD.shape[:2]
    kv = lambda b, s: jnp.zeros((b, cfg.num_kv_heads, s, cfg.head_dim), cfg.jnp_dtype)
    unused = dict(valid_BS=jnp.zeros((0, 0), bool), next_pos_B=jnp.zeros((0,), jnp.int32))
    prefix_cache = KVCache((kv(q, p),), (kv(q, p),), length=jnp.zeros((), jnp.int32), **unused)
    x_QPD, prefix_cache = block(x_QPD, pos_QP, mask_QPP, prefix_cache, 0)
    k_QKPH, v_QKPH = prefix_cache.read(0)
    rows = lambda x: jnp.concatenate([jnp.repeat(x, group_size, axis=0), kv(n, r)], axis=2)  # [N, K, P + R, H]
    row_cache = KVCache((rows(k_QKPH),), (rows(v_QKPH),), length=jnp.asarray(p, jnp.int32), **unused)
    x_NRD, _ = block(x_NRD, pos_NR, mask_NRS, row_cache, 0)
    return x_QPD, x_NRD


def _pure_layer(graphdef, group_size: int, state, *args):
    return _layer(nnx.merge(graphdef, state), *args, group_size)


def _remat_layer(block, *args, group_size: int):
    """`_layer` whose activations are recomputed in the backward pass (as `Decoder`'s remat; one
    function with static graphdef and group size, so that the layers share one trace, as there)."""
    graphdef, state = nnx.split(block)
    return jax.checkpoint(_pure_layer, static_argnums=(0, 1))(graphdef, group_size, state, *args)


def hidden_states(model, tokens_NL, valid_NL, split_N, layout: PrefixLayout):
    """Final-norm hidden states of the prefixes [Q, P, D] and of the rows' suffixes [N, R, D]."""
    g, p, r = layout.group_size, layout.prefix_len, layout.suffix_len
    valid_NL = valid_NL.astype(bool)
    pos_NL = positions_from_valid(valid_NL)
    first = lambda x: jnp.pad(x[::g], ((0, 0), (0, max(0, p - x.shape[1]))))[:, :p]  # each group's first row
    split_Q = split_N[::g]
    in_prefix_QP = jnp.arange(p)[None, :] < split_Q[:, None]
    tok_QP, valid_QP, pos_QP = first(tokens_NL), first(valid_NL) & in_prefix_QP, first(pos_NL)
    tok_NR, valid_NR, pos_NR = (_gather_columns(x, split_N, r) for x in (tokens_NL, valid_NL, pos_NL))
    mask_QPP = causal_mask(valid_QP)
    mask_NRS = jnp.concatenate([jnp.broadcast_to(jnp.repeat(valid_QP, g, axis=0)[:, None, :], (tok_NR.shape[0], r, p)),
                                causal_mask(valid_NR)], axis=2)
    return prefixes_then_rows(model, tok_QP, pos_QP, mask_QPP, tok_NR, pos_NR, mask_NRS, g)


def prefixes_then_rows(model, tok_QP, pos_QP, mask_QPP, tok_NR, pos_NR, mask_NRS, g: int):
    """Final-norm hidden states of Q prefixes [Q, P, D] (causal `mask_QPP`) and of their groups' N =
    Q × g rows' own tokens [N, R, D], which attend to their prefix's keys and values and to their
    own through `mask_NRS` (S = P + R: the prefix's slots first, any mask over them). The decoder
    of `hidden_states`, and of the IG scoring pass over a prompt its micro-batch shares."""
    cfg = model.cfg
    embed = model.embed[...].astype(cfg.jnp_dtype)
    x_QPD, x_NRD = embed[tok_QP], embed[tok_NR]
    if cfg.scan_layers:
        step = lambda graphdef, state, xs, *invariants: _pure_layer(graphdef, g, state, *xs, *invariants)
        x_QPD, x_NRD = scan_layers(model.layers, step, (x_QPD, x_NRD), (pos_QP, pos_NR, mask_QPP, mask_NRS), cfg.remat)
    else:
        for block in model.layers:
            if cfg.remat:
                x_QPD, x_NRD = _remat_layer(block, x_QPD, x_NRD, pos_QP, pos_NR, mask_QPP, mask_NRS, group_size=g)
            else:
                x_QPD, x_NRD = _layer(block, x_QPD, x_NRD, pos_QP, pos_NR, mask_QPP, mask_NRS, g)
    norm = lambda x: rms_norm(x, model.final_norm[...], cfg.rms_norm_eps)
    return norm(x_QPD), norm(x_NRD)


def token_logprobs(model, tokens_NL, valid_NL, split_N, layout: PrefixLayout, chunk: int,
                   with_entropy: bool = False, needed_NL=None):
    """(logp_NL, entropy_NL) as `update.token_logprobs` computes them (column j: log π(token j |
    tokens < j); column 0 and every column before the row's split read 0), through the shared
    prefix. `needed_NL`: only those columns are computed (the rest read 0)."""
    g, r = layout.group_size, layout.suffix_len
    n, length = tokens_NL.shape
    hidden_QPD, hidden_NRD = hidden_states(model, tokens_NL, valid_NL, split_N, layout)
    # suffix token k is predicted by the hidden state before it: the prefix's last for k = 0
    last_QD = jnp.take_along_axis(hidden_QPD, (split_N[::g] - 1)[:, None, None], axis=1)[:, 0]
    pred_NRD = jnp.concatenate([jnp.repeat(last_QD, g, axis=0)[:, None], hidden_NRD[:, :-1]], axis=1)
    targets_NR = _gather_columns(tokens_NL, split_N, r)
    needed_NR = None if needed_NL is None else _gather_columns(needed_NL.astype(bool), split_N, r)
    logp_NR, entropy_NR = logprobs_from_hidden(model, pred_NRD, targets_NR, chunk, with_entropy, needed_NR)
    # back to the rows' columns: column j is suffix token j − split
    k_NL = jnp.arange(length)[None, :] - split_N[:, None]
    inside_NL = (k_NL >= 0) & (k_NL < r)
    back = lambda x_NR: jnp.where(inside_NL, jnp.take_along_axis(x_NR, jnp.clip(k_NL, 0, r - 1), axis=1), 0.0)
    return back(logp_NR), back(entropy_NR)
