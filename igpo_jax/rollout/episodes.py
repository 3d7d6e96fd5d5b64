"""Multi-turn episodes: the sampler generates, the search client answers, results go back in the cache.

Legend: B questions, G rollouts per question, N = B·G rows, L tokens (right-padded), T max turns.

    sampler = make_sampler(model, tokenizer, config, num_rows=B * G)
    with BlockingSearchClient(make_search_client("mock")) as search:
        trajectories, stats = rollout(examples, G, sampler, tokenizer, search, config, seed=step)

One row per rollout holds the whole conversation in the sampler's KV cache. A turn is one model
generation segment: the rollout starts every row on [system, user] + assistant header + forced
prefix, and each time a row stops (a stop string such as `</tool_call>`, a stop id, its token
budget) it parses the turn and either ends the episode or appends the continuation (the tool
result, then the next assistant header and forced prefix) with `Sampler.append`, which writes
only the new tokens. The history is never re-prefilled.

Searches overlap decoding: the rows that stop in one decode call form one search round, sent to
a worker thread (`search.search_many`, all of its queries concurrent); the main thread keeps
decoding the other rows and appends a round's results as soon as it is done. Appends happen at
a time that depends on search latency, so with `overlap_search=True` the KV-cache layout (not
the per-row sampling keys) can differ between runs; `overlap_search=False` waits for each
round before decoding on, which makes the schedule (hence float rounding) deterministic.

`lockstep_turns=True` holds every row that stops until no row decodes, then sends all their
searches as one round and appends all their continuations in one call. In a wide batch whose
rows finish a turn a step apart (a greedy validation of 96 questions: each decode call comes back
after one step, with a row or two stopped) each round's append advanced the shared slot cursor
for every row and padded its rows to a power of two and its width to its longest result: 8
appends, 14208 token slots computed for 6442 tokens, and a compaction, where one append computes
12288 (world_igpo, 2026-12-07). Little is lost to waiting there: every turn ends within a few
steps of the others. make_sampler then has every decode call run the whole batch, the waiting
rows masked (`Sampler(gather_decoding_rows=False)`): calls of a step or two are too short for
gathering the decoding rows' cache to pay. Each row's tokens depend on its own context only, so the episodes are the same up to float rounding of the
different slot layout (as with overlapping searches, above).

A turn that cannot be parsed (FormatError) costs a turn: by default the model reads
`format_error_feedback` in place of a tool result and may correct itself (the reward's format
check still sees the bad turn); `format_error_ends_episode=True` ends the episode instead.
The last allowed turn may still answer; a tool call there ends the episode with 'max_turns'.

Memory is bounded by `max_concurrent_rows` (0 → every rollout at once): the sampler then has that
many cache rows, the episodes wait in a queue, and an episode that ends hands its row to the next
one (`Sampler.restart`; continuous batching), so the KV cache costs max_concurrent_rows ×
cache_size slots per layer whatever train_batch_size × n is. Continuous batching rather than a
paged cache, because the sampler's cache is one dense array per layer written at one shared
cursor (the layout that makes decoding fast here, kv_cache.py): a row's old slots become holes,
and the sampler compacts them away (one gather) when the cursor nears the end, so `cache_size`
still bounds one episode, not the sum of the episodes a row has held. A paged cache would need a
block table and a gather in every attention call instead. Episodes are admitted in order; every
row samples with its own episode's seed, so the trajectories do not depend on the bound. They
equal the unbounded rollout's up to float rounding: attention over a different slot layout and
matmuls over a different batch size may round differently (tests: identical tokens, log-probs
within 1e-5), which a near-tie in sampling could turn into a different token.

The G rollouts of a question start from the same prompt; with `share_prompt_prefill` (the
default) the sampler prefills it once and copies its keys/values into the G rows.

Rendering comes from the tokenizer's chat template, not hard-coded ChatML: the text between an
assistant message and the next assistant header (end of turn, tool message framing) is found by
rendering a conversation with marker contents and cutting at the markers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from typing import Callable, Protocol, Sequence

import numpy as np

from igpo_jax.rollout.parse import Answer, FormatError, ParseLimits, ToolCall, extract_answer, parse_action
from igpo_jax.rollout.prompts import format_error_feedback, information_block, render_system_prompt
from igpo_jax.rollout.trajectories import Episode, Trajectories
from igpo_jax.data.examples import Example
from igpo_jax.model.tokenizer import render_chat, stop_token_ids
from igpo_jax.rollout.sampler import APPEND_GATHER_DIVISOR, FINISH_CONTEXT, FINISH_LENGTH, RowOutput, Sampler, SamplingParams
from igpo_jax.search.clients import SearchResult, format_results

STOP_STRINGS = {"qwen_tool_call": ("</tool_call>", "</answer>"), "search_tags": ("</search>", "</answer>")}

# Episode finish reasons (trajectories.Episode.finish_reason)
ANSWER, MAX_TURNS, CONTEXT, LENGTH, FORMAT_ERROR = "answer", "max_turns", "context", "length", "format_error"


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    dialect: str = "qwen_tool_call"  # 'qwen_tool_call' | 'search_tags'
    system_prompt: str | None = None  # a prompts.py template; None → the dialect's default
    # worked examples as earlier chat turns, (question, assistant response) pairs placed between the
    # system prompt and the question: a small model copies its own earlier turns' form far more
    # readily than examples quoted inside the system prompt (bench/results/world_two_hop.md)
    example_turns: tuple[tuple[str, str], ...] = ()
    today: str | None = None  # "{today}" in the system prompt; pin it for reproducible prompts
    forced_prefix: str = "<think>"  # starts every assistant turn ('' → none); not loss-masked
    first_turn_prefix: str | None = None  # turn 0 only (e.g. '<search>' for a 135M demo); None → forced_prefix
    # the final allowed turn (max_turns − 1) only, e.g. '<answer>': free turns before it, where the
    # policy decides whether to search again or answer, and an answer when its turns run out
    last_turn_prefix: str | None = None
    max_turns: int = 4
    max_new_tokens: int = 512  # per turn
    cache_size: int = 4096  # KV-cache slots: the context limit of the whole batch's shared cursor
    sampling: SamplingParams = SamplingParams()
    max_tool_tokens: int = 512  # token budget of one rendered tool result
    max_queries: int = 3
    format_error_ends_episode: bool = False
    overlap_search: bool = True
    steps_per_call: int = 32
    min_span: int = 1024  # smallest cache window that decoding attends over (sampler.py)
    share_prompt_prefill: bool = True  # prefill a group's prompt once for its G rows
    max_concurrent_rows: int = 0  # episodes decoding at once (the cache's rows); 0 → all of them
    append_gather_divisor: int = APPEND_GATHER_DIVISOR  # appends of ≤ rows / this extend only their rows
    # a row that stops waits until no row decodes, then every waiting row's searches go out in one
    # round and their continuations in one append: one cursor advance per turn instead of one per
    # decode call in which some row stopped (a wide greedy validation batch; see the module doc)
    lockstep_turns: bool = False

    def __post_init__(self):
        if self.dialect not in STOP_STRINGS:
            raise ValueError(f"unknown dialect {self.dialect!r}; expected one of {sorted(STOP_STRINGS)}")
        if self.max_turns < 1 or self.max_new_tokens < 1 or self.max_tool_tokens < 1:
            raise ValueError(f"max_turns, max_new_tokens and max_tool_tokens must be ≥ 1: {self}")
        if self.max_concurrent_rows < 0:
            raise ValueError(f"max_concurrent_rows must be ≥ 0 (0 → all rows at once): {self.max_concurrent_rows}")
        check_turn_prefixes(self.first_turn_prefix, self.last_turn_prefix, self.max_turns)
        check_example_turns(self.example_turns)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return STOP_STRINGS[self.dialect]

    def prefix(self, turn: int) -> str:
        """What turn `turn` is forced to start with: first_turn_prefix on turn 0, last_turn_prefix on
        turn max_turns − 1, forced_prefix on every other (each where set)."""
        if turn == 0 and self.first_turn_prefix is not None:
            return self.first_turn_prefix
        if turn == self.max_turns - 1 and self.last_turn_prefix is not None:
            return self.last_turn_prefix
        return self.forced_prefix


def check_turn_prefixes(first_turn_prefix: str | None, last_turn_prefix: str | None, max_turns: int,
                        keys: str = "first_turn_prefix and last_turn_prefix") -> None:
    """With one allowed turn, the first turn is the last: two prefixes for it would contradict."""
    if first_turn_prefix is not None and last_turn_prefix is not None and max_turns < 2:
        raise ValueError(f"{keys} ({first_turn_prefix!r}, {last_turn_prefix!r}) both name turn 0 when "
                         f"max_turns={max_turns}: allow at least 2 turns, or set one of them")


def check_example_turns(example_turns, key: str = "example_turns") -> None:
    """Each worked example is a (question, assistant response) pair of non-empty strings."""
    if isinstance(example_turns, str) or any(
            isinstance(pair, str) or len(pair) != 2 or not all(isinstance(t, str) and t for t in pair)
            for pair in example_turns):
        raise ValueError(f"{key} must be (question, assistant response) pairs of non-empty strings: "
                         f"{example_turns!r}")


class SamplerLike(Protocol):
    """What the rollout needs from `sampler.Sampler` (tests substitute scripted policies)."""
    batch_size: int

    def start(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], max_new_tokens: int) -> None: ...

    def decode(self) -> dict[int, RowOutput]: ...

    def append(self, row_ids: Sequence[int], tokens: Sequence[Sequence[int]], max_new_tokens: int) -> None: ...

    def decoding_rows(self) -> list[int]: ...

    def blocked_rows(self) -> list[int]: ...  # decoding rows waiting for cache room (a subset)

    def release(self, row_ids: Sequence[int]) -> None: ...  # an ended episode's row: its slots are free

    # needed only with RolloutConfig.max_concurrent_rows < the number of rollouts
    def restart(self, row_ids: Sequence[int], prompts: Sequence[Sequence[int]], seeds: Sequence[int],
                max_new_tokens: int) -> None: ...


class SearchLike(Protocol):
    """`search.clients.BlockingSearchClient` or anything with its `search_many`."""

    def search_many(self, batches: Sequence[Sequence[str]]) -> list[list[SearchResult]]: ...


def make_sampler(model, tokenizer, config: RolloutConfig, num_rows: int, **sampler_kwargs) -> Sampler:
    """A Sampler with the dialect's stop strings, the tokenizer's stop ids and the config's limits,
    for `num_rows` rollouts: min(num_rows, max_concurrent_rows) cache rows when that is set.

    The cache is compacted when it runs short (sampler.py): the rows share one slot cursor, and
    each append of a search result (rows' searches come back at different times) advances it for
    all of them, so without compaction a wide batch ran out of slots after its searches although
    every row's own tokens fit (measured: 21 of 96 greedy validation episodes ended at 'context'
    in a 1024-slot cache whose longest row held ~400 tokens)."""
    bounded = 0 < config.max_concurrent_rows < num_rows
    return Sampler(model, tokenizer, batch_size=config.max_concurrent_rows if bounded else num_rows,
                   cache_size=config.cache_size, params=config.sampling,
                   stop_token_ids=stop_token_ids(tokenizer), stop_strings=config.stop_strings,
                   steps_per_call=config.steps_per_call, min_span=config.min_span,
                   share_prompt_prefill=config.share_prompt_prefill, compact_cache=True,
                   append_gather_divisor=config.append_gather_divisor,
                   # lockstep: the rows that stopped wait in the batch and each call is a step or two
                   gather_decoding_rows=not config.lockstep_turns, **sampler_kwargs)


# ----------------------------------------------------------------------------- chat rendering

_ASSISTANT_MARK, _TOOL_MARK = "\x00IGPO-ASSISTANT\x00", "\x00IGPO-TOOL\x00"
_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


@dataclasses.dataclass(frozen=True)
class ChatFrame:
    """Template text around a tool round trip (ChatML: after_call = '<|im_end|>\\n<|im_start|>tool\\n',
    after_result = '<|im_end|>\\n<|im_start|>assistant\\n')."""
    assistant_header: str  # what add_generation_prompt appends
    after_call: str  # from the end of an assistant message to the start of the tool result
    after_result: str  # from the end of the tool result to (and including) the next assistant header
    tool_role: str  # 'tool', or 'user' where the template has no tool role


def chat_frame(tokenizer) -> ChatFrame:
    with_gen = render_chat(tokenizer, _PROBE, add_generation_prompt=True)
    without = render_chat(tokenizer, _PROBE, add_generation_prompt=False)
    header = with_gen[len(without):] if with_gen.startswith(without) else ""
    for role in ("tool", "user"):
        # Templates without a tool role (they raise, or drop the message) get the result as a
        # user message: the model still reads it right after its own turn, in its chat format.
        messages = _PROBE + [{"role": "assistant", "content": _ASSISTANT_MARK}, {"role": role, "content": _TOOL_MARK}]
        try:
            text = render_chat(tokenizer, messages, add_generation_prompt=True)
        except Exception:  # jinja raise_exception in the template: this role is not supported
            continue
        a, t = text.find(_ASSISTANT_MARK), text.find(_TOOL_MARK)
        if 0 <= a < t:
            return ChatFrame(header, text[a + len(_ASSISTANT_MARK):t], text[t + len(_TOOL_MARK):], role)
    raise ValueError("the chat template renders neither a tool nor a user message after an assistant message")


# ----------------------------------------------------------------------------- per-row bookkeeping

@dataclasses.dataclass
class _Row:
    """Host state of one rollout while it runs (mutable; frozen into Trajectories at the end)."""
    example: Example
    group: int
    response_start: int  # first token after [system, user] + header: the first forced prefix
    tokens: list[int]
    loss: list[bool] = dataclasses.field(default_factory=list)
    logps: list[float] = dataclasses.field(default_factory=list)
    turn_ids: list[int] = dataclasses.field(default_factory=list)
    turn_starts: list[int] = dataclasses.field(default_factory=list)
    turn_texts: list[str] = dataclasses.field(default_factory=list)
    tool_calls: int = 0
    searches: int = 0
    failures: int = 0
    format_errors: int = 0
    finish: str | None = None
    retrieved: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # turn → hit ids

    def __post_init__(self):
        n = len(self.tokens)
        self.loss, self.logps, self.turn_ids = [False] * n, [0.0] * n, [-1] * n

    def add_context(self, tokens: Sequence[int]) -> None:
        self.tokens += tokens
        self.loss += [False] * len(tokens)
        self.logps += [0.0] * len(tokens)
        self.turn_ids += [-1] * len(tokens)

    def add_turn(self, out: RowOutput) -> int:
        turn = len(self.turn_starts)
        self.turn_starts.append(len(self.tokens))
        self.tokens += out.tokens
        self.loss += [True] * len(out.tokens)
        self.logps += out.logprobs
        self.turn_ids += [turn] * len(out.tokens)
        return turn


@dataclasses.dataclass(frozen=True)
class _Next:
    """What a stopped row does next: end, search, or read a text (format-error feedback)."""
    finish: str | None = None
    queries: tuple[str, ...] = ()
    feedback: str | None = None


# ----------------------------------------------------------------------------- the rollout

class _Rollout:
    def __init__(self, sampler: SamplerLike, tokenizer, search: SearchLike, config: RolloutConfig,
                 on_progress: Callable[[int, int], None] | None = None):
        self.sampler, self.tokenizer, self.search, self.config = sampler, tokenizer, search, config
        self.on_progress = on_progress or (lambda turns, episodes: None)
        self.frame = chat_frame(tokenizer) if config.dialect == "qwen_tool_call" else None
        self.limits = ParseLimits(max_queries=config.max_queries)
        self.stop_ids = frozenset(stop_token_ids(tokenizer))
        self.timing = {"decode_s": 0.0, "search_s": 0.0, "search_wait_s": 0.0}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def prompt_tokens(self, example: Example) -> tuple[list[int], int]:
        """[system, user] + assistant header + first forced prefix, and where that prefix starts."""
        messages = example.chat_messages()
        if not any(m["role"] == "system" for m in messages):  # a data file's own system prompt wins
            system = render_system_prompt(self.config.dialect, self.config.system_prompt, today=self.config.today,
                                          max_queries=self.config.max_queries)
            messages = [{"role": "system", "content": system}] + messages
        examples = [{"role": role, "content": text} for question, response in self.config.example_turns
                    for role, text in (("user", question), ("assistant", response))]
        messages = messages[:1] + examples + messages[1:] if messages[0]["role"] == "system" else examples + messages
        chat = self.encode(render_chat(self.tokenizer, messages, add_generation_prompt=True))
        return chat + self.encode(self.config.prefix(0)), len(chat)

    def run(self, examples: Sequence[Example], group_size: int, seeds: Sequence[int]) -> list[_Row]:
        rows = []
        for i, example in enumerate(examples):
            tokens, response_start = self.prompt_tokens(example)
            rows += [_Row(example, i, response_start, list(tokens)) for _ in range(group_size)]
        slots = min(len(rows), self.config.max_concurrent_rows or len(rows))
        if slots > self.sampler.batch_size:
            raise ValueError(f"{slots} concurrent rollouts for a sampler of batch_size={self.sampler.batch_size}")
        if len(seeds) != len(rows):
            raise ValueError(f"{len(seeds)} row seeds for {len(rows)} rollouts")
        self.seeds = [int(s) for s in seeds]
        self.episode_at: list[int | None] = list(range(slots))  # sampler row → episode (None: free)
        self.waiting = collections.deque(range(slots, len(rows)))  # episodes not started yet
        t0 = time.perf_counter()
        self.sampler.start([r.tokens for r in rows[:slots]], self.seeds[:slots], self.config.max_new_tokens)
        self.timing["decode_s"] += time.perf_counter() - t0
        with concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="igpo-rollout-search") as pool:
            self._loop(rows, pool)
        return rows

    def _loop(self, rows: list[_Row], pool: concurrent.futures.Executor) -> None:
        """Sampler rows are slots: `episode_at[s]` is the episode in slot s until the sampler has
        reported its last turn; then the next waiting episode takes the slot."""
        in_flight: dict[concurrent.futures.Future, list[tuple[int, RowOutput]]] = {}
        # lockstep_turns: stopped rows' queries and feedback waiting for the turn's last row
        held_rows, held_queries, held_feedback = [], [], []
        while any(e is not None for e in self.episode_at):
            blocked = self.sampler.blocked_rows()
            if self._runnable() or blocked or not in_flight:
                t0 = time.perf_counter()
                stopped = self.sampler.decode()  # with nothing decoding: the reports of rows that did not fit
                self.timing["decode_s"] += time.perf_counter() - t0
                if not stopped and not self._runnable() and not in_flight and self.sampler.blocked_rows() == blocked:
                    raise RuntimeError(f"rollout stalled: rows {self.episode_at} wait for a report that never comes")
                round_rows, round_queries, feedback, freed, newly_finished = [], [], [], [], 0
                for s, out in sorted(stopped.items()):
                    row = rows[self.episode_at[s]]
                    # a row whose continuation did not fit ended then; its report brings no new turn
                    step = _Next(finish=row.finish) if row.finish is not None else self._after_turn(row, out)
                    if step.finish is not None:
                        newly_finished += row.finish is None  # a failed append counted its episode already
                        row.finish = step.finish
                        freed.append(s)
                    elif step.queries:
                        round_rows.append((s, out))
                        round_queries.append(step.queries)
                    else:
                        feedback.append((s, out, step.feedback))
                self.on_progress(len(stopped), newly_finished)
                if self.config.lockstep_turns:  # hold this call's turns until no row decodes
                    held_rows += round_rows
                    held_queries += round_queries
                    held_feedback += feedback
                    if self._runnable():
                        round_rows, round_queries, feedback = [], [], []
                    else:
                        round_rows, round_queries, feedback = held_rows, held_queries, held_feedback
                        held_rows, held_queries, held_feedback = [], [], []
                self._continue(rows, feedback)
                self._admit(rows, freed)
                if round_rows:
                    in_flight[pool.submit(_search_round, self.search, round_queries)] = round_rows
            must_wait = in_flight and (not self.config.overlap_search or not self._runnable())
            t0 = time.perf_counter()
            done, _ = concurrent.futures.wait(in_flight, timeout=None if must_wait else 0,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            self.timing["search_wait_s"] += time.perf_counter() - t0
            for future in done:
                results_per_row, seconds = future.result()  # _search_round never raises
                self.timing["search_s"] += seconds
                self._continue(rows, [(s, out, self._tool_text(rows[self.episode_at[s]], results))
                                      for (s, out), results in zip(in_flight.pop(future), results_per_row)])

    def _runnable(self) -> list[int]:
        """Rows the next decode call advances (not those waiting for cache room)."""
        blocked = set(self.sampler.blocked_rows())
        return [r for r in self.sampler.decoding_rows() if r not in blocked]

    def _admit(self, rows: list[_Row], freed: list[int]) -> None:
        """Free the slots of ended episodes and start waiting episodes in them (one prefill)."""
        for s in freed:
            self.episode_at[s] = None
        slots = freed[:len(self.waiting)]
        if freed[len(slots):]:  # no episode waits for these: their slots become holes that compaction
            self.sampler.release(freed[len(slots):])  # reclaims (an ended row must not set the cursor)
        if not slots:
            return
        episodes = [self.waiting.popleft() for _ in slots]
        for s, e in zip(slots, episodes):
            self.episode_at[s] = e
        t0 = time.perf_counter()
        self.sampler.restart(slots, [rows[e].tokens for e in episodes], [self.seeds[e] for e in episodes],
                             self.config.max_new_tokens)
        self.timing["decode_s"] += time.perf_counter() - t0

    def _after_turn(self, row: _Row, out: RowOutput) -> _Next:
        turn = row.add_turn(out)
        text = self.config.prefix(turn) + self.tokenizer.decode(out.tokens, skip_special_tokens=True)
        row.turn_texts.append(text)
        if out.finish_reason == FINISH_CONTEXT:
            return _Next(finish=CONTEXT)
        action = parse_action(text, self.config.dialect, self.limits)
        if isinstance(action, Answer):
            return _Next(finish=ANSWER)
        if isinstance(action, FormatError):
            row.format_errors += 1
            if self.config.format_error_ends_episode:
                return _Next(finish=LENGTH if out.finish_reason == FINISH_LENGTH else FORMAT_ERROR)
        if turn + 1 >= self.config.max_turns:
            return _Next(finish=MAX_TURNS)
        if isinstance(action, ToolCall):
            row.tool_calls += 1
            return _Next(queries=action.queries)
        return _Next(feedback=format_error_feedback(action.reason, self.config.dialect))

    def _tool_text(self, row: _Row, results: list[SearchResult]) -> str:
        row.searches += len(results)
        row.failures += sum(not result.ok for result in results)
        row.retrieved[len(row.turn_starts) - 1] = tuple(hit.url for result in results for hit in result.hits)
        return format_results(results, budget=self.config.max_tool_tokens, measure=lambda s: len(self.encode(s)))

    def _continue(self, rows: list[_Row], items: list[tuple[int, RowOutput, str]]) -> None:
        """Append each row's continuation (tool text, next header, forced prefix) and resume it."""
        if not items:
            return
        ids = [s for s, _, _ in items]
        continuations = [self._continuation(out, text, len(rows[self.episode_at[s]].turn_starts))
                         for s, out, text in items]
        t0 = time.perf_counter()
        self.sampler.append(ids, continuations, self.config.max_new_tokens)
        self.timing["decode_s"] += time.perf_counter() - t0
        decoding = set(self.sampler.decoding_rows())
        for s, tokens in zip(ids, continuations):
            row = rows[self.episode_at[s]]
            if s in decoding:
                row.add_context(tokens)
            else:  # the continuation did not fit in the cache: it was never fed, so it is not recorded
                row.finish = CONTEXT  # (the sampler reports the row next; its slot is freed then)
                self.on_progress(0, 1)

    def _continuation(self, out: RowOutput, tool_text: str, next_turn: int) -> list[int]:
        prefix = self.config.prefix(next_turn)
        closed = bool(out.tokens) and out.tokens[-1] in self.stop_ids  # the model ended its message itself
        if self.config.dialect == "search_tags":
            if not closed:  # the result goes inline, inside the same assistant message
                return self.encode(information_block(tool_text) + prefix)
            # after its end token the text would stand outside any message: the result (format
            # feedback: a search turn stops at </search> first) comes as the template's tool message,
            # then a new assistant message opens
            tool_text = information_block(tool_text).strip()
        if self.frame is None:
            self.frame = chat_frame(self.tokenizer)
        after_call = self.frame.after_call
        if closed:
            # that token is already in the row (it is fed as the pending token), so the template's
            # copy of it must not be appended again
            emitted = self.tokenizer.decode(out.tokens[-1:])
            if after_call.startswith(emitted):
                after_call = after_call[len(emitted):]
        return self.encode(after_call + tool_text + self.frame.after_result + prefix)


def _search_round(search: SearchLike, batches: list[tuple[str, ...]]) -> tuple[list[list[SearchResult]], float]:
    """One concurrent search round in a worker thread; a client that raises becomes error results."""
    t0 = time.perf_counter()
    try:
        results = search.search_many([list(b) for b in batches])
        if len(results) != len(batches) or any(len(r) != len(b) for r, b in zip(results, batches)):
            raise ValueError("search_many returned a different number of results than queries")
    except Exception as error:  # never let a back-end bug crash the step (DESIGN: reliability)
        reason = f"{type(error).__name__}: {error}"[:300]
        results = [[SearchResult(q, error=reason) for q in batch] for batch in batches]
    return results, time.perf_counter() - t0


# ----------------------------------------------------------------------------- output

def _trajectories(rows: list[_Row], tokenizer, max_turns: int) -> Trajectories:
    n, length = len(rows), max(len(r.tokens) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((n, length), pad, np.int32)
    valid, loss = np.zeros((n, length), bool), np.zeros((n, length), bool)
    turn_id = np.full((n, length), -1, np.int32)
    logps = np.zeros((n, length), np.float32)
    turn_start = np.full((n, max_turns), -1, np.int32)
    for i, r in enumerate(rows):
        k = len(r.tokens)
        tokens[i, :k], valid[i, :k], loss[i, :k] = r.tokens, True, r.loss
        turn_id[i, :k], logps[i, :k] = r.turn_ids, r.logps
        # a row that never decoded (its prompt did not fit) still has its one, empty, turn
        turn_start[i, :max(1, len(r.turn_starts))] = r.turn_starts or [k]
    episodes = tuple(_episode(r, tokenizer) for r in rows)
    return Trajectories(tokens, valid, loss, turn_id, turn_start,
                        np.asarray([max(1, len(r.turn_starts)) for r in rows], np.int32),
                        np.asarray([r.group for r in rows], np.int32), logps, episodes)


def _episode(row: _Row, tokenizer) -> Episode:
    final = row.turn_texts[-1] if row.turn_texts else ""
    return Episode(question_index=row.example.index, golden_answers=tuple(row.example.golden_answers),
                   data_source=row.example.data_source,
                   response_text=tokenizer.decode(row.tokens[row.response_start:], skip_special_tokens=False),
                   final_turn_text=final, answer=extract_answer(final), finish_reason=row.finish or CONTEXT,
                   num_searches=row.searches, search_failures=row.failures,
                   supporting_doc_ids=tuple(row.example.supporting_doc_ids),
                   retrieved_ids_per_turn=tuple(row.retrieved.get(t) for t in range(len(row.turn_starts))),
                   policy_text="\n".join(row.turn_texts))


def _stats(rows: list[_Row], timing: dict[str, float]) -> dict[str, float]:
    def mean(values):
        return float(np.mean(values)) if values else 0.0

    stats = {
        "rollout/turns_per_episode": mean([len(r.turn_starts) for r in rows]),
        "rollout/tool_calls_per_episode": mean([r.tool_calls for r in rows]),
        "rollout/searches_per_episode": mean([r.searches for r in rows]),
        "rollout/search_failures_per_episode": mean([r.failures for r in rows]),
        "rollout/format_errors_per_episode": mean([r.format_errors for r in rows]),
        "rollout/generated_tokens_per_episode": mean([sum(r.loss) for r in rows]),
        "rollout/length_per_episode": mean([len(r.tokens) for r in rows]),
    }
    for reason in (ANSWER, MAX_TURNS, CONTEXT, LENGTH, FORMAT_ERROR):
        stats[f"rollout/finish_{reason}"] = mean([r.finish == reason for r in rows])
    stats.update({f"rollout/{name}": float(seconds) for name, seconds in timing.items()})
    return stats


def row_seeds(seed: int, num_rows: int, round_index: int = 0) -> list[int]:
    """The sampling seed of each of `num_rows` rows for a batch seeded with `seed`. A multi-host
    run computes them for the global batch and gives each process its rows' slice, so that a row
    samples the same tokens whichever process runs it. `round_index` > 0: the seeds of a step's
    extra generation round (dynamic sampling), distinct from its first round's (which keep the
    seeds of a run without extra rounds) and from each other."""
    if round_index < 0:
        raise ValueError(f"round_index={round_index} must be ≥ 0")
    entropy = [seed, num_rows] + ([round_index] if round_index else [])
    return np.random.SeedSequence(entropy).generate_state(num_rows).tolist()


def rollout(examples: Sequence[Example], group_size: int, sampler: SamplerLike, tokenizer, search: SearchLike,
            config: RolloutConfig, seed: int = 0, seeds: Sequence[int] | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> tuple[Trajectories, dict[str, float]]:
    """G = `group_size` episodes per example (rows i·G … i·G+G−1 share group id i).

    `seed` fixes every row's sampling key (pass e.g. the training step); `seeds`, when given, are
    the rows' own seeds instead (one per row, e.g. a slice of `row_seeds` for the global batch of
    a multi-host run). `on_progress(turns, episodes)`, when given, hears each batch of turns that
    ended and of episodes that finished with them, as they happen (progress bars). Returns the trajectories
    and float stats: per-episode means of turns, tool calls, searches (queries sent), search
    failures (queries answered with an error), format errors; finish-reason fractions; seconds
    spent decoding (including appends), searching (sum over rounds) and waiting for searches.
    """
    if not examples or group_size < 1:
        raise ValueError(f"need at least one example and group_size ≥ 1 (got {len(examples)}, {group_size})")
    run = _Rollout(sampler, tokenizer, search, config, on_progress)
    rows = run.run(examples, group_size, row_seeds(seed, len(examples) * group_size) if seeds is None else seeds)
    return _trajectories(rows, tokenizer, config.max_turns), _stats(rows, run.timing)
