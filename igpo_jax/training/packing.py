"""Token-budget micro-batches: rows packed into fixed-shape buffers with segment ids.

Legend: N rows, L padded row length, P packed rows (bins), W the token budget of one packed row.

The reference's dynamic batch size (`ppo_max_token_len_per_gpu`): instead of micro-batches of U
padded rows × L tokens, the real (valid) tokens of the rows are packed, first-fit decreasing, into
packed rows of W tokens. A packed row holds several rows as segments (ids 1, 2, … in order; 0 is
padding), attention is causal within a segment only (`attention_mask.causal_spec` with segment
ids), and RoPE positions restart at 0 per segment. Each segment then sees exactly what its row
saw in the padded path (the positions there skip padding too), so log-probs, losses and gradients
are the same while padding costs no FLOPs, and a micro-batch's memory is set by W, not by the
longest of U rows.

Host side (numpy): `plan_packing` assigns rows to bins and gives every packed slot its source
(row, column); `pack` gathers arrays into packed rows and `unpack` scatters per-token outputs
back to [N, L]. The loss aggregation (`loss_agg_mode`) is over the whole mini-batch, not per
micro-batch, and its sequences are rows, which a packed row mixes: `loss.aggregation_weights`
turns every mode into per-token weights computed over the mini-batch before packing, so that the
loss is Σ weight · per-token loss whatever the packing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from igpo_jax.model.attention_mask import causal_spec
from igpo_jax.model.token_logprobs import logprobs_from_hidden


@dataclasses.dataclass(frozen=True)
class PackLayout:
    row_PW: np.ndarray  # int32: source row of each packed slot (0 at padding)
    col_PW: np.ndarray  # int32: source column (0 at padding)
    valid_PW: np.ndarray  # bool: slot holds a real token
    segment_PW: np.ndarray  # int32: 1, 2, … per row within a packed row; 0 at padding
    position_PW: np.ndarray  # int32: the token's position within its row (RoPE)
    slot_NL: np.ndarray  # int32: flat packed index (p · W + w) of each valid source token; -1 elsewhere
    bins_N: np.ndarray  # int32: the packed row each source row went to

    @property
    def shape(self) -> tuple[int, int]:
        return self.row_PW.shape


def plan_packing(valid_NL, budget: int, multiple: int = 1, needed_NL=None) -> PackLayout:
    """Pack the valid tokens of each row, in order, into packed rows of `budget` tokens (first-fit
    decreasing; the number of packed rows is rounded up to a multiple of `multiple`).

    A row's valid tokens must be contiguous (left/right padding only), and with `needed_NL` (the
    loss mask) every needed token but a row's first must follow a valid token: the padded path
    predicts column j from column j − 1, the packed path from the previous token of the segment."""
    valid = np.asarray(valid_NL, bool)
    n, l = valid.shape
    lengths = valid.sum(1)
    if lengths.max(initial=0) > budget:
        raise ValueError(f"a row of {int(lengths.max())} tokens does not fit a micro-batch budget of {budget} tokens "
                         f"(raise actor.max_tokens_per_micro_batch to at least the longest row)")
    first = np.where(lengths > 0, valid.argmax(1), 0)
    if np.any((np.cumsum(valid, 1) != np.clip(np.arange(l)[None] - first[:, None] + 1, 0, None)) & valid):
        raise ValueError("packing needs each row's valid tokens contiguous (padding only at the ends)")
    if needed_NL is not None:
        needed = np.asarray(needed_NL, bool)
        prev_valid = np.concatenate([np.zeros((n, 1), bool), valid[:, :-1]], 1)
        if np.any(needed & ~prev_valid & (np.arange(l)[None] > 0)):
            raise ValueError("a loss token follows a padding column: its padded-path log-prob would read padding")
    free: list[int] = []  # tokens left in each bin
    bins = np.zeros(n, np.int32)
    offset = np.zeros(n, np.int32)
    for r in sorted(range(n), key=lambda r: (-lengths[r], r)):  # first-fit decreasing, stable
        for b, room in enumerate(free):
            if room >= lengths[r]:
                break
        else:
            b = len(free)
            free.append(budget)
        bins[r], offset[r] = b, budget - free[b]
        free[b] -= lengths[r]
    num_bins = max(1, -(-max(len(free), 1) // multiple) * multiple)
    row = np.zeros((num_bins, budget), np.int32)
    col = np.zeros((num_bins, budget), np.int32)
    seg = np.zeros((num_bins, budget), np.int32)
    pos = np.zeros((num_bins, budget), np.int32)
    slot = np.full((n, l), -1, np.int32)
    seg_count = np.zeros(num_bins, np.int32)
    for r in range(n):  # segments numbered in row order within a bin
        k = int(lengths[r])
        if k == 0:
            continue
        b, o = bins[r], offset[r]
        seg_count[b] += 1
        cols = first[r] + np.arange(k)
        row[b, o:o + k], col[b, o:o + k] = r, cols
        seg[b, o:o + k], pos[b, o:o + k] = seg_count[b], np.arange(k)
        slot[r, cols] = b * budget + o + np.arange(k)
    return PackLayout(row, col, seg > 0, seg, pos, slot, bins)


def pack(x_NL, layout: PackLayout, fill=0):
    """[N, L, ...] → [P, W, ...]: each packed slot takes its source token's value (`fill` at padding)."""
    xp = jnp if isinstance(x_NL, jax.Array) else np
    out = x_NL[layout.row_PW, layout.col_PW]
    valid = layout.valid_PW.reshape(layout.valid_PW.shape + (1,) * (out.ndim - 2))
    return xp.where(valid, out, xp.asarray(fill, out.dtype))


def unpack(y_PW, layout: PackLayout, fill=0):
    """[P, W, ...] → [N, L, ...]: each valid source token takes its packed slot's value, `fill` elsewhere."""
    xp = jnp if isinstance(y_PW, jax.Array) else np
    flat = y_PW.reshape((-1,) + y_PW.shape[2:])
    idx = np.maximum(layout.slot_NL, 0)
    out = flat[idx]
    keep = (layout.slot_NL >= 0).reshape(layout.slot_NL.shape + (1,) * (out.ndim - 2))
    return xp.where(keep, out, xp.asarray(fill, out.dtype))


def token_logprobs(model, tokens_PW, segment_PW, position_PW, valid_PW, chunk: int, with_entropy: bool = False,
                   needed_PW=None):
    """(logp_PW, entropy_PW) of packed rows: slot s is predicted by slot s − 1 of the same segment
    (a segment's first token reads 0, as column 0 of a padded row does); with `needed_PW`, only
    those slots are computed (the rest read 0)."""
    valid = valid_PW.astype(bool)
    hidden, _ = model.hidden(tokens_PW, position_PW, causal_spec(valid, segment_PW))
    same = (segment_PW[:, 1:] == segment_PW[:, :-1]) & valid[:, 1:]
    needed = same if needed_PW is None else same & needed_PW[:, 1:].astype(bool)
    logp, entropy = logprobs_from_hidden(model, hidden[:, :-1], tokens_PW[:, 1:], chunk, with_entropy, needed)
    pad = ((0, 0), (1, 0))
    logp, entropy = jnp.pad(logp, pad), jnp.pad(entropy, pad)
    keep = jnp.pad(needed, pad)
    return jnp.where(keep, logp, 0.0), jnp.where(keep, entropy, 0.0)
