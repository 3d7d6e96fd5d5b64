"""Model output → what the agent does next, for both tool-call dialects; never raises.

    parse_action(text, "qwen_tool_call")  →  Answer(text) | ToolCall(queries) | FormatError(reason)

Dialects (IGPO_SPEC §1):
- "qwen_tool_call": `<think>…</think>` then either `<answer>…</answer>` or
  `<tool_call>{"name": "web_search", "arguments": {"query": ["q1", "q2"]}}</tool_call>`.
- "search_tags" (Search-R1): `<think>…</think>` then `<search>query</search>` or `<answer>…</answer>`.

`text` is one assistant turn as the model produced it, including a forced prefix such as
`<think>` (the tags must balance across prefix + generation). Anything inside `<think>` is
reasoning and never an action. A FormatError's `reason` is written for the model: the rollout
can send it back as the tool message ("… could not be run: {reason}").

`format_error(response, dialect)` is the reward's format check (§2): it returns why the
final response earns the format penalty (no or empty answer tag, unbalanced tags) or None.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Union

DIALECTS = ("qwen_tool_call", "search_tags")
TOOL_NAME = "web_search"
_CALL_TAG = {"qwen_tool_call": "tool_call", "search_tags": "search"}


@dataclass(frozen=True)
class Answer:
    text: str


@dataclass(frozen=True)
class ToolCall:
    queries: tuple[str, ...]


@dataclass(frozen=True)
class FormatError:
    reason: str


Action = Union[Answer, ToolCall, FormatError]


@dataclass(frozen=True)
class ParseLimits:
    """Bounds on a tool call (spec §8: 1–3 queries). Longer queries are refused, not truncated:
    a cut query searches for something the model did not ask for."""
    max_queries: int = 3
    max_query_chars: int = 300
    max_call_chars: int = 4000  # a tool_call body longer than this is not a search, it is a runaway


@dataclass(frozen=True)
class _Block:
    tag: str
    content: str


def _tag_pattern(tags: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"<(/?)(" + "|".join(tags) + r")>")


_PATTERNS = {dialect: _tag_pattern(("think", _CALL_TAG[dialect], "answer")) for dialect in DIALECTS}


def _blocks(text: str, dialect: str) -> list[_Block] | str:
    """Top-level tagged blocks in order, or the reason the tags do not nest and balance.

    One stack over the dialect's three tags: every close must match the innermost open tag and
    nothing may stay open. Blocks nested inside another (e.g. a tool call inside think) are not
    returned: only what stands at the top level can be an action.
    """
    stack: list[tuple[str, int]] = []
    blocks: list[_Block] = []
    for match in _PATTERNS[dialect].finditer(text):
        closing, tag = match.group(1) == "/", match.group(2)
        if not closing:
            stack.append((tag, match.end()))
            continue
        if not stack:
            return f"</{tag}> closes a tag that was never opened"
        open_tag, content_start = stack.pop()
        if open_tag != tag:
            return f"</{tag}> found where </{open_tag}> was expected"
        if not stack:
            blocks.append(_Block(tag, text[content_start:match.start()]))
    if stack:
        return f"<{stack[-1][0]}> is never closed"
    return blocks


def parse_action(text: str, dialect: str, limits: ParseLimits = ParseLimits()) -> Action:
    """The one action a model turn asks for; every failure is a FormatError, never an exception."""
    if dialect not in DIALECTS:  # a configuration bug, not a model output: fail loudly
        raise ValueError(f"unknown tool-call dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    if not isinstance(text, str):
        return FormatError(f"the output is not text ({type(text).__name__})")
    blocks = _blocks(text, dialect)
    if isinstance(blocks, str):
        return FormatError(f"unbalanced tags: {blocks}")
    call_tag = _CALL_TAG[dialect]
    answers = [block for block in blocks if block.tag == "answer"]
    calls = [block for block in blocks if block.tag == call_tag]
    if answers and calls:
        return FormatError(f"give either <answer> or <{call_tag}>, not both")
    if answers:
        answer = answers[0].content.strip()
        return Answer(answer) if answer else FormatError("the <answer> is empty")
    if not calls:
        return FormatError(f"no <answer>…</answer> and no <{call_tag}>…</{call_tag}> after the thinking")
    if len(calls) > 1:
        return FormatError(f"one <{call_tag}> per turn, got {len(calls)}")
    if dialect == "search_tags":
        return _checked_queries([calls[0].content], limits)
    return _parse_tool_call_json(calls[0].content, limits)


def _parse_tool_call_json(body: str, limits: ParseLimits) -> ToolCall | FormatError:
    if len(body) > limits.max_call_chars:
        return FormatError(f"the tool call is longer than {limits.max_call_chars} characters")
    try:
        call = json.loads(body)
    except json.JSONDecodeError as error:
        return FormatError(f"the tool call is not valid JSON ({error.msg} at character {error.pos})")
    except (ValueError, RecursionError):  # e.g. a 5000-digit number, or [[[[… nested past the limit
        return FormatError("the tool call is not valid JSON")
    if not isinstance(call, dict):
        return FormatError('the tool call must be a JSON object {"name": ..., "arguments": {...}}')
    if call.get("name") != TOOL_NAME:
        return FormatError(f"unknown tool {str(call.get('name'))[:60]!r}; the only tool is {TOOL_NAME!r}")
    arguments = call.get("arguments")
    if isinstance(arguments, str):  # some models emit arguments as a JSON string, as in OpenAI's API
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return FormatError("the tool call's arguments are not a JSON object")
    if not isinstance(arguments, dict) or "query" not in arguments:
        return FormatError(f'{TOOL_NAME} needs arguments {{"query": ["...", ...]}}')
    queries = arguments["query"]
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not all(isinstance(query, str) for query in queries):
        return FormatError('"query" must be a list of strings')
    return _checked_queries(queries, limits)


def _checked_queries(queries: list[str], limits: ParseLimits) -> ToolCall | FormatError:
    queries = [" ".join(query.split()) for query in queries]
    if not queries or any(not query for query in queries):
        return FormatError("a search query is empty")
    if len(queries) > limits.max_queries:
        return FormatError(f"{TOOL_NAME} takes 1 to {limits.max_queries} queries, got {len(queries)}")
    if any(len(query) > limits.max_query_chars for query in queries):
        return FormatError(f"a search query is longer than {limits.max_query_chars} characters")
    return ToolCall(tuple(queries))


# ----------------------------------------------------------------------------- reward helpers

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """Content of the first <answer>…</answer> (stripped), or None when there is none."""
    match = _ANSWER.search(text) if isinstance(text, str) else None
    return match.group(1).strip() if match else None


def format_error(response: str, dialect: str = "qwen_tool_call") -> str | None:
    """Why `response` earns the format penalty, or None if it is well formed.

    Penalised (spec §2): the tags think / tool_call (search in search_tags) / answer do not
    balance and nest, or there is no non-empty <answer>. `response` is the final turn or the
    concatenated assistant turns, whichever the reward is defined over; tool messages must not
    be included (their text is not the model's).
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown tool-call dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    if not isinstance(response, str):
        return f"the response is not text ({type(response).__name__})"
    blocks = _blocks(response, dialect)
    if isinstance(blocks, str):
        return f"unbalanced tags: {blocks}"
    answers = [block for block in blocks if block.tag == "answer"]
    if not answers:
        return "no <answer> tag"
    if not answers[0].content.strip():
        return "the <answer> is empty"
    return None
