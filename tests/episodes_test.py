"""Multi-turn rollouts: the row is the rendered chat, sampled log-probs equal a teacher-forced
forward of the final row, tool text is never loss-masked, both dialects, finishes and failures.

A tiny random Llama with SmolLM2's real tokenizer (vocab 49152) makes text parsing real. A random
model never closes a tag, so the real-Sampler tests exercise the format-error path end to end,
and `ScriptedSampler` (same interface, log-probs from a full forward) drives searches and answers.
"""

from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from igpo_jax.rollout.prompts import format_error_feedback, information_block, render_system_prompt
from igpo_jax.rollout.episodes import RolloutConfig, chat_frame, make_sampler, rollout
from igpo_jax.data.examples import Example, Message
from igpo_jax.model.qwen import forward_padded
from igpo_jax.model.weights import load_hf
from igpo_jax.rollout.sampler import FINISH_LENGTH, FINISH_STOP, RowOutput, SamplingParams
from igpo_jax.search.clients import BlockingSearchClient, MockSearchClient, SearchResult
from tests.conftest import write_tiny_hf_model

TODAY = "2026-01-01"
QUESTIONS = [Example("q0", "world", "Who founded Valdoria?", ("Kel",), (Message("user", "Who founded Valdoria?"),),
                     "test"),
             Example("q1", "world", "Where was Ana born?", ("Orlo",), (Message("user", "Where was Ana born?"),),
                     "test")]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_smollm2_vocab")
    write_tiny_hf_model("llama", path, vocab_size=49152, tie_word_embeddings=True)
    return load_hf(str(path))


@pytest.fixture(scope="module")
def mock_search():
    with BlockingSearchClient(MockSearchClient()) as client:
        yield client


@nnx.jit
def _next_token_logprobs(model, tokens_BL, valid_BL):
    logp = jax.nn.log_softmax(forward_padded(model, tokens_BL, valid_BL), axis=-1)
    return jnp.take_along_axis(logp[:, :-1], tokens_BL[:, 1:, None], axis=-1)[..., 0]


def _teacher_forced_logprobs(model, tokens_L):
    """log p(token p | tokens[:p]) from one plain forward (right-padded to 128s: few compilations)."""
    width = -(-len(tokens_L) // 128) * 128
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(tokens_L)] = tokens_L
    valid = np.arange(width)[None] < len(tokens_L)
    logp = np.asarray(_next_token_logprobs(model, jnp.asarray(tokens), jnp.asarray(valid)))[0]
    return np.concatenate([[0.0], logp[:len(tokens_L) - 1]])


class ScriptedSampler:
    """The Sampler interface with scripted turns: row r's k-th segment is encode(scripts[r][k]),
    cut at the budget; log-probs come from a full forward over the row's history (what a cache
    holding exactly the rollout's tokens would give)."""

    def __init__(self, model, tokenizer, scripts: list[list[str]]):
        self.model, self.tokenizer, self.scripts = model, tokenizer, scripts
        self.batch_size = len(scripts)
        self.history: list[list[int]] = []
        self.released: list[int] = []

    def start(self, prompts, seeds, max_new_tokens):
        self.history = [list(p) for p in prompts]
        self.turn = [0] * len(prompts)
        self.budget = [max_new_tokens] * len(prompts)
        self.decoding = set(range(len(prompts)))

    def append(self, row_ids, tokens, max_new_tokens):
        for r, toks in zip(row_ids, tokens):
            assert r not in self.decoding
            self.history[r] += list(toks)
            self.budget[r] = max_new_tokens
            self.decoding.add(r)

    def decoding_rows(self):
        return sorted(self.decoding)

    def blocked_rows(self):
        return []

    def release(self, row_ids):
        self.released += list(row_ids)

    def decode(self):
        row = min(self.decoding)  # one row per call, so rows stop in different calls
        script = self.scripts[row]
        text = script[self.turn[row]] if self.turn[row] < len(script) else "<|im_end|>"
        segment = self.tokenizer.encode(text, add_special_tokens=False)
        reason = FINISH_LENGTH if len(segment) > self.budget[row] else FINISH_STOP
        segment = segment[:self.budget[row]]
        start = len(self.history[row])
        self.history[row] += segment
        logps = _teacher_forced_logprobs(self.model, self.history[row])[start:].tolist()
        self.turn[row] += 1
        self.decoding.discard(row)
        return {row: RowOutput(segment, logps, reason)}


class RaisingSearch:
    def search_many(self, batches):
        raise RuntimeError("back-end exploded")


class ErrorSearch:
    def __init__(self):
        self.batches = []

    def search_many(self, batches):
        self.batches += batches
        return [[SearchResult(q, error="HTTP 503 after 3 retries") for q in batch] for batch in batches]


def _check_rows(model, traj, sampler_history=None):
    """Loss mask = turn tokens; log-probs = teacher-forced forward; turn ids/starts agree."""
    for i in range(traj.num_rollouts):
        n = int(traj.valid_NL[i].sum())
        assert traj.valid_NL[i, :n].all() and not traj.valid_NL[i, n:].any()
        tokens = traj.tokens_NL[i, :n].tolist()
        if sampler_history is not None:
            assert tokens == sampler_history[i]
        loss = traj.loss_mask_NL[i, :n]
        np.testing.assert_array_equal(loss, traj.turn_id_NL[i, :n] >= 0)
        expected = _teacher_forced_logprobs(model, tokens)
        np.testing.assert_allclose(traj.sampled_logprob_NL[i, :n][loss], expected[loss], atol=1e-4)
        assert (traj.sampled_logprob_NL[i, :n][~loss] == 0).all()
        turns = int(traj.num_turns_N[i])
        starts = traj.turn_start_NT[i]
        assert (starts[turns:] == -1).all() and (np.diff(starts[:turns]) > 0).all()
        for t in range(turns):
            positions = np.flatnonzero(traj.turn_id_NL[i] == t)
            if len(positions):
                assert positions[0] == starts[t] and (np.diff(positions) == 1).all()


def _turn_tokens(traj, i, t):
    return traj.tokens_NL[i][traj.turn_id_NL[i] == t].tolist()


def _system(dialect):
    return render_system_prompt(dialect, today=TODAY)


# ----------------------------------------------------------------------------- rendering

def test_chat_frame_is_derived_from_the_template(smollm2_tokenizer):
    frame = chat_frame(smollm2_tokenizer)
    assert frame.assistant_header == "<|im_start|>assistant\n"
    assert frame.after_call == "<|im_end|>\n<|im_start|>tool\n"
    assert frame.after_result == "<|im_end|>\n<|im_start|>assistant\n"
    assert frame.tool_role == "tool"
    no_tools = copy.copy(smollm2_tokenizer)
    no_tools.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool') }}"
                              "{% endif %}[{{ m['role'] }}]{{ m['content'] }}[/]{% endfor %}"
                              "{% if add_generation_prompt %}[assistant]{% endif %}")
    frame = chat_frame(no_tools)
    assert (frame.tool_role, frame.after_call, frame.after_result) == ("user", "[/][user]", "[/][assistant]")


def test_example_turns_are_chat_turns_between_the_system_prompt_and_the_question(smollm2_tokenizer):
    from igpo_jax.rollout.episodes import _Rollout

    tok = smollm2_tokenizer
    examples = (("Where was Ilsa born?", "<search> Ilsa </search><answer> Korvath </answer>"),
                ("Who founded Pemdo?", "<answer> Osk </answer>"))
    config = RolloutConfig(dialect="search_tags", today=TODAY, first_turn_prefix="<search>", example_turns=examples)
    tokens, start = _Rollout(None, tok, None, config).prompt_tokens(QUESTIONS[0])
    messages = [{"role": "system", "content": _system("search_tags")}]
    for question, response in examples:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
    messages.append({"role": "user", "content": QUESTIONS[0].question})
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.decode(tokens) == expected + "<search>" and tok.decode(tokens[:start]) == expected
    # a data file's own system prompt stays first, the examples follow it
    own = Example("q2", "world", "Q?", ("A",), (Message("system", "Be brief."), Message("user", "Q?")), "test")
    tokens, _ = _Rollout(None, tok, None, config).prompt_tokens(own)
    assert tok.decode(tokens) == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + messages[1:-1] + [{"role": "user", "content": "Q?"}],
        tokenize=False, add_generation_prompt=True) + "<search>"
    with pytest.raises(ValueError, match="example_turns must be"):
        RolloutConfig(example_turns=(("a question", ""),))
    with pytest.raises(ValueError, match="example_turns must be"):
        RolloutConfig(example_turns=(("a question",),))
    from igpo_jax import config_base  # a config's malformed examples are refused before any model loads

    c = config_base.base_config()
    c.data.synthetic_world = True
    c.rollout.example_turns = ("a question, no response",)
    with pytest.raises(ValueError, match=r"config.rollout.example_turns must be \(question, assistant response\)"):
        config_base.validate(c)


# ----------------------------------------------------------------------------- the real sampler

@pytest.mark.parametrize("dialect", ["qwen_tool_call", "search_tags"])
def test_real_sampler_rows_are_the_rendered_chat_and_logprobs_match_a_full_forward(
        tiny_llama, smollm2_tokenizer, mock_search, dialect):
    tok = smollm2_tokenizer
    prefix = "<think>" if dialect == "qwen_tool_call" else "<search>"
    config = RolloutConfig(dialect=dialect, today=TODAY, forced_prefix=prefix, max_turns=3, max_new_tokens=6,
                           cache_size=1024, sampling=SamplingParams(temperature=1.0), steps_per_call=4)
    traj, stats = rollout(QUESTIONS, 2, make_sampler(tiny_llama, tok, config, 4), tok, mock_search, config, seed=3)
    _check_rows(tiny_llama, traj)
    np.testing.assert_array_equal(traj.group_id_N, [0, 0, 1, 1])
    # a random model never closes a tag: every turn is a format error fed back as the tool result
    assert (traj.num_turns_N == 3).all() and {e.finish_reason for e in traj.episodes} == {"max_turns"}
    assert stats["rollout/format_errors_per_episode"] == 3 and stats["rollout/searches_per_episode"] == 0
    assert stats["rollout/decode_s"] > 0
    for i, episode in enumerate(traj.episodes):
        example = QUESTIONS[i // 2]
        turn_texts = [tok.decode(_turn_tokens(traj, i, t)) for t in range(3)]
        assert episode.final_turn_text == prefix + tok.decode(_turn_tokens(traj, i, 2), skip_special_tokens=True)
        feedback = [format_error_feedback(parse_reason(prefix + text, dialect), dialect) for text in turn_texts[:2]]
        messages = [{"role": "system", "content": _system(dialect)}, {"role": "user", "content": example.question}]
        if dialect == "qwen_tool_call":
            for text, fb in zip(turn_texts[:2], feedback):
                messages += [{"role": "assistant", "content": prefix + text}, {"role": "tool", "content": fb}]
            expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            expected += "".join(prefix + text + information_block(fb) for text, fb in zip(turn_texts[:2], feedback))
        expected += prefix + turn_texts[2]
        n = int(traj.valid_NL[i].sum())
        assert tok.decode(traj.tokens_NL[i, :n].tolist()) == expected
        for t in range(3):  # the context of every turn ends with the header (or tool text) and the prefix
            context = tok.decode(traj.tokens_NL[i, :traj.turn_start_NT[i, t]].tolist())
            assert context.endswith(("<|im_start|>assistant\n" if dialect == "qwen_tool_call" or t == 0
                                     else "</information>\n\n") + prefix)
            if t:
                tool_positions = np.arange(traj.turn_start_NT[i, t - 1] + 6, traj.turn_start_NT[i, t])
                assert not traj.loss_mask_NL[i, tool_positions].any()
                assert feedback[t - 1] in tok.decode(traj.tokens_NL[i, tool_positions].tolist())


def parse_reason(text, dialect):
    from igpo_jax.rollout.parse import parse_action

    return parse_action(text, dialect).reason


def test_context_overflow_ends_the_episode_cleanly(tiny_llama, smollm2_tokenizer, mock_search):
    tok = smollm2_tokenizer
    config = RolloutConfig(dialect="search_tags", today=TODAY, max_turns=4, max_new_tokens=6, cache_size=1,
                           steps_per_call=4)
    prompt_len = len(tok.encode(tok.apply_chat_template(
        [{"role": "system", "content": _system("search_tags")}, {"role": "user", "content": QUESTIONS[0].question}],
        tokenize=False, add_generation_prompt=True) + "<think>", add_special_tokens=False))
    # room for the prompt and one turn, not for the feedback that follows. The group's one distinct
    # prompt is prefilled apart (shared prefill) and takes its length rounded to a quarter octave
    from igpo_jax.rollout.buckets import quarter_octave

    prefill_width = min(1 << (prompt_len - 2).bit_length(), quarter_octave(prompt_len - 1, 16))
    config = RolloutConfig(**{**config.__dict__, "cache_size": prefill_width + 24})
    traj, stats = rollout(QUESTIONS[:1], 2, make_sampler(tiny_llama, tok, config, 2), tok, mock_search, config)
    _check_rows(tiny_llama, traj)
    assert [e.finish_reason for e in traj.episodes] == ["context", "context"]
    assert stats["rollout/finish_context"] == 1.0
    # the turn whose feedback did not fit is the last one: no empty turn after it, which would make
    # it a non-final turn with an information gain and put the outcome on a turn of no tokens
    np.testing.assert_array_equal(traj.num_turns_N, [1, 1])
    assert all(len(_turn_tokens(traj, i, 0)) > 0 for i in range(2))


# ----------------------------------------------------------------------------- scripted policies

QWEN_CALL = 'plan</think>\n<tool_call>\n{"name": "web_search", "arguments": {"query": ["Valdoria founder"]}}\n</tool_call>'
QWEN_ANSWER = "found it</think>\n<answer>Kel</answer>"


def test_qwen_search_then_answer_renders_exactly_the_chat(tiny_llama, smollm2_tokenizer, mock_search):
    tok = smollm2_tokenizer
    config = RolloutConfig(today=TODAY, max_turns=4, max_new_tokens=64)
    sampler = ScriptedSampler(tiny_llama, tok, [[QWEN_CALL, QWEN_ANSWER], [QWEN_ANSWER]])
    traj, stats = rollout(QUESTIONS[:1], 2, sampler, tok, mock_search, config)
    _check_rows(tiny_llama, traj, sampler.history)
    searched, direct = traj.episodes
    assert (searched.finish_reason, searched.answer, searched.num_searches, searched.search_failures) == (
        "answer", "Kel", 1, 0)
    assert (direct.finish_reason, direct.answer, direct.num_searches) == ("answer", "Kel", 0)
    # the ids of the documents each turn's search returned (the mock's links); None: no search
    assert searched.retrieved_ids_per_turn[1] is None and direct.retrieved_ids_per_turn == (None,)
    hits = searched.retrieved_ids_per_turn[0]
    assert len(hits) == mock_search.client.options.top_k and all(h.startswith("mock://") for h in hits)
    np.testing.assert_array_equal(traj.num_turns_N, [2, 1])
    np.testing.assert_array_equal(traj.turn_start_NT[1, 1:], [-1, -1, -1])
    tool_text = 'Results for "Valdoria founder":\n1. Mock page 1 for Valdoria founder'
    messages = [{"role": "system", "content": _system("qwen_tool_call")},
                {"role": "user", "content": QUESTIONS[0].question},
                {"role": "assistant", "content": "<think>" + QWEN_CALL}]
    row = tok.decode(traj.tokens_NL[0, :int(traj.valid_NL[0].sum())].tolist())
    tool_message = row[row.index("<|im_start|>tool\n") + len("<|im_start|>tool\n"):row.index("<|im_end|>\n<|im_start|>assistant\n<think>found")]
    assert tool_message.startswith(tool_text)
    messages.append({"role": "tool", "content": tool_message})
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "<think>" + QWEN_ANSWER
    assert row == expected
    assert traj.tokens_NL[0, :int(traj.valid_NL[0].sum())].tolist() == tok.encode(expected, add_special_tokens=False)
    assert tool_text in searched.response_text and searched.response_text.startswith("<think>plan")
    assert stats["rollout/searches_per_episode"] == 0.5 and stats["rollout/finish_answer"] == 1.0


def test_a_turn_that_closes_its_message_does_not_get_a_second_end_token(tiny_llama, smollm2_tokenizer, mock_search):
    tok = smollm2_tokenizer
    config = RolloutConfig(today=TODAY, max_turns=2, max_new_tokens=64)
    sampler = ScriptedSampler(tiny_llama, tok, [[QWEN_CALL + "<|im_end|>", QWEN_ANSWER]])
    traj, _ = rollout(QUESTIONS[:1], 1, sampler, tok, mock_search, config)
    _check_rows(tiny_llama, traj, sampler.history)
    row = tok.decode(traj.tokens_NL[0, :int(traj.valid_NL[0].sum())].tolist())
    assert "</tool_call><|im_end|>\n<|im_start|>tool\n" in row and row.count("<|im_end|>") == 4
    assert traj.episodes[0].answer == "Kel"


def test_search_tags_search_then_answer(tiny_llama, smollm2_tokenizer, mock_search):
    tok = smollm2_tokenizer
    config = RolloutConfig(dialect="search_tags", today=TODAY, forced_prefix="", first_turn_prefix="<search>",
                           max_turns=3, max_new_tokens=32)
    sampler = ScriptedSampler(tiny_llama, tok, [["Valdoria founder</search>", "<answer>Kel</answer>"],
                                                ["Ana birthplace</search>", "<search>Ana Orlo</search>", "<answer>Orlo</answer>"]])
    traj, stats = rollout(QUESTIONS, 1, sampler, tok, mock_search, config)
    _check_rows(tiny_llama, traj, sampler.history)
    assert [e.answer for e in traj.episodes] == ["Kel", "Orlo"]
    assert [e.num_searches for e in traj.episodes] == [1, 2]
    np.testing.assert_array_equal(traj.num_turns_N, [2, 3])
    context = tok.decode(traj.tokens_NL[1, :traj.turn_start_NT[1, 2]].tolist())
    assert '<search>Ana Orlo</search>\n\n<information>Results for "Ana Orlo":\n1. Mock page 1 for Ana Orlo' in context
    assert context.endswith("</information>\n\n")
    assert "<|im_start|>" not in tok.decode(traj.tokens_NL[1, traj.turn_start_NT[1, 0]:].tolist())  # one message
    assert stats["rollout/turns_per_episode"] == 2.5


def test_free_turns_answer_after_one_two_or_three_searches_and_the_last_turn_is_forced(
        tiny_llama, smollm2_tokenizer, mock_search):
    """Free turns (forced_prefix ''): each rollout decides after a search whether to search again or
    answer; only the last allowed turn (max_turns − 1) is forced to open <answer>."""
    tok = smollm2_tokenizer
    config = RolloutConfig(dialect="search_tags", today=TODAY, forced_prefix="", first_turn_prefix="<search>",
                           last_turn_prefix="<answer>", max_turns=4, max_new_tokens=32)
    sampler = ScriptedSampler(tiny_llama, tok, [
        ["Valdoria</search>", "<answer>Kel</answer>"],
        ["Valdoria</search>", "<search>Valdoria founder</search>", "<answer>Kel</answer>"],
        ["Valdoria</search>", "<search>Kelmark</search>", "<search>Kel</search>", " Kel</answer>"]])
    traj, _ = rollout(QUESTIONS[:1], 3, sampler, tok, mock_search, config)
    _check_rows(tiny_llama, traj, sampler.history)
    assert [e.num_searches for e in traj.episodes] == [1, 2, 3]
    np.testing.assert_array_equal(traj.num_turns_N, [2, 3, 4])
    assert [(e.answer, e.finish_reason) for e in traj.episodes] == [("Kel", "answer")] * 3
    context = lambda i, t: tok.decode(traj.tokens_NL[i, :traj.turn_start_NT[i, t]].tolist())
    assert context(0, 0).endswith("<search>")  # the first turn is forced to search
    for i, t in ((0, 1), (1, 1), (1, 2), (2, 1), (2, 2)):  # free: nothing forced after a result
        assert context(i, t).endswith("</information>\n\n"), (i, t)
    assert context(2, 3).endswith("</information>\n\n<answer>")  # its turns ran out: it must answer
    assert traj.episodes[2].final_turn_text == "<answer> Kel</answer>"


def test_a_last_turn_prefix_that_is_also_the_first_turn_is_refused():
    with pytest.raises(ValueError, match=r"both name turn 0 when max_turns=1: allow at least 2 turns"):
        RolloutConfig(dialect="search_tags", first_turn_prefix="<search>", last_turn_prefix="<answer>", max_turns=1)
    assert RolloutConfig(dialect="search_tags", last_turn_prefix="<answer>", max_turns=1).prefix(0) == "<answer>"
    turns = RolloutConfig(dialect="search_tags", forced_prefix="<think>", first_turn_prefix="<search>",
                          last_turn_prefix="<answer>", max_turns=3)
    assert [turns.prefix(t) for t in range(3)] == ["<search>", "<think>", "<answer>"]


def test_max_turns_is_respected_and_the_last_call_is_not_searched(tiny_llama, smollm2_tokenizer):
    tok = smollm2_tokenizer
    config = RolloutConfig(today=TODAY, max_turns=2, max_new_tokens=64)
    search = ErrorSearch()
    sampler = ScriptedSampler(tiny_llama, tok, [[QWEN_CALL, QWEN_CALL, QWEN_CALL]])
    traj, stats = rollout(QUESTIONS[:1], 1, sampler, tok, search, config)
    _check_rows(tiny_llama, traj, sampler.history)
    assert traj.episodes[0].finish_reason == "max_turns" and traj.num_turns_N[0] == 2
    assert traj.episodes[0].answer is None
    assert search.batches == [["Valdoria founder"]]  # one round: the second turn's call was not run
    # a failing back-end becomes error text in the tool message and is counted
    assert traj.episodes[0].search_failures == 1 and stats["rollout/search_failures_per_episode"] == 1
    assert 'Search for "Valdoria founder" failed: HTTP 503 after 3 retries' in traj.episodes[0].response_text


def test_a_raising_search_client_becomes_error_results(tiny_llama, smollm2_tokenizer):
    tok = smollm2_tokenizer
    config = RolloutConfig(today=TODAY, max_turns=3, max_new_tokens=64)
    sampler = ScriptedSampler(tiny_llama, tok, [[QWEN_CALL, QWEN_ANSWER]] * 2)
    traj, _ = rollout(QUESTIONS[:1], 2, sampler, tok, RaisingSearch(), config)
    _check_rows(tiny_llama, traj, sampler.history)
    for episode in traj.episodes:
        assert (episode.finish_reason, episode.answer, episode.num_searches, episode.search_failures) == (
            "answer", "Kel", 1, 1)
        assert "failed: RuntimeError: back-end exploded" in episode.response_text


def test_format_error_feedback_costs_a_turn_or_ends_the_episode(tiny_llama, smollm2_tokenizer, mock_search):
    tok = smollm2_tokenizer
    scripts = [["no tags at all", QWEN_ANSWER]]
    feedback = RolloutConfig(today=TODAY, max_turns=3, max_new_tokens=64)
    traj, stats = rollout(QUESTIONS[:1], 1, ScriptedSampler(tiny_llama, tok, scripts), tok, mock_search, feedback)
    assert (traj.episodes[0].finish_reason, traj.episodes[0].answer, int(traj.num_turns_N[0])) == ("answer", "Kel", 2)
    assert "Your last turn could not be run: unbalanced tags: <think> is never closed" in traj.episodes[0].response_text
    assert stats["rollout/format_errors_per_episode"] == 1
    ends = RolloutConfig(today=TODAY, max_turns=3, max_new_tokens=64, format_error_ends_episode=True)
    traj, _ = rollout(QUESTIONS[:1], 1, ScriptedSampler(tiny_llama, tok, scripts), tok, mock_search, ends)
    assert (traj.episodes[0].finish_reason, int(traj.num_turns_N[0])) == ("format_error", 1)
    truncated = RolloutConfig(today=TODAY, max_turns=3, max_new_tokens=4, format_error_ends_episode=True)
    traj, _ = rollout(QUESTIONS[:1], 1, ScriptedSampler(tiny_llama, tok, [[QWEN_CALL]]), tok, mock_search, truncated)
    assert traj.episodes[0].finish_reason == "length" and int(traj.loss_mask_NL[0].sum()) == 4


class SlowSearch:
    def __init__(self, delay_s):
        self.delay_s = delay_s

    def search_many(self, batches):
        time.sleep(self.delay_s)
        return [[SearchResult(q) for q in batch] for batch in batches]


def test_other_rows_keep_decoding_while_a_search_runs(tiny_llama, smollm2_tokenizer):
    tok = smollm2_tokenizer
    # row 0 searches first; row 1 needs five decode calls of its own meanwhile
    scripts = [[QWEN_CALL, QWEN_ANSWER], ["a</think>x", "b</think>x", "c</think>x", "d</think>x", QWEN_ANSWER]]
    config = RolloutConfig(today=TODAY, max_turns=5, max_new_tokens=64)
    sampler = ScriptedSampler(tiny_llama, tok, scripts)
    traj, stats = rollout(QUESTIONS[:1], 2, sampler, tok, SlowSearch(1.0), config)
    assert [e.finish_reason for e in traj.episodes] == ["answer", "answer"]
    assert stats["rollout/search_s"] >= 1.0
    assert stats["rollout/search_wait_s"] < stats["rollout/search_s"]  # part of the search overlapped decoding


# ----------------------------------------------------------------------------- bounded concurrency

def _chatty_stopper(model, tokenizer, strength=16.0):
    """A copy of `model` whose end-of-turn token is likely at every step (tied embeddings: its
    row is scaled up), so turns, and hence episodes, end after random numbers of tokens."""
    from igpo_jax.model.tokenizer import stop_token_ids

    model = nnx.clone(model)
    embed = model.embed[...]
    for t in stop_token_ids(tokenizer):
        embed = embed.at[t].multiply(strength / (0.02 * np.sqrt(embed.shape[1])))
    model.embed[...] = embed
    return model


@pytest.mark.parametrize("max_concurrent_rows,params", [(2, SamplingParams(temperature=1.0, top_k=8)),
                                                          (3, SamplingParams(temperature=1.0, top_k=8)),
                                                          (2, SamplingParams(temperature=0.0))])
def test_concurrency_bounded_rollout_gives_the_unbounded_trajectories(tiny_llama, smollm2_tokenizer, mock_search,
                                                                     max_concurrent_rows, params, monkeypatch):
    """6 episodes through 2 or 3 cache rows, refilled as episodes end, equal all 6 at once: the
    same tokens, finishes and searches; log-probs up to float rounding (other batch sizes and slot
    layouts round differently, ~1e-6). Rounding can still flip a draw that lands on a boundary of
    the inverse CDF: with plain temperature-1 sampling over this random model's ~49k near-equal
    probabilities that happened within ~100 draws, hence top-k (or greedy) here."""
    from igpo_jax.rollout import sampler as sampler_lib

    tok = smollm2_tokenizer
    model = _chatty_stopper(tiny_llama, tok)
    questions = QUESTIONS + [Example("q2", "world", "Which river runs through Kesh?", ("Amu",),
                                     (Message("user", "Which river runs through Kesh?"),), "test")]
    base = dict(dialect="search_tags", today=TODAY, forced_prefix="", first_turn_prefix="<search>Kesh river</search>",
                max_turns=3, max_new_tokens=10, max_tool_tokens=32, sampling=params,
                steps_per_call=4, overlap_search=False)
    unbounded = RolloutConfig(cache_size=1024, **base)
    ref, _ = rollout(questions, 2, make_sampler(model, tok, unbounded, 6), tok, mock_search, unbounded, seed=5)
    compactions, real = [], sampler_lib._compact_call
    monkeypatch.setattr(sampler_lib, "_compact_call", lambda c: compactions.append(1) or real(c))
    # the shared cursor sits at the longest row, so a restarted prompt (< 160 slots) needs room
    # above it; without compaction the cursor would pass the end with the second wave of episodes
    longest = int(ref.valid_NL.sum(1).max())
    bounded = RolloutConfig(cache_size=longest + 160, max_concurrent_rows=max_concurrent_rows, **base)
    sampler = make_sampler(model, tok, bounded, 6)
    assert sampler.batch_size == max_concurrent_rows
    traj, stats = rollout(questions, 2, sampler, tok, mock_search, bounded, seed=5)
    assert compactions
    assert len({int(n) for n in ref.valid_NL.sum(1)}) > 1  # episodes of different lengths: rows freed at different times
    assert {e.finish_reason for e in ref.episodes} != {"context"} and any(e.num_searches for e in ref.episodes)
    for name in ("tokens_NL", "valid_NL", "loss_mask_NL", "turn_id_NL", "turn_start_NT", "num_turns_N", "group_id_N"):
        np.testing.assert_array_equal(getattr(traj, name), getattr(ref, name), err_msg=name)
    np.testing.assert_allclose(traj.sampled_logprob_NL, ref.sampled_logprob_NL, atol=1e-5)
    assert [(e.finish_reason, e.num_searches, e.response_text) for e in traj.episodes] == \
        [(e.finish_reason, e.num_searches, e.response_text) for e in ref.episodes]
    _check_rows(model, traj)


def test_max_concurrent_rows_must_not_be_negative():
    with pytest.raises(ValueError, match="max_concurrent_rows"):
        RolloutConfig(max_concurrent_rows=-1)


def test_config_keys_reach_the_rollout_and_are_validated():
    from igpo_jax import components, config_base
    from configs.demo import get_config

    config = get_config()
    config.rollout.max_concurrent_rows, config.rollout.share_prompt_prefill = 3, False
    config_base.validate(config)
    rcfg = components.rollout_config(config)
    assert (rcfg.max_concurrent_rows, rcfg.share_prompt_prefill) == (3, False)
    config.rollout.max_concurrent_rows = -2
    with pytest.raises(ValueError, match="rollout.max_concurrent_rows=-2 must be an integer ≥ 0"):
        config_base.validate(config)
    config.rollout.max_concurrent_rows = 0
    config.rollout.first_turn_prefix, config.rollout.last_turn_prefix = "<search>", "<answer>"
    config_base.validate(config)
    assert components.rollout_config(config).prefix(config.rollout.max_turns - 1) == "<answer>"
    config.rollout.max_turns = 1
    with pytest.raises(ValueError, match=r"config.rollout.first_turn_prefix and config.rollout.last_turn_prefix "
                                         r"\('<search>', '<answer>'\) both name turn 0 when max_turns=1"):
        config_base.validate(config)


def test_validation_keys_reach_the_validation_rollout_only():
    from igpo_jax import components, config_base
    from configs.world_igpo import get_config

    config = get_config()
    config.rollout.val_context_length = 512
    config_base.validate(config)
    val, train = components.rollout_config(config, validation=True), components.rollout_config(config)
    assert (val.lockstep_turns, val.cache_size) == (True, 512)
    assert (train.lockstep_turns, train.cache_size) == (False, config.rollout.context_length)
    config.rollout.val_context_length = 0  # → context_length
    assert components.rollout_config(config, validation=True).cache_size == config.rollout.context_length
    config.rollout.val_context_length = -1
    with pytest.raises(ValueError, match="rollout.val_context_length=-1"):
        config_base.validate(config)


QWEN_BAD_JSON = "plan</think>\n<tool_call>\n{not json}\n</tool_call>"


@pytest.mark.parametrize("dialect, bad, answer", [
    ("qwen_tool_call", QWEN_BAD_JSON, QWEN_ANSWER),
    ("search_tags", "plan</think>\n<search>a</search><search>b</search><search>c</search><search>d</search>",
     "found it</think>\n<answer>Kel</answer>")])
def test_the_outcome_is_judged_on_the_policys_own_turns(tiny_llama, smollm2_tokenizer, mock_search, dialect, bad,
                                                        answer):
    """A turn the rollout cannot run (bad JSON, too many queries), its feedback, then a right answer:
    the feedback's own tags ('after </think>', '<answer> final answer </answer>') are not the
    policy's, so the episode is well formed and scores F1 1 — in training and in evaluation."""
    from igpo_jax.igpo.evaluation import episode_record
    from igpo_jax.igpo.pipeline import score_outcomes

    tok = smollm2_tokenizer
    config = RolloutConfig(dialect=dialect, today=TODAY, max_turns=3, max_new_tokens=64, max_queries=3)
    traj, stats = rollout(QUESTIONS[:1], 1, ScriptedSampler(tiny_llama, tok, [[bad, answer]]), tok, mock_search,
                          config)
    episode = traj.episodes[0]
    assert stats["rollout/format_errors_per_episode"] == 1 and episode.answer == "Kel"
    assert "could not be run" in episode.response_text and "could not be run" not in episode.policy_text
    assert episode.policy_text == "<think>" + bad + "\n<think>" + answer
    outcomes = score_outcomes(traj, dialect, -2.0)
    assert float(outcomes.reward_N[0]) == 1.0 and bool(outcomes.format_ok_N[0])
    assert episode_record(episode, dialect, -2.0, num_turns=2)["f1"] == 1.0


def test_search_tags_feedback_after_an_end_token_opens_a_new_message(tiny_llama, smollm2_tokenizer, mock_search):
    """A search_tags turn that ends on <|im_end|> without a tag gets its feedback as a tool message
    and a new assistant header, so the next turn is generated inside a message."""
    tok = smollm2_tokenizer
    config = RolloutConfig(dialect="search_tags", today=TODAY, forced_prefix="", max_turns=2, max_new_tokens=32)
    sampler = ScriptedSampler(tiny_llama, tok, [["no tags here<|im_end|>", "<answer>Kel</answer>"]])
    traj, _ = rollout(QUESTIONS[:1], 1, sampler, tok, mock_search, config)
    _check_rows(tiny_llama, traj, sampler.history)
    row = tok.decode(traj.tokens_NL[0, traj.turn_start_NT[0, 0]:int(traj.valid_NL[0].sum())].tolist())
    assert row.startswith("no tags here<|im_end|>\n<|im_start|>tool\n<information>Your last turn could not be run")
    assert row.endswith("</information><|im_end|>\n<|im_start|>assistant\n<answer>Kel</answer>")
    assert row.count("<|im_end|>") == 2  # one end token each, none appended twice


def test_an_ended_episode_hands_its_row_back(tiny_llama, smollm2_tokenizer, mock_search):
    """Without max_concurrent_rows too: an ended row must not keep setting the shared cursor."""
    tok = smollm2_tokenizer
    config = RolloutConfig(today=TODAY, max_turns=3, max_new_tokens=64)
    sampler = ScriptedSampler(tiny_llama, tok, [[QWEN_ANSWER], [QWEN_CALL, QWEN_ANSWER]])
    rollout(QUESTIONS[:1], 2, sampler, tok, mock_search, config)
    assert sorted(sampler.released) == [0, 1]


# ----------------------------------------------------------------------------- lockstep turns

class RecordingSearch:
    """Mock results; remembers the rows (query batches) of each search round."""

    def __init__(self, client):
        self.client, self.rounds = client, []

    def search_many(self, batches):
        self.rounds.append([tuple(b) for b in batches])
        return self.client.search_many(batches)


def test_lockstep_turns_search_and_append_each_turn_once_with_the_same_trajectories(
        tiny_llama, smollm2_tokenizer, mock_search):
    """Rows that stop in different decode calls (the scripted sampler stops one row per call) wait
    for the turn's last row: one search round and one append per turn, and the rollout is the one
    whose rows went apart (the same tokens, log-probs, searches and finishes)."""
    tok = smollm2_tokenizer
    scripts = [["Valdoria</search>", "<answer>Kel</answer>"],
               ["Valdoria</search>", "<search>Valdoria founder</search>", "<answer>Kel</answer>"],
               ["Valdoria</search>", "<search>Kelmark</search>", "<search>Kel</search>", " Kel</answer>"]]
    base = dict(dialect="search_tags", today=TODAY, forced_prefix="", first_turn_prefix="<search>",
                last_turn_prefix="<answer>", max_turns=4, max_new_tokens=32)
    results = {}
    for lockstep in (False, True):
        sampler = ScriptedSampler(tiny_llama, tok, scripts)
        appends, append = [], sampler.append
        sampler.append = lambda rows, tokens, n: appends.append(list(rows)) or append(rows, tokens, n)
        search = RecordingSearch(mock_search)
        traj, _ = rollout(QUESTIONS[:1], 3, sampler, tok, search, RolloutConfig(lockstep_turns=lockstep, **base))
        _check_rows(tiny_llama, traj, sampler.history)
        results[lockstep] = traj, appends, search.rounds
    (apart, apart_appends, apart_rounds), (lockstep, appends, rounds) = results[False], results[True]
    assert sorted(map(len, apart_appends)) == [1] * 6  # a row per decode call
    assert appends == [[0, 1, 2], [1, 2], [2]]  # the rows that searched in turn 1, 2, 3
    assert [len(r) for r in apart_rounds] == [1] * 6 and [len(r) for r in rounds] == [3, 2, 1]
    for name in ("tokens_NL", "valid_NL", "loss_mask_NL", "turn_id_NL", "turn_start_NT", "num_turns_N",
                 "sampled_logprob_NL"):
        np.testing.assert_array_equal(getattr(lockstep, name), getattr(apart, name), err_msg=name)
    assert [(e.answer, e.num_searches, e.finish_reason) for e in lockstep.episodes] == \
        [(e.answer, e.num_searches, e.finish_reason) for e in apart.episodes]


def test_lockstep_turns_on_the_real_sampler_give_the_same_episodes(tiny_llama, smollm2_tokenizer, mock_search,
                                                                   monkeypatch):
    """Rows whose turns stop after different numbers of tokens: with lockstep turns the same tokens,
    searches and finishes, log-probs up to float rounding (the cache's slot layout differs: one
    append per turn), in fewer appends. Sampled with top-k 8, as in the concurrency test above
    (greedy, this random model's rows all stop at the same steps)."""
    from igpo_jax.rollout import sampler as sampler_lib

    tok = smollm2_tokenizer
    model = _chatty_stopper(tiny_llama, tok)
    questions = QUESTIONS + [Example("q2", "world", "Which river runs through Kesh?", ("Amu",),
                                     (Message("user", "Which river runs through Kesh?"),), "test")]
    base = dict(dialect="search_tags", today=TODAY, forced_prefix="", first_turn_prefix="<search>Kesh river</search>",
                max_turns=3, max_new_tokens=10, max_tool_tokens=32, sampling=SamplingParams(temperature=1.0, top_k=8),
                steps_per_call=4, cache_size=1024)
    extends = []
    for name in ("_extend_call", "_extend_rows_call"):
        real = getattr(sampler_lib, name)
        monkeypatch.setattr(sampler_lib, name, lambda *a, real=real: extends.append(1) or real(*a))
    runs = {}
    for lockstep in (False, True):
        config = RolloutConfig(lockstep_turns=lockstep, **base)
        extends.clear()
        traj, _ = rollout(questions, 2, make_sampler(model, tok, config, 6), tok, mock_search, config, seed=5)
        runs[lockstep] = traj, len(extends)
    (apart, apart_extends), (lockstep, lockstep_extends) = runs[False], runs[True]
    assert len({int(n) for n in apart.valid_NL.sum(1)}) > 1 and any(e.num_searches for e in apart.episodes)
    assert lockstep_extends < apart_extends
    for name in ("tokens_NL", "valid_NL", "loss_mask_NL", "turn_id_NL", "turn_start_NT", "num_turns_N"):
        np.testing.assert_array_equal(getattr(lockstep, name), getattr(apart, name), err_msg=name)
    np.testing.assert_allclose(lockstep.sampled_logprob_NL, apart.sampled_logprob_NL, atol=1e-5)
    assert [(e.finish_reason, e.num_searches, e.response_text) for e in lockstep.episodes] == \
        [(e.finish_reason, e.num_searches, e.response_text) for e in apart.episodes]
    _check_rows(model, lockstep)
