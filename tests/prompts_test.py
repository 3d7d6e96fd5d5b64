"""System prompt rendering, the tool schema, and the texts that carry tool results back."""

from __future__ import annotations

import datetime
import glob
import json
import os
import re

import pytest

from igpo_jax.rollout.parse import Answer, ToolCall, parse_action
from igpo_jax.rollout.prompts import QWEN_TOOL_CALL_PROMPT, SEARCH_TAGS_PROMPT, format_error_feedback, information_block, render_system_prompt, render_template, tool_message, web_search_tool


def test_qwen_prompt_has_date_and_the_tool_schema():
    prompt = render_system_prompt("qwen_tool_call", today=datetime.date(2026, 3, 14))
    assert "Today is 2026-03-14." in prompt
    tools_text = re.search(r"<tools>\n(.*)\n</tools>", prompt, re.DOTALL).group(1)
    assert json.loads(tools_text) == web_search_tool(3)
    assert "{" + "today}" not in prompt and "{max_queries}" not in prompt


def test_the_prompt_example_call_is_what_the_parser_accepts():
    """The call the prompt shows the model must parse, or the model is taught a broken format."""
    example = re.search(r"<tool_call>.*?</tool_call>", QWEN_TOOL_CALL_PROMPT, re.DOTALL).group(0)
    assert parse_action("<think>x</think>" + example, "qwen_tool_call") == ToolCall(("first query", "second query"))
    assert parse_action("<think>x</think><answer> Beijing </answer>", "search_tags") == Answer("Beijing")


def test_max_queries_reaches_schema_and_text():
    prompt = render_system_prompt(today="2026-01-01", max_queries=2)
    assert "1 to 2 queries" in prompt and '"maxItems": 2' in prompt


def test_search_tags_prompt_uses_search_and_information_tags():
    prompt = render_system_prompt("search_tags", today="2026-01-01")
    assert "<search> query </search>" in prompt and "<information>" in prompt
    assert prompt.endswith("Today is 2026-01-01.") and "web_search" not in prompt
    assert prompt.startswith(SEARCH_TAGS_PROMPT[:40])


def test_users_can_replace_the_template_and_keep_json_braces():
    template = 'Be brief. Call {"name": "web_search"} at most {max_queries} times. Date: {today}.'
    assert (render_system_prompt(template=template, today="2026-02-02")
            == 'Be brief. Call {"name": "web_search"} at most 3 times. Date: 2026-02-02.')


def test_unknown_field_is_an_error_naming_it():
    with pytest.raises(KeyError, match="todya"):
        render_template("Today is {todya}.", today="x")
    with pytest.raises(ValueError, match="unknown tool-call dialect"):
        render_system_prompt("xml")


def test_default_date_is_today():
    assert f"Today is {datetime.date.today().isoformat()}." in render_system_prompt()


def test_tool_result_texts():
    assert tool_message("1. Paris\nCapital.") == {"role": "tool", "content": "1. Paris\nCapital."}
    assert information_block("  results \n") == "\n\n<information>results</information>\n\n"
    qwen = format_error_feedback("a search query is empty", "qwen_tool_call")
    assert qwen.startswith("Your last turn could not be run: a search query is empty.") and "<tool_call>" in qwen
    assert "<search>" in format_error_feedback("x", "search_tags")


SHIPPED_CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                         for p in glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "*.py")))


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_every_shipped_config_pins_the_prompts_date(name):
    from igpo_jax import components
    from igpo_jax.rollout.prompts import DEFAULT_PROMPTS
    from tests.train_test import load_config

    c = load_config(name)
    assert c.rollout.today is not None, f"configs/{name}.py must pin rollout.today (reproducible prompts)"
    rcfg = components.rollout_config(c)
    assert rcfg.today == c.rollout.today
    template = rcfg.system_prompt or DEFAULT_PROMPTS[rcfg.dialect]
    if "{today}" in template:
        prompt = render_system_prompt(rcfg.dialect, rcfg.system_prompt, today=rcfg.today)
        assert c.rollout.today in prompt


def test_a_user_config_keeps_todays_date_and_a_bad_date_is_refused():
    from igpo_jax import components, config_base

    c = config_base.base_config()
    c.data.synthetic_world = True
    assert components.rollout_config(c).today is None  # rendered as the day the run starts
    c.rollout.today = "01/02/2026"
    with pytest.raises(ValueError, match=r"config.rollout.today='01/02/2026' must be an ISO date"):
        config_base.validate(c)


def test_two_hop_example_turns_are_laid_out_as_a_rollout_writes_them():
    from igpo_jax.rollout.prompts import TWO_HOP_EXAMPLE_TURNS
    from igpo_jax.search.clients import SearchHit, SearchResult, format_results

    question, response = TWO_HOP_EXAMPLE_TURNS[0]
    assert question.endswith("?")
    first = format_results([SearchResult("Ilsa Varn", (SearchHit("Ilsa Varn", "Ilsa Varn is an architect born in 1948 in "
                                         "Korvath. Varn studied at Belmar College and works for Pemdo Labs."),))])
    assert response.startswith("<search> Ilsa Varn </search>" + information_block(first) + "<search> Pemdo Labs </search>")
    for _, response in TWO_HOP_EXAMPLE_TURNS:  # two searches, then an answer the second document states
        assert response.count("<search>") == 2 and response.count("</information>") == 2
        assert response.endswith(" </answer>") and response.split("<answer>")[1].split()[0] in response.split(
            "<information>")[2]
