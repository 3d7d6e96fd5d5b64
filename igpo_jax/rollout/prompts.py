"""System prompts, the web_search tool schema and the texts that carry tool results back.

The prompts are plain strings with named fields, so a config can replace them:
    {today}        today's date, ISO format (pin it in a config for reproducible prompts)
    {tools}        the tool schemas, one JSON object per line (Qwen's <tools> convention)
    {max_queries}  how many queries one web_search call may carry (spec §8: 3)
Only these `{name}` fields are substituted; other braces (JSON examples) stay as written, so a
template needs no `{{` escaping. An unknown `{name}` is an error, not silently left in.

qwen_tool_call renders the tool schema into the system prompt itself, so it works with any
chat template (SmolLM2's has no tool support); do not also pass `tools=` to
`apply_chat_template`, or the schema appears twice.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Sequence

from igpo_jax.rollout.parse import DIALECTS, TOOL_NAME


def web_search_tool(max_queries: int = 3) -> dict:
    """The web_search function schema, in the OpenAI / transformers tools format."""
    return {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": "Search the web. Runs every query in parallel and returns the top results "
                           "(title and snippet) of each.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {
                        "type": "array",
                        "items": {"type": "string"},
                        "minItems": 1,
                        "maxItems": max_queries,
                        "description": f"1 to {max_queries} search queries; each a short, specific phrase.",
                    },
                },
                "required": ["query"],
            },
        },
    }


WEB_SEARCH_TOOL = web_search_tool()

QWEN_TOOL_CALL_PROMPT = """\
You are a research assistant. You answer questions by searching the web and reasoning about \
what you find.

Every turn, first think inside <think> and </think>: what you know, what is missing, what to \
search next. Then do exactly one of the following:
- If you still need information, call the web_search tool with 1 to {max_queries} queries:
<tool_call>
{"name": "web_search", "arguments": {"query": ["first query", "second query"]}}
</tool_call>
  The results come back in the next message. You may search as many times as you need.
- If you can answer, give only the final answer, a few words without explanation, inside \
<answer> and </answer>.

# Tools

<tools>
{tools}
</tools>

Today is {today}."""

SEARCH_TAGS_PROMPT = """\
Answer the given question. Think inside <think> and </think> every time you get new \
information. If you lack knowledge, search the web by writing <search> query </search>; the \
top results come back between <information> and </information>. You may search as many times \
as you need. When you can answer, write only the final answer inside <answer> and </answer>, \
without explanation, for example <answer> Beijing </answer>.

Today is {today}."""

# Search-R1 dialect with two worked examples, for small models (the embedded 135M one): each
# example searches for the question's entity and copies the asked-for fact from a document that
# also states others. Measured on 32 held-out world questions (configs/world_igpo.py), greedy, first
# turn forced to `<search>` and the last to `<answer>`: with two examples the base model got the
# answer's document back in every episode; with one example, in 66% (it sometimes searched for the
# example's entity instead).
SEARCH_TAGS_FEW_SHOT_PROMPT = """\
Answer the question with the help of a search engine. First search for the name the question \
asks about by writing <search> name </search>; the results come back between <information> and \
</information>. Then write the final answer, a few words copied from the results, inside \
<answer> and </answer>.

Example 1. Question: In which year was Pemdo Labs founded?
<search> Pemdo Labs </search>
<information>1. Pemdo Labs
Pemdo Labs is a software company headquartered in Korvath. It was founded in 1974 by Ilsa Varn.</information>
<answer> 1974 </answer>

Example 2. Question: Where was Ilsa Varn born?
<search> Ilsa Varn </search>
<information>1. Ilsa Varn
Ilsa Varn is an architect born in 1948 in Korvath. Varn studied at Belmar College and works for Pemdo Labs.</information>
<answer> Korvath </answer>"""

DEFAULT_PROMPTS = {"qwen_tool_call": QWEN_TOOL_CALL_PROMPT, "search_tags": SEARCH_TAGS_PROMPT}

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render_template(template: str, **fields: object) -> str:
    """Substitute `{name}` fields; braces around anything else are left alone (see module doc)."""
    unknown = sorted({name for name in _FIELD.findall(template) if name not in fields})
    if unknown:
        raise KeyError(f"prompt template uses unknown field(s) {unknown}; available: {sorted(fields)}")
    return _FIELD.sub(lambda match: str(fields[match.group(1)]), template)


def render_system_prompt(dialect: str = "qwen_tool_call", template: str | None = None, *,
                         today: datetime.date | str | None = None, tools: Sequence[dict] | None = None,
                         max_queries: int = 3) -> str:
    """The system prompt for `dialect` (or a user's `template`), with the tool schema and date."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown tool-call dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    template = DEFAULT_PROMPTS[dialect] if template is None else template
    tools = [web_search_tool(max_queries)] if tools is None else list(tools)
    today = datetime.date.today() if today is None else today
    return render_template(template, today=today.isoformat() if isinstance(today, datetime.date) else today,
                           tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools),
                           max_queries=max_queries)


# ----------------------------------------------------------------------------- tool results

def tool_message(text: str) -> dict[str, str]:
    """qwen_tool_call: the message to append; the chat template wraps it (Qwen: <tool_response>)."""
    return {"role": "tool", "content": text}


def information_block(text: str) -> str:
    """search_tags: the text inserted into the assistant stream after </search> (Search-R1's form)."""
    return f"\n\n<information>{text.strip()}</information>\n\n"


def format_error_feedback(reason: str, dialect: str) -> str:
    """What the model reads when its turn could not be run, so it can correct itself."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown tool-call dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    if dialect == "search_tags":
        how = "write <search> query </search> or <answer> final answer </answer> after </think>"
    else:
        how = ('call <tool_call>{"name": "web_search", "arguments": {"query": ["..."]}}</tool_call> '
               "or give <answer> final answer </answer> after </think>")
    return f"Your last turn could not be run: {reason}. Please {how}."


# ----------------------------------------------------------------------------- worked examples as chat turns

# The same two worked examples as earlier chat turns (RolloutConfig.example_turns), for free turns:
# the instruction stays in the system prompt, the examples become the user's questions and the
# assistant's own responses, laid out token for token as a rollout writes them. A 135M model
# continues the form of its own earlier turns; examples quoted inside the system prompt it mostly
# answered with prose after a search result (bench/results/world_two_hop.md, gate runs 1-3, 7).
SEARCH_TAGS_TWO_HOP_INSTRUCTION = """\
Answer the question with the help of a search engine. Search by writing <search> name </search>; \
the results come back between <information> and </information>. After the results, write one of \
two things and nothing else: if the results name the company, university or city the question \
asks about but do not state the answer, <search> that name </search>; if they state the answer, \
<answer> the answer </answer>, a few words copied from the results."""


def _searched(query: str, title: str, text: str) -> str:
    """A search turn and its results, as the rollout writes them (information_block, format_results)."""
    return f"<search> {query} </search>" + information_block(f'Results for "{query}":\n1. {title}\n{text}')


TWO_HOP_EXAMPLE_TURNS = (
    ("In which year was the company that employs Ilsa Varn founded?",
     _searched("Ilsa Varn", "Ilsa Varn", "Ilsa Varn is an architect born in 1948 in Korvath. Varn studied at "
                                         "Belmar College and works for Pemdo Labs.")
     + _searched("Pemdo Labs", "Pemdo Labs", "Pemdo Labs is a software company headquartered in Dunmere. It was "
                                             "founded in 1974 by Osk Tamber.")
     + "<answer> 1974 </answer>"),
    ("In which city is the university that Osk Tamber attended?",
     _searched("Osk Tamber", "Osk Tamber", "Osk Tamber was born in Korvath in 1941. The chemist studied at Hallum "
                                           "Institute of Technology and works for Pemdo Labs.")
     + _searched("Hallum Institute of Technology", "Hallum Institute of Technology",
                 "Hallum Institute of Technology is a university in Selvane, founded in 1872.")
     + "<answer> Selvane </answer>"),
    ("In which country was Brannoc Heval born?",
     _searched("Brannoc Heval", "Brannoc Heval", "Brannoc Heval is a pilot born in 1939 in Tessaly. Heval studied at "
                                                 "Orrin College and works for Maldrake Foods.")
     + _searched("Tessaly", "Tessaly", "Tessaly is a city in Quenmark. The Ardel River flows through Tessaly.")
     + "<answer> Quenmark </answer>"),
    ("In which country is Veltrow Motors headquartered?",
     _searched("Veltrow Motors", "Veltrow Motors", "Veltrow Motors is a car company headquartered in Halvik. It was "
                                                   "founded in 1968 by Ama Rusk.")
     + _searched("Halvik", "Halvik", "The Senn River flows through Halvik, a city in Ostrania.")
     + "<answer> Ostrania </answer>"),
)
