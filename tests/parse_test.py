"""Tool-call parsing in both dialects, the reward's format check, and a never-raises property."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igpo_jax.rollout.parse import Answer, FormatError, ParseLimits, ToolCall, extract_answer, format_error, parse_action


def qwen_call(queries, name="web_search") -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": {"query": queries}}) + "</tool_call>"


# ----------------------------------------------------------------------------- qwen_tool_call

@pytest.mark.parametrize("text, expected", [
    ("<think>I know it.</think>\n<answer> Paris </answer>", Answer("Paris")),
    ("<think>need facts</think>\n" + qwen_call(["capital of France"]), ToolCall(("capital of France",))),
    ("<think>two things</think>" + qwen_call(["a b", "  c\n d  "]), ToolCall(("a b", "c d"))),
    # a single string instead of a list is accepted: the intent is unambiguous
    ('<think>x</think><tool_call>{"name": "web_search", "arguments": {"query": "solo"}}</tool_call>',
     ToolCall(("solo",))),
    # arguments as a JSON string, as OpenAI-style models emit them
    ('<think>x</think><tool_call>{"name": "web_search", "arguments": "{\\"query\\": [\\"q\\"]}"}</tool_call>',
     ToolCall(("q",))),
    # a tool call mentioned inside the thinking is reasoning, not an action
    ("<think>maybe " + qwen_call(["inner"]) + "</think><answer>42</answer>", Answer("42")),
    # without <think> the action still parses (the reward's format check is separate)
    ("<answer>Berlin</answer>", Answer("Berlin")),
    # the first answer counts when there are several
    ("<think>x</think><answer>first</answer><answer>second</answer>", Answer("first")),
])
def test_qwen_tool_call_known_cases(text, expected):
    assert parse_action(text, "qwen_tool_call") == expected


@pytest.mark.parametrize("text, reason_part", [
    ("<think>x</think><tool_call>{not json}</tool_call>", "not valid JSON"),
    ("<think>x</think>" + qwen_call(["q"], name="browse"), "unknown tool 'browse'"),
    ("<think>x</think><tool_call>[1, 2]</tool_call>", "JSON object"),
    ('<think>x</think><tool_call>{"name": "web_search", "arguments": {}}</tool_call>', "needs arguments"),
    ('<think>x</think><tool_call>{"name": "web_search", "arguments": {"query": [1]}}</tool_call>',
     "list of strings"),
    ("<think>x</think>" + qwen_call([]), "empty"),
    ("<think>x</think>" + qwen_call(["ok", "   "]), "empty"),
    ("<think>x</think>" + qwen_call(["a", "b", "c", "d"]), "1 to 3 queries, got 4"),
    ("<think>x</think>" + qwen_call(["x" * 301]), "longer than 300"),
    ("<think>x</think>" + qwen_call(["a"]) + qwen_call(["b"]), "one <tool_call> per turn"),
    ("<think>x</think>" + qwen_call(["a"]) + "<answer>b</answer>", "not both"),
    ("<think>x</think><tool_call>" + "[" * 5000 + "</tool_call>", "longer than 4000"),
    ("<think>x</think><tool_call>" + "[" * 1990 + "</tool_call>", "not valid JSON"),
    ("<think>never closed <answer>a</answer>", "<think> is never closed"),
    ("<think>x</think><tool_call>" + '{"name": "web_search"', "never closed"),
    ("<think>x</think></answer>", "never opened"),
    ("<think>x<answer>a</think></answer>", "</think> found where </answer> was expected"),
    ("<think>x</think><answer>   </answer>", "empty"),
    ("<think>x</think> The answer is Paris.", "no <answer>"),
    ("", "no <answer>"),
], ids=lambda value: value[:50])
def test_qwen_tool_call_format_errors(text, reason_part):
    action = parse_action(text, "qwen_tool_call")
    assert isinstance(action, FormatError)
    assert reason_part in action.reason


def test_limits_are_configurable():
    text = "<think>x</think>" + qwen_call(["a", "b"])
    assert isinstance(parse_action(text, "qwen_tool_call", ParseLimits(max_queries=1)), FormatError)
    assert parse_action(text, "qwen_tool_call", ParseLimits(max_queries=2)) == ToolCall(("a", "b"))


def test_unknown_dialect_is_a_configuration_error():
    with pytest.raises(ValueError, match="unknown tool-call dialect"):
        parse_action("<answer>a</answer>", "xml_tools")


# ----------------------------------------------------------------------------- search_tags

@pytest.mark.parametrize("text, expected", [
    ("<think>need it</think>\n<search> capital of France </search>", ToolCall(("capital of France",))),
    ("<think>ok</think><answer> Paris </answer>", Answer("Paris")),
    # a tool_call tag means nothing in this dialect: the search tag decides
    ("<think>x</think><search>q</search><tool_call>junk", ToolCall(("q",))),
    ("<think>x</think><search>q</search><search>r</search>", FormatError("one <search> per turn, got 2")),
    ("<think>x</think><search>q</search><answer>a</answer>", FormatError("give either <answer> or <search>, not both")),
    ("<think>x</think><search>   </search>", FormatError("a search query is empty")),
    ("<think>x</think><search>unclosed", FormatError("unbalanced tags: <search> is never closed")),
])
def test_search_tags_known_cases(text, expected):
    assert parse_action(text, "search_tags") == expected


def test_search_tags_long_query_is_refused():
    action = parse_action("<think>x</think><search>" + "word " * 100 + "</search>", "search_tags")
    assert isinstance(action, FormatError) and "longer than 300" in action.reason


# ----------------------------------------------------------------------------- reward helpers

def test_extract_answer_takes_the_first_answer():
    assert extract_answer("<think>a</think><answer>\n Paris \n</answer> <answer>Rome</answer>") == "Paris"
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>unclosed") is None


@pytest.mark.parametrize("response, dialect, reason", [
    ("<think>a</think><answer>Paris</answer>", "qwen_tool_call", None),
    ("<think>a</think>" + qwen_call(["q"]) + "<think>b</think><answer>Paris</answer>", "qwen_tool_call", None),
    ("<think>a</think><search>q</search><think>b</think><answer>Paris</answer>", "search_tags", None),
    ("<think>a</think>Paris", "qwen_tool_call", "no <answer> tag"),
    ("<think>a</think><answer> </answer>", "qwen_tool_call", "the <answer> is empty"),
    ("<think>a<answer>Paris</answer>", "qwen_tool_call", "unbalanced tags: <think> is never closed"),
    ("<think>a</think><tool_call>{}<answer>Paris</answer>", "qwen_tool_call",
     "unbalanced tags: <tool_call> is never closed"),
    ("<think>a</think></tool_call><answer>Paris</answer>", "qwen_tool_call",
     "unbalanced tags: </tool_call> closes a tag that was never opened"),
    # in search_tags a stray tool_call tag is just text
    ("<think>a</think><tool_call><answer>Paris</answer>", "search_tags", None),
])
def test_format_error(response, dialect, reason):
    assert format_error(response, dialect) == reason


# ----------------------------------------------------------------------------- never raises

_FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "<search>",
              "</search>", '{"name": "web_search", "arguments": {"query": ["q"]}}', '{"name": ', '"query"',
              "[", "]", "{", "}", '"', "\\", "\n", " ", "web_search", "x" * 400, "\x00", "é", "<", ">", "/"]
_TEXTS = st.one_of(st.text(max_size=300),
                   st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=8)), max_size=30).map("".join))


@settings(max_examples=400, deadline=None)
@given(text=_TEXTS, dialect=st.sampled_from(["qwen_tool_call", "search_tags"]))
def test_any_output_maps_to_exactly_one_action(text, dialect):
    action = parse_action(text, dialect)
    assert type(action) in (Answer, ToolCall, FormatError)
    if isinstance(action, ToolCall):
        assert 1 <= len(action.queries) <= 3 and all(0 < len(q) <= 300 for q in action.queries)
    if isinstance(action, Answer):
        assert action.text and action.text == action.text.strip()
    reason = format_error(text, dialect)
    assert reason is None or isinstance(reason, str)
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)
