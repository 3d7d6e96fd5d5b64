"""Evaluation table from scripted episodes, against F1/EM computed by hand."""

from __future__ import annotations

import pytest

from igpo_jax.rollout.trajectories import Episode
from igpo_jax.igpo.evaluation import episode_record, format_table, summary


def _episode(source, gold, response, searches=1):
    return Episode(question_index="0", golden_answers=tuple(gold), data_source=source, response_text=response,
                   final_turn_text=response, answer=None, finish_reason="answer", num_searches=searches,
                   policy_text=response)


def test_summary_table_matches_hand_computed_values():
    eps = [
        # nq: exact answer → F1 1, EM 1
        _episode("nq", ["Paris"], "<think>x</think><answer>Paris</answer>"),
        # nq: "the city of Paris" vs "Paris": tokens {the, city, of, paris} vs {paris}:
        # precision 1/4, recall 1 → F1 = 2·(1/4)/(1+1/4) = 0.4; EM 0
        _episode("nq", ["Paris"], "<think>x</think><answer>the city of Paris</answer>"),
        # hotpotqa: second alias matches exactly → F1 1, EM 1 (max over aliases)
        _episode("hotpotqa", ["New York City", "NYC"], "<answer>nyc</answer>", searches=3),
        # hotpotqa: no answer tag → format penalty −2 as F1, no-format F1 0, EM 0
        _episode("hotpotqa", ["Rome"], "<think>I am not sure</think>", searches=0),
    ]
    records = [episode_record(ep, "qwen_tool_call", -2.0, num_turns=2) for ep in eps]
    assert [r["f1"] for r in records] == pytest.approx([1.0, 0.4, 1.0, -2.0])
    assert [r["em"] for r in records] == [1.0, 0.0, 1.0, 0.0]
    assert [r["no_format_f1"] for r in records] == pytest.approx([1.0, 0.4, 1.0, 0.0])
    table = summary(records)
    assert table["nq"]["f1"] == pytest.approx(0.7) and table["nq"]["em"] == pytest.approx(0.5)
    assert table["hotpotqa"]["f1"] == pytest.approx(-0.5) and table["hotpotqa"]["no_format_f1"] == pytest.approx(0.5)
    assert table["hotpotqa"]["searches"] == pytest.approx(1.5)
    assert table["all"]["f1"] == pytest.approx(0.1)  # (1 + 0.4 + 1 − 2) / 4
    assert table["macro"]["f1"] == pytest.approx(0.1)  # (0.7 − 0.5) / 2
    assert table["all"]["count"] == 4 and table["nq"]["count"] == 2
    text = format_table(table)
    assert "hotpotqa" in text and "macro" in text


def test_search_tags_dialect_checks_its_own_tags():
    ok = episode_record(_episode("x", ["a"], "<search>q</search><answer>a</answer>"), "search_tags", -2.0, 2)
    bad = episode_record(_episode("x", ["a"], "<search>q<answer>a</answer>"), "search_tags", -2.0, 2)
    assert ok["f1"] == 1.0 and bad["f1"] == -2.0
