"""`evaluate` on a fixture parquet with a scripted policy: the hand-computed F1/EM table."""

from __future__ import annotations

import json

import pytest

from igpo_jax import evaluate as evaluate_lib
from igpo_jax.data import examples as examples_lib
from igpo_jax.components import load_policy
from tests.episodes_test import ScriptedSampler
from tests.samples_test import FIELDS
from tests.train_test import load_config, tiny_model_dir  # noqa: F401  (fixture)

QUESTIONS = [  # (data_source, question, gold, scripted turns after the forced '<search>')
    ("nq", "Where was Valeta Orunde born?", "Kesmarin",
     ["Valeta Orunde</search>", "<answer>Kesmarin</answer>"]),                 # F1 1, EM 1
    ("nq", "Who founded Dunzo?", "Kel Varro<|answer_split|>Varro",
     ["Dunzo founder</search>", "<answer>the founder Kel Varro</answer>"]),    # best alias "Kel Varro":
    # {the, founder, kel, varro} vs {kel, varro}: P 2/4, R 1 → F1 2/3; EM 0
    ("popqa", "What river flows through Nuklel?", "Sabre", ["Nuklel river"]),  # '</search>' never
    # closed → the turn is a format error fed back; the episode then ends at max_turns without an
    # answer → F1 = penalty −2, no-format F1 0, EM 0
]


def test_evaluate_writes_the_hand_computed_table(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    examples = [examples_lib.Example(index=str(i), data_source=src, question=q, golden_answers=tuple(g.split("<|answer_split|>")),
                                     prompt=(examples_lib.Message("user", q),), split="test")
                for i, (src, q, g, _) in enumerate(QUESTIONS)]
    fixture = tmp_path / "test.parquet"
    examples_lib.write_examples(fixture, examples)

    c = load_config("demo")
    c.data.synthetic_world = False
    c.data.train_files = c.data.test_files = str(fixture)
    c.data.val_batch_size = 3
    c.search.mock_mode = True
    c.model.path = tiny_model_dir
    c.rollout.max_turns = 2
    # the scripts are written for these (not for whatever the demo's prompt and prefixes are now)
    c.rollout.system_prompt = None
    c.rollout.first_turn_prefix, c.rollout.forced_prefix = "<search>", ""
    c.rollout.context_length = c.rollout.min_span = 1024
    policy, tokenizer = load_policy(c)
    scripts = [turns for *_, turns in QUESTIONS]
    monkeypatch.setattr(evaluate_lib, "make_sampler",
                        lambda model, tok, rcfg, batch: ScriptedSampler(model, tok, scripts))
    table = evaluate_lib.evaluate(c, policy, tokenizer, examples_lib.load_examples(fixture), str(tmp_path / "eval"))

    assert table["nq"]["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert table["nq"]["em"] == pytest.approx(0.5)
    assert table["popqa"]["f1"] == pytest.approx(-2.0) and table["popqa"]["no_format_f1"] == 0.0
    assert table["all"]["f1"] == pytest.approx((1 + 2 / 3 - 2) / 3)
    assert table["macro"]["f1"] == pytest.approx(((1 + 2 / 3) / 2 - 2) / 2)
    lines = [json.loads(line) for line in (tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in lines] == ["Kesmarin", "the founder Kel Varro", None]
    # the training samples' record format: turns with their queries, P(gold) per turn, IG, no advantages
    assert all(set(r) == FIELDS for r in lines)
    first = lines[0]
    assert first["question"] == "Where was Valeta Orunde born?" and first["turns"] == 2
    assert [t["queries"] for t in first["turn_records"]] == [["Valeta Orunde"], []]
    assert "Valeta Orunde" in first["turn_records"][0]["tool_result"]
    assert len(first["p_gold"]) == 2 and all(0 < p <= 1 for p in first["p_gold"])
    assert first["info_gain"][0] == pytest.approx(first["p_gold"][1] - first["p_gold"][0], rel=0,
                                                  abs=1e-6 * max(first["p_gold"]))  # float32: a few ulps of P
    assert first["advantage"] is None
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["all"]["count"] == 3
