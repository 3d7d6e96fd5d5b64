"""One global metrics record from every process's host-side metrics (multi-host training).

Each process measures only its own rows: its rollouts, their rewards, its search client and its
own clocks. How a key combines follows from what it measures:
  per-row means (rollout/*, reward/*, response_length/mean, …)  mean weighted by the rows
  ig/mean, ig/positive_frac                                     weighted by ig/count
  ig/std                                                        pooled (within + between processes)
  advantage/mean                                                weighted by the generated tokens
  ig/count, search/* counters, *_tok_s throughputs              sum (processes work side by side)
  filter_groups/* group counts                                  sum (each process fills its own share)
  filter_groups/rounds, filter_groups/cap_hit                   max (decided together; cap_hit: any share short)
  time/*, rollout/*_s                                           max (the slowest process sets the pace)
  memory/*                                                      max (the fullest process sets the limit)
  curriculum/*                                                  the same on every process: the first
With equal row counts per process, the row-weighted means equal the one-process values.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

SUM, MAX, FIRST, BY_ROWS, BY_TOKENS, BY_IG_COUNT, POOLED_STD = (
    "sum", "max", "first", "by_rows", "by_tokens", "by_ig_count", "pooled_std")


def rule_for(key: str) -> str:
    if key in ("filter_groups/rounds", "filter_groups/cap_hit"):
        return MAX
    if key.endswith("_tok_s") or key.startswith(("search/", "filter_groups/")) or key == "ig/count":
        return SUM
    if key.startswith(("time/", "memory/")) or (key.startswith("rollout/") and key.endswith("_s")):
        return MAX
    if key.startswith("curriculum/"):
        return FIRST
    if key in ("ig/mean", "ig/positive_frac"):
        return BY_IG_COUNT
    if key == "ig/std":
        return POOLED_STD
    if key == "advantage/mean":
        return BY_TOKENS
    return BY_ROWS


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = float(sum(weights))
    # the pipeline reports 0 for a mean over nothing; keep that convention
    return sum(v * w for v, w in zip(values, weights)) / total if total > 0 else 0.0


def _pooled_std(means: Sequence[float], stds: Sequence[float], counts: Sequence[float]) -> float:
    """Population std of the union of groups given each group's mean, std and size."""
    total = float(sum(counts))
    if total <= 0:
        return 0.0
    mean = _weighted_mean(means, counts)
    second_moment = sum(c * (s * s + m * m) for m, s, c in zip(means, stds, counts)) / total
    return math.sqrt(max(second_moment - mean * mean, 0.0))


def combine(per_process: Sequence[Mapping[str, float]], rows: Sequence[int],
            generated_tokens: Sequence[int]) -> dict[str, float]:
    """The run's metrics from each process's (in process order), with each process's number of
    rollouts (`rows`) and of policy-generated tokens. Keys follow the first process's order; a key
    some processes lack is combined over those that have it."""
    if not (len(per_process) == len(rows) == len(generated_tokens)) or not per_process:
        raise ValueError(f"need one metrics dict, row count and token count per process; got "
                         f"{len(per_process)}, {len(rows)}, {len(generated_tokens)}")
    keys = list(per_process[0])
    keys += [k for m in per_process[1:] for k in m if k not in keys]
    out = {}
    for key in keys:
        have = [i for i, m in enumerate(per_process) if key in m]
        values = [float(per_process[i][key]) for i in have]
        rule = rule_for(key)
        if rule == SUM:
            out[key] = sum(values)
        elif rule == MAX:
            out[key] = max(values)
        elif rule == FIRST:
            out[key] = values[0]
        elif rule == BY_TOKENS:
            out[key] = _weighted_mean(values, [generated_tokens[i] for i in have])
        elif rule == BY_IG_COUNT:
            out[key] = _weighted_mean(values, [per_process[i].get("ig/count", 0.0) for i in have])
        elif rule == POOLED_STD:
            out[key] = _pooled_std([per_process[i].get("ig/mean", 0.0) for i in have], values,
                                   [per_process[i].get("ig/count", 0.0) for i in have])
        else:
            out[key] = _weighted_mean(values, [rows[i] for i in have])
    return out
