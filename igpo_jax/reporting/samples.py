"""Rollout samples on disk: what the agent wrote, searched and read, turn by turn, with the
gold-answer probability and the information gain each turn earned.

Legend: N rollouts, T turn slots, L tokens.

    records = episode_samples(traj, examples, tokenizer, rcfg, format_penalty=-2.0,
                              mean_logp_NT=scores.mean_logp_NT, valid_NT=scores.valid_NT,
                              info_gain_type="prob_diff", advantage_NL=advantage_NL)
    write_samples(run_dir, step, records)   → run_dir/samples/step_000012.jsonl
    read_samples(run_dir, step) / sample_steps(run_dir)

One JSON object per episode: `evaluation.episode_record`'s fields (index, data_source,
golden_answers, answer, f1 — the outcome reward, the format penalty included —, em,
no_format_f1, format_ok, turns, searches, search_failures, finish_reason, response) plus
    question, group, step, p_gold [P_0 … P_{T-1}], info_gain [per turn], advantage [per turn],
    turn_records [{text, queries, tool_result, retrieved_ids, p_gold, info_gain, advantage}].
p_gold[t] = exp(mean log-prob of the gold answer's tokens) after t turns (P_0: the question alone),
the quantity `prob_diff` differences (IGPO_SPEC §2); the final turn's context is never scored, so
there are T values for T turns. info_gain[t] is turn t's reward from rewards.info_gain (null for
the final turn, which earns the F1, and for a turn whose score is missing); advantage[t] is the
advantage every token of turn t received (null where the turn generated no token, or where none
were computed: evaluation). p_gold/info_gain are null without scores (a GRPO run outside its
sample steps never scores).

The turn texts and tool results are read back from the token rows (turn ids say which tokens a
turn generated; the tokens between two turns are what the model read), so the rollout keeps no
second copy of its text.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence

import numpy as np

from igpo_jax.rollout.parse import ParseLimits, ToolCall, parse_action
from igpo_jax.rollout.episodes import RolloutConfig, chat_frame
from igpo_jax.rollout.trajectories import Trajectories
from igpo_jax.data.examples import Example
from igpo_jax.igpo.evaluation import episode_record
from igpo_jax.igpo.rewards import info_gain

SAMPLES_SUBDIR = "samples"
_FILE = re.compile(r"^step_(\d+)\.jsonl$")


def samples_path(run_dir: str | os.PathLike, step: int) -> str:
    return os.path.join(os.fspath(run_dir), SAMPLES_SUBDIR, f"step_{int(step):06d}.jsonl")


def validation_samples_path(run_dir: str | os.PathLike, step: int) -> str:
    """The greedy validation episodes after step `step` (0: before the first update)."""
    return os.path.join(os.fspath(run_dir), SAMPLES_SUBDIR, f"val_step_{int(step):06d}.jsonl")


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def per_turn_scores(mean_logp_NT: np.ndarray | None, valid_NT: np.ndarray | None, num_turns_N: np.ndarray,
                    info_gain_type: str) -> tuple[list[list | None], list[list | None]]:
    """Per rollout: [P_0 … P_{T_i - 1}] and the information gain of each of its T_i turns (None
    where missing), computed by the same `info_gain` the advantages use."""
    n = len(num_turns_N)
    if mean_logp_NT is None:
        return [None] * n, [None] * n
    gain = info_gain(mean_logp_NT, num_turns_N, info_gain_type, valid_NT=valid_NT)
    reward_NT, mask_NT = np.asarray(gain.reward_NT), np.asarray(gain.mask_NT)
    ok_NT = np.isfinite(mean_logp_NT) & (np.ones_like(mask_NT) if valid_NT is None else np.asarray(valid_NT))
    p_all, ig_all = [], []
    for i, t_i in enumerate(int(t) for t in num_turns_N):
        p_all.append([_finite_or_none(np.exp(mean_logp_NT[i, t])) if ok_NT[i, t] else None for t in range(t_i)])
        ig_all.append([float(reward_NT[i, t]) if mask_NT[i, t] else None for t in range(t_i)])
    return p_all, ig_all


def per_turn_advantages(advantage_NL: np.ndarray | None, turn_id_NL: np.ndarray,
                        num_turns_N: np.ndarray) -> list[list | None]:
    """The advantage of each turn (every token of a turn carries the same one), read at its first
    generated token; None for a turn without tokens."""
    if advantage_NL is None:
        return [None] * len(num_turns_N)
    out = []
    for i, t_i in enumerate(int(t) for t in num_turns_N):
        row = []
        for t in range(t_i):
            where = np.flatnonzero(turn_id_NL[i] == t)
            row.append(_finite_or_none(advantage_NL[i, where[0]]) if where.size else None)
        out.append(row)
    return out


def _strip_frame(text: str, head: str, tail: str) -> str:
    """`text` without the template text around a tool result: `tail` at its end, and at its start
    the longest ending of `head` it begins with (the stop token that closed the turn is part of
    the turn, so only the rest of `head` follows it)."""
    if tail and text.endswith(tail):
        text = text[:-len(tail)]
    for k in range(len(head)):
        if head[k:] and text.startswith(head[k:]):
            return text[len(head) - k:]
    return text


def turn_texts(traj: Trajectories, i: int, tokenizer, rcfg: RolloutConfig, frame=None) -> list[tuple[str, str]]:
    """(turn text as the parser saw it, what the model read after it) for each turn of row i; the
    second is '' after the final turn."""
    tokens, turn_id = traj.tokens_NL[i], traj.turn_id_NL[i]
    t_i = int(traj.num_turns_N[i])
    out = []
    for t in range(t_i):
        generated = tokens[turn_id == t].tolist()
        text = rcfg.prefix(t) + tokenizer.decode(generated, skip_special_tokens=True)
        read = ""
        if t + 1 < t_i:
            last = int(np.flatnonzero(turn_id == t).max()) + 1 if generated else int(traj.turn_start_NT[i, t])
            between = tokens[last:int(traj.turn_start_NT[i, t + 1])].tolist()
            read = tokenizer.decode(between, skip_special_tokens=False)
            if frame is not None:  # qwen_tool_call: end of turn, tool message framing, next header
                read = _strip_frame(read, frame.after_call, frame.after_result + rcfg.prefix(t + 1))
            else:  # search_tags: "<information>…</information>" inline, then the next prefix
                read = _strip_frame(read, "", rcfg.prefix(t + 1)).strip()
                read = read.removeprefix("<information>").removesuffix("</information>")
        out.append((text, read.strip()))
    return out


def episode_samples(traj: Trajectories, examples: Sequence[Example], tokenizer, rcfg: RolloutConfig, *,
                    format_penalty: float, mean_logp_NT: np.ndarray | None = None,
                    valid_NT: np.ndarray | None = None, info_gain_type: str = "prob_diff",
                    advantage_NL: np.ndarray | None = None, step: int | None = None) -> list[dict]:
    """One sample record per rollout (module docstring). Row i's question is
    `examples[traj.group_id_N[i]]` (the rollout numbers groups by example)."""
    p_gold, gains = per_turn_scores(mean_logp_NT, valid_NT, traj.num_turns_N, info_gain_type)
    advantages = per_turn_advantages(advantage_NL, traj.turn_id_NL, traj.num_turns_N)
    frame = chat_frame(tokenizer) if rcfg.dialect == "qwen_tool_call" else None
    limits = ParseLimits(max_queries=rcfg.max_queries)
    records = []
    for i, ep in enumerate(traj.episodes):
        example = examples[int(traj.group_id_N[i])]
        retrieved = tuple(getattr(ep, "retrieved_ids_per_turn", ()) or ())
        turns = []
        for t, (text, read) in enumerate(turn_texts(traj, i, tokenizer, rcfg, frame)):
            action = parse_action(text, rcfg.dialect, limits)
            turns.append({
                "text": text, "queries": list(action.queries) if isinstance(action, ToolCall) else [],
                "tool_result": read, "retrieved_ids": list(retrieved[t] or ()) if t < len(retrieved) else [],
                "p_gold": None if p_gold[i] is None else p_gold[i][t],
                "info_gain": None if gains[i] is None else gains[i][t],
                "advantage": None if advantages[i] is None else advantages[i][t],
            })
        record = episode_record(ep, rcfg.dialect, format_penalty, int(traj.num_turns_N[i]))
        record.update(question=example.question, group=int(traj.group_id_N[i]), step=step, p_gold=p_gold[i],
                      info_gain=gains[i], advantage=advantages[i], turn_records=turns)
        records.append(record)
    return records


def write_samples(run_dir: str | os.PathLike, step: int, records: Sequence[dict]) -> str:
    """Writes the records (atomically: a reader never sees half a file); returns the path."""
    return write_jsonl_at(samples_path(run_dir, step), records)


def write_jsonl_at(path: str, records: Sequence[dict]) -> str:
    """write_jsonl, making the folder first; returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_jsonl(path, records)
    return path


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
    os.replace(tmp, path)


def sample_steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps that have a samples file, in order."""
    folder = os.path.join(os.fspath(run_dir), SAMPLES_SUBDIR)
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for m in map(_FILE.match, os.listdir(folder)) if m)


def read_samples(path_or_run_dir: str | os.PathLike, step: int | None = None) -> list[dict]:
    """The records of a samples file, or of `run_dir`'s file for `step`."""
    path = os.fspath(path_or_run_dir) if step is None else samples_path(path_or_run_dir, step)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
