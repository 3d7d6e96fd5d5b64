"""reporting.samples: sample records read back from scripted rollouts (both dialects), with
hand-computed P(gold), information gain and turn advantages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from igpo_jax.rollout.episodes import RolloutConfig, rollout
from igpo_jax.reporting import samples
from tests.episodes_test import QUESTIONS, QWEN_ANSWER, QWEN_CALL, TODAY, ScriptedSampler, mock_search, \
    tiny_llama  # noqa: F401  (fixtures)

FIELDS = {"index", "data_source", "question", "golden_answers", "answer", "f1", "em", "no_format_f1", "format_ok",
          "turns", "searches", "search_failures", "finish_reason", "response", "group", "step", "p_gold",
          "info_gain", "advantage", "turn_records"}
TURN_FIELDS = {"text", "queries", "tool_result", "retrieved_ids", "p_gold", "info_gain", "advantage"}


def test_qwen_turns_queries_results_and_scores(tiny_llama, smollm2_tokenizer, mock_search):  # noqa: F811
    tok = smollm2_tokenizer
    config = RolloutConfig(today=TODAY, max_turns=4, max_new_tokens=64)
    sampler = ScriptedSampler(tiny_llama, tok, [[QWEN_CALL, QWEN_ANSWER], [QWEN_ANSWER]])
    traj, _ = rollout(QUESTIONS[:1], 2, sampler, tok, mock_search, config)
    # P_0 = 0.1, P_1 = 0.4 for the searching row; the direct answer has only P_0 = 0.2
    mean_logp_NT = np.log(np.asarray([[0.1, 0.4, 1, 1], [0.2, 1, 1, 1]], np.float32))
    valid_NT = np.asarray([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    advantage_NL = np.where(traj.turn_id_NL == 0, 0.5, np.where(traj.turn_id_NL == 1, -0.25, 0.0))
    searched, direct = samples.episode_samples(traj, QUESTIONS[:1], tok, config, format_penalty=-2.0,
                                               mean_logp_NT=mean_logp_NT, valid_NT=valid_NT,
                                               info_gain_type="prob_diff", advantage_NL=advantage_NL, step=7)
    assert set(searched) == FIELDS and all(set(t) == TURN_FIELDS for t in searched["turn_records"])
    assert searched["question"] == "Who founded Valdoria?" and searched["golden_answers"] == ["Kel"]
    assert (searched["step"], searched["group"], searched["finish_reason"], searched["f1"]) == (7, 0, "answer", 1.0)
    first, final = searched["turn_records"]
    assert first["text"] == "<think>" + QWEN_CALL and final["text"] == "<think>" + QWEN_ANSWER
    assert first["queries"] == ["Valdoria founder"] and final["queries"] == []
    # what the model read: the tool message's text, without the chat template around it
    assert first["tool_result"].startswith('Results for "Valdoria founder":\n1. Mock page 1 for Valdoria founder')
    assert "<|im_start|>" not in first["tool_result"] and "<|im_end|>" not in first["tool_result"]
    assert final["tool_result"] == ""
    assert searched["p_gold"] == pytest.approx([0.1, 0.4]) and searched["info_gain"] == pytest.approx([0.3, None])
    assert [first["p_gold"], first["info_gain"], first["advantage"]] == pytest.approx([0.1, 0.3, 0.5])
    assert final["advantage"] == -0.25 and final["info_gain"] is None
    assert direct["p_gold"] == pytest.approx([0.2]) and direct["info_gain"] == [None]
    assert direct["advantage"] == [0.5] and len(direct["turn_records"]) == 1


def test_search_tags_results_and_missing_scores(tiny_llama, smollm2_tokenizer, mock_search):  # noqa: F811
    tok = smollm2_tokenizer
    config = RolloutConfig(dialect="search_tags", today=TODAY, forced_prefix="", first_turn_prefix="<search>",
                           max_turns=3, max_new_tokens=32)
    sampler = ScriptedSampler(tiny_llama, tok, [["Ana birthplace</search>", "<search>Ana Orlo</search>",
                                                 "<answer>Orlo</answer>"]])
    traj, _ = rollout(QUESTIONS[1:], 1, sampler, tok, mock_search, config)
    # context 1 failed to score (NaN): turn 1 has no gain, turn 2 is measured from P_0 (rewards.info_gain)
    mean_logp_NT = np.log(np.asarray([[0.1, np.nan, 0.5]], np.float32))
    (record,) = samples.episode_samples(traj, QUESTIONS[1:], tok, config, format_penalty=-2.0,
                                        mean_logp_NT=mean_logp_NT, valid_NT=np.ones((1, 3), bool),
                                        info_gain_type="prob_diff")
    turns = record["turn_records"]
    assert [t["text"] for t in turns] == ["<search>Ana birthplace</search>", "<search>Ana Orlo</search>",
                                          "<answer>Orlo</answer>"]
    assert [t["queries"] for t in turns] == [["Ana birthplace"], ["Ana Orlo"], []]
    assert turns[1]["tool_result"].startswith('Results for "Ana Orlo":\n1. Mock page 1 for Ana Orlo')
    assert "<information>" not in turns[1]["tool_result"] and "</information>" not in turns[1]["tool_result"]
    assert record["p_gold"][0] == pytest.approx(0.1) and record["p_gold"][1] is None
    assert record["info_gain"][0] is None and record["info_gain"][1] == pytest.approx(0.4)
    assert record["advantage"] is None and turns[0]["advantage"] is None  # none given (evaluation)
    (unscored,) = samples.episode_samples(traj, QUESTIONS[1:], tok, config, format_penalty=-2.0)
    assert unscored["p_gold"] is None and unscored["turn_records"][0]["p_gold"] is None


def test_files_round_trip_and_list_their_steps(tmp_path):
    assert samples.sample_steps(tmp_path) == []
    samples.write_samples(tmp_path, 12, [{"a": 1}, {"a": None}])
    samples.write_samples(tmp_path, 3, [{"a": 2}])
    assert samples.samples_path(tmp_path, 12).endswith("samples/step_000012.jsonl")
    assert samples.sample_steps(tmp_path) == [3, 12]
    assert samples.read_samples(tmp_path, 12) == [{"a": 1}, {"a": None}]
    with pytest.raises(ValueError):  # NaN is not JSON: the writer must never produce it
        samples.write_samples(tmp_path, 4, [{"a": math.nan}])
