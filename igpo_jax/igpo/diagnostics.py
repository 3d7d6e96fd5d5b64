"""Per-step diagnostics that explain a learning curve. Pure numpy, no config objects, no I/O.

Legend: N rollouts, T turn slots (max turns), L tokens.

- collapse: the fraction of groups whose advantages are all zero, so that they give no gradient
  (GRPO whenever every rollout of a question scores the same; IGPO only if the gains tie too);
- behaviour: the fraction of episodes that searched, answered (an <answer> tag in the final turn)
  and were well formatted (no format penalty);
- P(gold): the policy's probability of the gold answer before its first search and in the
  context of its final turn (after every tool result it read), from the one-pass scores;
- IG by retrieval: the mean information gain of search turns whose results held the answer's
  document against those whose results did not (the synthetic world knows which one it is).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from igpo_jax.rollout.trajectories import Episode


def collapse_fraction(advantage_NL: np.ndarray, loss_mask_NL: np.ndarray, group_id_N: np.ndarray,
                      atol: float = 1e-6) -> float:
    """Fraction of groups in which no generated token has |advantage| > atol."""
    live_N = np.any((np.abs(advantage_NL) > atol) & loss_mask_NL.astype(bool), axis=1)
    groups = np.unique(group_id_N)
    if not groups.size:
        return 0.0
    return float(np.mean([not live_N[group_id_N == g].any() for g in groups]))


def outcome_collapse(outcome_N: np.ndarray, answer_doc_found_N: np.ndarray, group_id_N: np.ndarray) -> dict[str, float]:
    """Groups whose outcome rewards are all equal (GRPO's zero-advantage groups, whatever the arm),
    and among those the ones whose rollouts differ in whether a search found the answer's
    document: the groups where information gain can credit a turn the outcome cannot (a group
    that all found it, or none did, differs at most by noise-level gains)."""
    collapsed = split = 0
    groups = np.unique(group_id_N)
    for g in groups:
        rows = group_id_N == g
        if np.ptp(outcome_N[rows]) == 0:
            collapsed += 1
            split += int(np.ptp(answer_doc_found_N[rows].astype(int)) > 0)
    return {"diag/outcome_collapse_frac": collapsed / groups.size if groups.size else 0.0,
            "diag/collapsed_retrieval_split_frac": split / collapsed if collapsed else float("nan")}


def turn_retrieval(episodes: Sequence[Episode], max_turns: int) -> tuple[np.ndarray, np.ndarray]:
    """(searched_NT, answer_doc_NT): turn slot k searched; its results held the answer's document
    (the episode's last supporting doc id). No supporting ids (real data): never the answer's."""
    searched = np.zeros((len(episodes), max_turns), bool)
    answer_doc = np.zeros((len(episodes), max_turns), bool)
    for i, ep in enumerate(episodes):
        target = ep.supporting_doc_ids[-1] if ep.supporting_doc_ids else None
        for k, ids in enumerate(ep.retrieved_ids_per_turn[:max_turns]):
            if ids is not None:
                searched[i, k] = True
                answer_doc[i, k] = target is not None and target in ids
    return searched, answer_doc


def behaviour(searched_NT: np.ndarray, answered_N: np.ndarray, format_ok_N: np.ndarray,
              answer_doc_NT: np.ndarray) -> dict[str, float]:
    """Fractions of episodes that searched, found the answer's document, answered, were well formed."""
    return {"diag/searched_frac": float(np.mean(searched_NT.any(axis=1))),
            "diag/answer_doc_found_frac": float(np.mean(answer_doc_NT.any(axis=1))),
            "diag/answered_frac": float(np.mean(answered_N)),
            "diag/format_ok_frac": float(np.mean(format_ok_N))}


def p_gold(mean_logp_NT: np.ndarray, valid_NT: np.ndarray, num_turns_N: np.ndarray,
           searched_NT: np.ndarray) -> dict[str, float]:
    """Mean P(gold) = exp(mean log-prob) before the first search turn (rollouts that searched) and
    in the context of the final turn (slot T_i − 1: after every tool result). Contexts not scored
    or not finite are left out; a mean over nothing is NaN (the metric is absent that step)."""
    ok_NT = valid_NT.astype(bool) & np.isfinite(mean_logp_NT)
    rows = np.arange(mean_logp_NT.shape[0])
    first = np.argmax(searched_NT, axis=1)
    first_ok = searched_NT.any(axis=1) & ok_NT[rows, first]
    last = np.clip(np.asarray(num_turns_N) - 1, 0, mean_logp_NT.shape[1] - 1)
    last_ok = ok_NT[rows, last]
    p_NT = np.exp(np.where(ok_NT, mean_logp_NT, -np.inf))
    mean = lambda values: float(values.mean()) if values.size else float("nan")
    return {"diag/p_gold_before_search": mean(p_NT[rows, first][first_ok]),
            "diag/p_gold_final_context": mean(p_NT[rows, last][last_ok])}


def ig_by_retrieval(ig_NT: np.ndarray, ig_mask_NT: np.ndarray, searched_NT: np.ndarray,
                    answer_doc_NT: np.ndarray) -> dict[str, float]:
    """Mean IG (and counts) of search turns that retrieved the answer's document and of the others."""
    out = {}
    for name, which_NT in (("answer_doc", searched_NT & answer_doc_NT), ("other_doc", searched_NT & ~answer_doc_NT)):
        values = ig_NT[ig_mask_NT.astype(bool) & which_NT]
        out[f"diag/ig_{name}"] = float(values.mean()) if values.size else float("nan")
        out[f"diag/ig_{name}_count"] = float(values.size)
    return out


def drop_nan(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics without NaN values (a statistic over no turns is absent, not 0)."""
    return {k: v for k, v in metrics.items() if not np.isnan(v)}
