"""Which rows of the update batch a pass computes, and how many rows each stands for: identical
rows once, rows without a gradient not at all (host-side, numpy only).

Legend: N rows of the update batch, M rows of one pass (a mini-batch, or all N for π_ref),
G rows per group (consecutive, with a shared-prefix layout), G_u ≤ G rows per group computed.

Why: a group's rollouts often repeat each other word for word (the demo's steps 4, 8 and 12 held
6, 9 and 5 distinct responses of 16). Identical rows — the same tokens, loss mask, advantages,
π_old and π_ref — give identical per-token terms, so one of them computed with weight k (its
multiplicity) gives the same loss and gradient as k copies. And with the KL and entropy terms off,
a row whose advantage is 0 on every token contributes exactly nothing (−0 · ρ has no gradient):
it is not computed, but it still counts in the loss's normaliser (`Selection.num_tokens`,
`num_seqs`), so the loss is the full mini-batch's.

Shapes do not change: a pass computes M rows (with a layout, M / G groups of G_u rows, G_u a power
of two: one program per G_u). The rows to compute fill whole micro-batches under the update's
strided split (micro-batch j takes rows j, j + num_micro, …; `update.micro_batches`) and the
micro-batches left hold only weight-0 padding, where the jitted loops stop (update.py: a loop
whose trip count is the last micro-batch with a row to compute).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RowFacts:
    """What the host knows of the update batch's N rows (global row indices)."""

    first_N: np.ndarray  # int: the first row identical to this one (itself when it is the first)
    active_N: np.ndarray  # bool: the row can carry a gradient (False: it is not computed)
    # int: loss tokens per row, for the normaliser of a pass whose skipped rows are not computed;
    # None: the pass's normaliser is counted from the rows it computes (nothing is skipped)
    loss_tokens_N: np.ndarray | None = None

    @staticmethod
    def every_row(n: int) -> RowFacts:
        """No savings: every row computed on its own."""
        return RowFacts(np.arange(n), np.ones(n, bool))


def rows_with_gradient(advantage_NL, loss_mask_NL, kl_or_entropy: bool) -> np.ndarray:
    """active_N: with a KL or entropy term every row with a loss token carries a gradient; without,
    only rows with a non-zero advantage on a loss token do."""
    mask = np.asarray(loss_mask_NL) > 0
    if kl_or_entropy:
        return mask.any(1)
    return (mask & (np.asarray(advantage_NL) != 0)).any(1)


@dataclasses.dataclass(frozen=True)
class Selection:
    """One pass's rows to compute, in the order the pass takes them (M of them)."""

    rows_U: np.ndarray  # int32: batch rows, computed ones placed first under the strided split
    weight_U: np.ndarray  # float32: rows of the pass each stands for; 0: padding (not computed)
    slot_M: np.ndarray  # int32: for each row of the pass, its computed copy's index in rows_U; −1: none
    group_size: int  # G_u, the rows per group with a layout; 0 without
    computed: int  # distinct rows computed
    num_tokens: float | None  # loss tokens of the whole pass, skipped rows included (None: count them)
    num_seqs: float | None  # rows of the pass with a loss token, skipped rows included


def power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _strided_positions(count: int, num_micro: int, per_micro: int) -> np.ndarray:
    """Where the k-th of `count` units goes so that units fill micro-batch 0 first, then 1, …,
    under the strided split (micro-batch j holds units j, j + num_micro, …)."""
    k = np.arange(count)
    return (k % per_micro) * num_micro + k // per_micro


def _classes(facts: RowFacts, rows) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """The active rows of `rows` grouped by identity: ([(representative, multiplicity)], row → its
    class's index)."""
    classes, class_of, index = [], {}, {}
    for r in map(int, rows):
        if not facts.active_N[r]:
            continue
        key = int(facts.first_N[r])
        if key not in index:
            index[key] = len(classes)
            classes.append([r, 0])
        classes[index[key]][1] += 1
        class_of[r] = index[key]
    return [tuple(c) for c in classes], class_of


def select(facts: RowFacts, rows_M, num_micro: int, group_size: int = 0) -> Selection:
    """The rows a pass over `rows_M` (global indices, in its order) computes, split into `num_micro`
    micro-batches (of whole groups of `group_size` consecutive rows, when > 0). Identical rows are
    merged within a group (with a layout) or within the pass."""
    rows_M = np.asarray(rows_M, np.int64)
    m = rows_M.size
    if m % num_micro or (group_size and (m % group_size or (m // group_size) % num_micro)):
        raise ValueError(f"{m} rows do not split into {num_micro} micro-batches (of whole groups of {group_size})")
    scopes = rows_M.reshape(-1, group_size) if group_size else rows_M[None, :]
    merged = [_classes(facts, scope) for scope in scopes]
    if group_size:  # a unit is a group of G_u rows: its classes, then padding
        g_u = min(group_size, power_of_two_at_least(max(len(c) for c, _ in merged)))
        units = [(q, classes) for q, (classes, _) in enumerate(merged) if classes]
        unit_count = m // group_size
    else:  # a unit is one class
        g_u, unit_count = 1, m
        units = [(0, [c]) for c in merged[0][0]]
    positions = _strided_positions(len(units), num_micro, unit_count // num_micro)
    rows = np.full((unit_count, g_u), rows_M[0], np.int64)  # padding: not computed
    weight = np.zeros((unit_count, g_u), np.float32)
    slot = {}  # (scope, class index) → slot in rows_U
    next_class = [0] * len(scopes)
    for (scope, classes), pos in zip(units, positions):
        rows[pos] = classes[0][0]  # padding within a group stays in it (its shared prefix)
        for j, (rep, count) in enumerate(classes):
            rows[pos, j], weight[pos, j] = rep, count
            slot[(scope, next_class[scope])] = int(pos) * g_u + j
            next_class[scope] += 1
    slot_M = np.full(m, -1, np.int32)
    for i, r in enumerate(rows_M):
        scope = i // group_size if group_size else 0
        if int(r) in merged[scope][1]:
            slot_M[i] = slot[(scope, merged[scope][1][int(r)])]
    totals = (None, None)
    if facts.loss_tokens_N is not None:
        tokens = np.asarray(facts.loss_tokens_N)[rows_M]
        totals = (float(tokens.sum()), float((tokens > 0).sum()))
    return Selection(rows.reshape(-1).astype(np.int32), weight.reshape(-1), slot_M, g_u if group_size else 0,
                     int((weight > 0).sum()), *totals)
