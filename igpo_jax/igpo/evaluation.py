"""Evaluation metrics of finished episodes: per-question records and a per-`data_source` table.

F1, EM and no-format F1 are the reference's definitions (igpo.rewards.score_outcome); the table
averages them per data source and over all questions ("all": the mean of the question-level
values, and "macro": the mean of the per-source means, as the paper's "average" column).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from igpo_jax.rollout.trajectories import Episode
from igpo_jax.igpo.pipeline import ANSWER_SPLIT, FORMAT_TAGS
from igpo_jax.igpo.rewards import score_outcome

METRICS = ("f1", "em", "no_format_f1", "turns", "searches")


def episode_record(ep: Episode, dialect: str, format_penalty: float, num_turns: int) -> dict:
    score = score_outcome(ep.policy_text, ANSWER_SPLIT.join(ep.golden_answers), format_penalty=format_penalty,
                          tags=FORMAT_TAGS[dialect])
    return {
        "index": ep.question_index, "data_source": ep.data_source, "golden_answers": list(ep.golden_answers),
        "answer": ep.answer, "f1": score.reward, "em": score.em, "no_format_f1": score.no_format_f1,
        "format_ok": score.format_ok, "turns": num_turns, "searches": ep.num_searches,
        "search_failures": ep.search_failures, "finish_reason": ep.finish_reason, "response": ep.response_text,
    }


def summary(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """{data_source: {metric: mean, 'count': n}, 'all': …, 'macro': …}."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_source[r["data_source"]].append(r)

    def means(rows):
        out = {m: sum(float(r[m]) for r in rows) / len(rows) for m in METRICS}
        out["count"] = float(len(rows))
        return out

    table = {source: means(rows) for source, rows in sorted(by_source.items())}
    if records:
        table["all"] = means(records)
        per_source = [v for k, v in table.items() if k != "all"]
        table["macro"] = {m: sum(v[m] for v in per_source) / len(per_source) for m in METRICS}
        table["macro"]["count"] = float(len(records))
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    header = f"{'data_source':<20}" + "".join(f"{m:>14}" for m in METRICS) + f"{'count':>8}"
    lines = [header, "-" * len(header)]
    for source, row in table.items():
        lines.append(f"{source:<20}" + "".join(f"{row[m]:>14.4f}" for m in METRICS) + f"{int(row['count']):>8}")
    return "\n".join(lines)
