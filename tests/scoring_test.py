"""igpo/scoring: pseudo-turn tokenisation, one-pass block-mask scoring against the per-turn oracle,
and the information-gain effect on SmolLM2 with a fictional fact.

Legend: N rollouts, L tokens, T turn slots.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from igpo_jax.rollout.trajectories import Episode, Trajectories
from igpo_jax.igpo.scoring import (
    PseudoTurn, block_inputs, first_alias, pseudo_turn, pseudo_turns, score_one_pass, score_per_turn)
from igpo_jax.model.weights import load_hf
from tests.conftest import write_tiny_hf_model


def _trajectories(rows, turn_starts, left_pad=()):
    """Right-padded Trajectories from token lists; rows listed in `left_pad` get 3 leading pads."""
    shifted = [(3 if i in left_pad else 0) for i in range(len(rows))]
    length = max(len(r) + s for r, s in zip(rows, shifted)) + 2  # trailing padding on every row
    n, t = len(rows), max(map(len, turn_starts))
    tokens = np.zeros((n, length), np.int32)
    valid = np.zeros((n, length), bool)
    turn_start = np.full((n, t), -1, np.int32)
    for i, (row, starts) in enumerate(zip(rows, turn_starts)):
        tokens[i, shifted[i]:shifted[i] + len(row)] = row
        valid[i, shifted[i]:shifted[i] + len(row)] = True
        turn_start[i, :len(starts)] = np.asarray(starts) + shifted[i]
    zeros = np.zeros((n, length))
    episode = Episode("q", ("a",), "test", "", "", None, "answer")
    return Trajectories(tokens_NL=tokens, valid_NL=valid, loss_mask_NL=zeros.astype(bool),
                        turn_id_NL=zeros.astype(np.int32) - 1, turn_start_NT=turn_start,
                        num_turns_N=np.asarray([len(s) for s in turn_starts], np.int32),
                        group_id_N=np.zeros(n, np.int32), sampled_logprob_NL=zeros.astype(np.float32),
                        episodes=(episode,) * n)


# ----------------------------------------------------------------------------- tokenisation

@pytest.mark.parametrize("answer", ["Kesmarin", "New York City", "1987", "St. Louis, Missouri",
                                    "Dr. J. R. R. Tolkien (author)", "3.14", "U.S.A."])
def test_answer_mask_covers_exactly_the_answer(smollm2_tokenizer, answer):
    pt = pseudo_turn(smollm2_tokenizer, answer)
    assert pt.text.endswith(f"<answer>\n{answer}\n</answer><|im_end|>")
    assert smollm2_tokenizer.decode(pt.ids) == pt.text
    idx = np.flatnonzero(pt.answer_mask)
    assert idx.size > 0 and np.all(np.diff(idx) == 1)  # one contiguous span
    assert smollm2_tokenizer.decode(pt.ids[idx]) == answer
    # The tokens around it are template text: no straddling token was needed.
    assert smollm2_tokenizer.decode(pt.ids[: idx[0]]).endswith("<answer>\n")
    assert smollm2_tokenizer.decode(pt.ids[idx[-1] + 1:]).startswith("\n</answer>")


def test_pseudo_turn_template_and_aliases(smollm2_tokenizer):
    assert first_alias(" Kesmarin <|answer_split|>Kesmarin City") == "Kesmarin"
    pts = pseudo_turns(smollm2_tokenizer, ["A<|answer_split|>B", "A", "C"], template="Answer: {answer}.")
    assert pts[0] is pts[1] and pts[2].text == "Answer: C."
    assert smollm2_tokenizer.decode(pts[2].ids[pts[2].answer_mask]).strip() == "C"
    with pytest.raises(ValueError, match="exactly once"):
        pseudo_turn(smollm2_tokenizer, "x", template="no field here")


# ----------------------------------------------------------------------------- block mask

def test_block_mask_by_hand():
    """Context of 4 tokens (the last one padding), T = 2 copies of P = 2 tokens, second copy padded."""
    ctx_valid = np.array([[True, True, True, False]])
    positions, mask = block_inputs(ctx_valid, np.array([[2, 3]]), np.array([[True, True]]),
                                   np.array([[True, True]]))
    np.testing.assert_array_equal(positions[0], [0, 1, 2, 2, 2, 3, 3, 4])
    m = np.asarray(mask[0]).astype(int)
    expected = np.array([
        # context c0..c3       copy0 (ts=2)   copy1 (ts=3)
        [1, 0, 0, 0,            0, 0,          0, 0],
        [1, 1, 0, 0,            0, 0,          0, 0],
        [1, 1, 1, 0,            0, 0,          0, 0],
        [1, 1, 1, 0,            0, 0,          0, 0],
        [1, 1, 0, 0,            1, 0,          0, 0],
        [1, 1, 0, 0,            1, 1,          0, 0],
        [1, 1, 1, 0,            0, 0,          1, 0],
        [1, 1, 1, 0,            0, 0,          1, 1],
    ])
    np.testing.assert_array_equal(m, expected)


# ----------------------------------------------------------------------------- one pass = oracle

@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_one_pass_equals_per_turn_oracle(tmp_path, model_type):
    write_tiny_hf_model(model_type, tmp_path)
    model = load_hf(str(tmp_path))
    rng = np.random.default_rng(0)
    lengths = [40, 23, 57, 31]
    starts = [[8, 17, 30], [9], [5, 20, 33, 47], [12, 22]]
    rows = [rng.integers(1, 128, n) for n in lengths]
    traj = _trajectories(rows, starts, left_pad=(2,))
    pts = [
        PseudoTurn(np.array([5, 6, 7, 50, 51, 9, 10], np.int32),
                   np.array([0, 0, 0, 1, 1, 0, 0], bool), ""),
        PseudoTurn(np.array([5, 6, 60, 9], np.int32), np.array([0, 0, 1, 0], bool), ""),
        PseudoTurn(np.array([70, 71, 72, 9, 10], np.int32), np.array([1, 1, 1, 0, 0], bool), ""),  # answer first
        PseudoTurn(np.array([5, 6, 7, 8, 80, 81, 82, 83, 84, 9], np.int32),
                   np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0], bool), ""),
    ]
    oracle = score_per_turn(model, traj, pts, bucket=False)
    one = score_one_pass(model, traj, pts, batch_size=3)  # two micro-batches, the second padded
    np.testing.assert_array_equal(one.valid_NT, oracle.valid_NT)
    np.testing.assert_array_equal(one.valid_NT.sum(1), [3, 1, 4, 2])
    assert np.all(np.isfinite(oracle.mean_logp_NT)) and np.all(oracle.mean_logp_NT[oracle.valid_NT] < 0)
    np.testing.assert_allclose(one.mean_logp_NT, oracle.mean_logp_NT, atol=1e-5, rtol=0)
    assert np.all(one.mean_logp_NT[~one.valid_NT] == 0)
    # Contexts differ, so do the scores (the copies do not all see the same context).
    assert len(np.unique(np.round(one.mean_logp_NT[one.valid_NT], 6))) == one.valid_NT.sum()


def test_token_logprobs_of_the_scoring_pass_equal_the_update_forward(tmp_path):
    """π_old from the one-pass scoring = compute_logprobs (the update's own forward, on the update's
    right-padded rows) at every loss token, on a multi-turn batch with ragged rows, a left-padded
    row, loss tokens after the last turn_start (the final turn) and two scoring micro-batches."""
    from igpo_jax.training.update import compute_logprobs

    write_tiny_hf_model("qwen2", tmp_path)
    model = load_hf(str(tmp_path))
    rng = np.random.default_rng(1)
    lengths = [40, 23, 57, 31]
    starts = [[8, 17, 30], [9], [5, 20, 33, 47], [12, 22]]
    traj = _trajectories([rng.integers(1, 128, n) for n in lengths], starts, left_pad=(2,))
    loss = np.zeros(traj.tokens_NL.shape, bool)
    for i, row_starts in enumerate(starts):
        shift = 3 if i == 2 else 0
        for t, st in enumerate(row_starts):  # each turn: its first 5 tokens generated, then a tool result
            end = row_starts[t + 1] if t + 1 < len(row_starts) else lengths[i]
            loss[i, shift + st: shift + min(st + 5, end)] = True
    traj = dataclasses.replace(traj, loss_mask_NL=loss)
    pts = [PseudoTurn(np.array([5, 6, 60, 61, 9], np.int32), np.array([0, 0, 1, 1, 0], bool), "")] * 4
    scores = score_one_pass(model, traj, pts, batch_size=3, token_logprobs=True)
    plain = score_one_pass(model, traj, pts, batch_size=3)
    np.testing.assert_allclose(scores.mean_logp_NT, plain.mean_logp_NT, atol=1e-5, rtol=0)
    assert plain.token_logp_NL is None
    length = 128  # the update pads its rows to a multiple of 128 (train.padded_length)
    pad = lambda x: np.pad(x, ((0, 0), (0, length - x.shape[1])))
    reference = np.asarray(compute_logprobs(model, pad(traj.tokens_NL), pad(traj.valid_NL)))[:, :traj.tokens_NL.shape[1]]
    assert scores.token_logp_NL.shape == traj.tokens_NL.shape
    assert np.all(scores.token_logp_NL[loss] < 0) and np.all(scores.token_logp_NL[~loss] == 0)
    np.testing.assert_allclose(scores.token_logp_NL[loss], reference[loss], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- SmolLM2, real effect

QUESTION = "Where was Valeta Orunde born?"
RELEVANT = "Valeta Orunde was born in the city of Kesmarin. She later worked as a cartographer."
IRRELEVANT = "The Brasco river flows through the Dulmer valley and freezes every winter."


def _chat_context(tokenizer, document):
    """Token ids of system + user question [+ one search turn and its tool result], ending with the
    next assistant header and the forced '<think>' prefix — as the rollout builds it."""
    messages = [{"role": "system", "content": "You are a research assistant. Think in <think></think>, "
                 "then search with <tool_call> or answer in <answer></answer>."},
                {"role": "user", "content": QUESTION}]
    if document is not None:
        call = json.dumps({"name": "web_search", "arguments": {"query": ["Valeta Orunde birthplace"]}})
        messages += [{"role": "assistant", "content": f"<think>I should search.</think><tool_call>{call}</tool_call>"},
                     {"role": "tool", "content": f"1. {document}"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + "<think>"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_smollm2_relevant_document_raises_gold_probability(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = _chat_context(tok, None)
    relevant = _chat_context(tok, RELEVANT)
    irrelevant = _chat_context(tok, IRRELEVANT)
    # Two rollouts of two turns each: turn 0 after the prompt, turn 1 after the tool result; the
    # rows are the whole chats, the first turn's tokens sitting between prompt and tool result.
    rows = [relevant, irrelevant]
    for row in rows:
        assert row[:len(prompt)] == prompt
    starts = [[len(prompt), len(r)] for r in rows]
    traj = _trajectories([np.asarray(r) for r in rows], starts)
    pts = pseudo_turns(tok, ["Kesmarin"] * 2)
    one = score_one_pass(smollm2, traj, pts)
    np.testing.assert_allclose(one.mean_logp_NT[0, 0], one.mean_logp_NT[1, 0], atol=1e-5)  # same prompt
    p_prompt = float(np.exp(one.mean_logp_NT[0, 0]))
    p_relevant = float(np.exp(one.mean_logp_NT[0, 1]))
    p_irrelevant = float(np.exp(one.mean_logp_NT[1, 1]))
    print(f"P(prompt)={p_prompt:.4g} P(relevant)={p_relevant:.4g} P(irrelevant)={p_irrelevant:.4g}")
    assert p_relevant > 10 * p_prompt
    assert p_relevant > 0.02
    # An irrelevant document moves P by a small fraction of what the right one does.
    assert abs(p_irrelevant - p_prompt) < 0.05 * (p_relevant - p_prompt)
    assert p_relevant > 10 * p_irrelevant


def test_identical_rollouts_are_scored_once_and_share_their_scores_bitwise(tmp_path):
    """Rollouts 0, 2 and 4 are one conversation, 1 and 3 another: one pass over 3 distinct rows
    (with π_old's token log-probs) gives equal rows equal scores bit for bit, and the scores of
    every row within float tolerance of scoring each row on its own."""
    write_tiny_hf_model("qwen2", tmp_path)
    model = load_hf(str(tmp_path))
    rng = np.random.default_rng(3)
    a, b, c = (rng.integers(1, 128, n) for n in (40, 31, 23))
    starts = [[8, 17, 30], [12, 22], [8, 17, 30], [12, 22], [8, 17, 30], [9]]
    traj = _trajectories([a, b, a, b, a, c], starts)
    loss = np.zeros(traj.tokens_NL.shape, bool)
    for i, row_starts in enumerate(starts):
        for st in row_starts:
            loss[i, st:st + 4] = True
    traj = dataclasses.replace(traj, loss_mask_NL=loss)
    np.testing.assert_array_equal(traj.first_identical_N(), [0, 1, 0, 1, 0, 5])
    pts = [PseudoTurn(np.array([5, 6, 60, 61, 9], np.int32), np.array([0, 0, 1, 1, 0], bool), "")] * 6
    seen = []
    once = score_one_pass(model, traj, pts, batch_size=2, token_logprobs=True, on_batch=seen.append)
    each = score_one_pass(model, traj, pts, batch_size=2, token_logprobs=True, dedup=False)
    assert len(seen) == 2 and sum(seen) == 6  # 3 distinct rows in 2 micro-batches; the bar hears all 6
    for same in ([0, 2, 4], [1, 3]):
        for i in same[1:]:
            assert once.mean_logp_NT[i].tobytes() == once.mean_logp_NT[same[0]].tobytes()
            assert once.token_logp_NL[i].tobytes() == once.token_logp_NL[same[0]].tobytes()
    np.testing.assert_allclose(once.mean_logp_NT, each.mean_logp_NT, atol=1e-5, rtol=0)
    np.testing.assert_allclose(once.token_logp_NL, each.token_logp_NL, atol=1e-5, rtol=0)
    # a different group is a different question: its identical tokens are not merged
    other = dataclasses.replace(traj, group_id_N=np.asarray([0, 0, 0, 1, 1, 1], np.int32))
    np.testing.assert_array_equal(other.first_identical_N(), [0, 1, 0, 3, 4, 5])


def test_a_micro_batch_shared_prompt_computed_once_gives_the_same_scores(tmp_path):
    """Rows opening with the same 45 tokens (a system prompt; two rows also share the question up to
    token 52), one of them with a turn starting inside that prompt: scoring with the prompt computed
    once per micro-batch (32 tokens: 45 rounded down) equals scoring every row whole, gold-answer
    scores and π_old's token log-probs alike, and the per-turn oracle; in micro-batches of 3 (the
    second padded) and of 5 (all rows in one)."""
    from igpo_jax.igpo import scoring

    write_tiny_hf_model("qwen2", tmp_path)
    model = load_hf(str(tmp_path))
    rng = np.random.default_rng(4)
    prompt, question = rng.integers(1, 128, 45), rng.integers(1, 128, 7)
    rows = [np.concatenate([prompt, question, rng.integers(1, 128, 20)]),
            np.concatenate([prompt, question, rng.integers(1, 128, 31)]),
            np.concatenate([prompt, rng.integers(1, 128, 12)]),
            np.concatenate([prompt, rng.integers(1, 128, 26)]),
            np.concatenate([prompt, rng.integers(1, 128, 40)])]
    starts = [[52, 62], [52], [47, 50], [20, 45, 60], [46, 70, 80]]  # row 3's first turn starts inside the prompt
    traj = _trajectories(rows, starts)
    loss = np.zeros(traj.tokens_NL.shape, bool)
    for i, row_starts in enumerate(starts):
        for st in row_starts:
            loss[i, st:st + 3] = True
    traj = dataclasses.replace(traj, loss_mask_NL=loss)
    pts = [PseudoTurn(np.array([5, 6, 60, 61, 9], np.int32), np.array([0, 0, 1, 1, 0], bool), "")] * 5
    arrays = scoring._micro_batch_arrays(traj, pts, np.arange(5), 5, scoring._context_needed(traj, True), True)
    assert scoring.shared_prompt_length(arrays, 5) == 32
    assert scoring.shared_prompt_length(arrays, 2) == 32 and scoring.shared_prompt_length(arrays, 2, 4) == 52
    oracle = score_per_turn(model, traj, pts, bucket=False)
    for batch in (3, 5):
        shared = score_one_pass(model, traj, pts, batch_size=batch, token_logprobs=True)
        whole = score_one_pass(model, traj, pts, batch_size=batch, token_logprobs=True, share_prompt=False)
        np.testing.assert_allclose(shared.mean_logp_NT, whole.mean_logp_NT, atol=1e-5, rtol=0)
        np.testing.assert_allclose(shared.mean_logp_NT, oracle.mean_logp_NT, atol=1e-5, rtol=0)
        assert np.all(shared.token_logp_NL[loss] < 0)
        np.testing.assert_allclose(shared.token_logp_NL, whole.token_logp_NL, atol=1e-5, rtol=0)
