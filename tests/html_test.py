"""reporting.html on hand-made records: IG colours, P(gold) bars, escaping, the filter's options."""

from __future__ import annotations

from html.parser import HTMLParser

from igpo_jax.reporting.html import RunView, flatten, render_page


def episode(finish, reward, turns):
    return {"question": "Who founded <Valdoria>?", "golden_answers": ["Kel"], "answer": "Kel", "f1": reward, "em": 1.0,
            "no_format_f1": reward, "finish_reason": finish, "data_source": "world",
            "turn_records": [{"text": text, "queries": queries, "tool_result": result, "retrieved_ids": [],
                              "p_gold": p, "info_gain": ig, "advantage": 0.5}
                             for text, queries, result, p, ig in turns]}


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_turns_show_p_gold_bars_and_coloured_gains():
    searched = episode("answer", 1.0, [("<search>Valdoria</search>", ["Valdoria"], "1. <b>Valdoria</b> was founded",
                                        0.01, 0.14), ("<answer>Kel</answer>", [], "", 0.15, None)])
    lost = episode("max_turns", -2.0, [("<search>x</search>", ["x"], "nothing", 0.2, -0.15),
                                       ("<search>y</search>", ["y"], "", 0.05, None)])
    run = RunView("igpo", flatten({"rollout": {"n": 2}}), {"step": 3.0, "reward/mean": 0.5}, 3, [searched, lost])
    page = render_page("t", None, [], [run], curves_error="no metrics.jsonl")
    parsed = Elements()
    parsed.feed(page)
    turns = [a for tag, a in parsed.found if tag == "div" and a.get("class") == "turn"]
    assert [float(t["data-p-gold"]) for t in turns] == [0.01, 0.15, 0.2, 0.05]
    bars = [a["style"] for tag, a in parsed.found if tag == "span" and "width" in a.get("style", "")]
    assert bars == ["width:1.0%", "width:15.0%", "width:20.0%", "width:5.0%"]
    gains = [a["class"] for tag, a in parsed.found if tag == "span" and a.get("class", "").startswith("ig")]
    assert gains == ["ig pos", "ig neg"]  # the final turns earn F1, not IG
    episodes = [a for tag, a in parsed.found if tag == "details" and a.get("class") == "episode"]
    assert [(e["data-finish"], e["data-reward"]) for e in episodes] == [("answer", "1.0"), ("max_turns", "-2.0")]
    assert "open" not in episodes[0]  # collapsed by default
    options = [a["value"] for tag, a in parsed.found if tag == "option"]
    assert options == ["", "answer", "max_turns"]
    # model text and tool results are shown as text, never as markup
    assert "1. <b>Valdoria</b> was founded" in parsed.text and "Who founded <Valdoria>?" in "".join(parsed.text)
    assert "no learning curves: no metrics.jsonl" in "".join(parsed.text)


def test_flatten_nested_config():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": {}, "f": [1]}) == {"a.b": 1, "a.c.d": "x", "e": {}, "f": [1]}
