"""Dynamic sampling (DAPO; veRL's `algorithm.filter_groups`): which groups of rollouts carry a
learning signal, and a step's update batch gathered from whole groups over several generation
rounds. Pure numpy, no config objects, no I/O: train.py decides when to roll out another round.

Legend: N rollouts (B groups × G rollouts, group b in rows b·G … b·G+G−1), L tokens, T turn slots.

Advantages are normalised within a group (advantages.py), so a group taken whole keeps its
advantages exactly whichever other groups share the batch: an update batch can be assembled from
groups of different rounds without recomputing them.

What "carries no signal" means, per `metric` (config.algorithm.filter_groups.metric):
  'advantage'   every loss token of the group has advantage 0 (|A| ≤ ZERO_ADVANTAGE, the tolerance
                of diag/collapse_frac): no policy gradient at all. For GRPO these are exactly the
                groups whose outcome rewards tie; for IGPO the groups whose normalised turn rewards
                all tie ('joint': every gain and outcome of the group one value; 'separate': the
                outcomes tie and the gains tie). "All equal" and "all 0" are one condition here: a
                group-centred advantage equal on every token is 0 (the centred rewards sum to 0).
                The default.
  'acc'         every rollout of the group has the same exact match (veRL's 'acc': the reward
                function's 0/1 correctness).
  'score', 'seq_final_reward', 'seq_reward'
                every rollout of the group has the same outcome reward (F1, or the format
                penalty). veRL's three names differ only by token-level shaping and the KL-in-reward
                penalty, neither of which exists here (the KL is a loss term), so they coincide.
                With IGPO they drop a group whose outcomes tie even where its information gains
                differ (it still has a gradient): 'advantage' keeps those.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from igpo_jax.rollout.trajectories import Trajectories

METRICS = ("advantage", "acc", "score", "seq_final_reward", "seq_reward")
OUTCOME_METRICS = ("score", "seq_final_reward", "seq_reward")
ZERO_ADVANTAGE = 1e-6  # diagnostics.collapse_fraction's tolerance: a dropped group is a collapsed one

# padding of a Trajectories field when rows of different lengths are stacked (0 / False otherwise)
_TRAJECTORY_PAD = {"turn_id_NL": -1}


@dataclasses.dataclass(frozen=True)
class Groups:
    """Whole groups of rollouts with everything the update and the samples need of them, row-aligned:
    `examples[b]` is group b's question, `scores` (scoring.TurnScores, or None for GRPO) and
    `advantage_NL` have one row per rollout of `traj`."""

    examples: tuple
    traj: Trajectories
    scores: Any
    advantage_NL: np.ndarray

    def __post_init__(self):
        n = self.traj.num_rollouts
        if not self.examples or n % len(self.examples):
            raise ValueError(f"{n} rollouts do not make whole groups of {len(self.examples)} questions")
        if self.advantage_NL.shape != self.traj.tokens_NL.shape:
            raise ValueError(f"advantage_NL has shape {self.advantage_NL.shape}, the trajectories "
                             f"{self.traj.tokens_NL.shape}")

    @property
    def num_groups(self) -> int:
        return len(self.examples)

    @property
    def group_size(self) -> int:
        return self.traj.num_rollouts // self.num_groups


def informative_groups(metric: str, group_size: int, advantage_NL: np.ndarray, loss_mask_NL: np.ndarray,
                       reward_N: np.ndarray | None = None, em_N: np.ndarray | None = None) -> np.ndarray:
    """[B] bool: whether each group carries a learning signal by `metric` (see the module docstring).
    `reward_N` (outcome rewards) is needed by the outcome metrics, `em_N` by 'acc'."""
    if metric not in METRICS:
        raise ValueError(f"unknown filter_groups metric {metric!r}; choose one of {METRICS}")
    n = advantage_NL.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rollouts are not whole groups of {group_size}")
    if metric == "advantage":
        live_N = np.any((np.abs(advantage_NL) > ZERO_ADVANTAGE) & loss_mask_NL.astype(bool), axis=1)
        return live_N.reshape(-1, group_size).any(axis=1)
    values_N = em_N if metric == "acc" else reward_N
    if values_N is None:
        raise ValueError(f"filter_groups metric {metric!r} needs the rollouts' "
                         f"{'exact match' if metric == 'acc' else 'outcome rewards'}")
    values_BG = np.asarray(values_N, np.float64).reshape(-1, group_size)
    return np.any(values_BG != values_BG[:, :1], axis=1)


def _group_rows(group_b: np.ndarray, group_size: int) -> np.ndarray:
    return (np.asarray(group_b, np.int64)[:, None] * group_size + np.arange(group_size)).reshape(-1)


def _rows_of(value, rows: np.ndarray):
    """`value`'s rows (an array, or a NamedTuple/dataclass of arrays or None such as TurnScores)."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return value[rows]
    if isinstance(value, tuple):  # NamedTuple
        return type(value)(*(_rows_of(v, rows) for v in value))
    return dataclasses.replace(value, **{f.name: _rows_of(getattr(value, f.name), rows)
                                         for f in dataclasses.fields(value)})


def take_groups(groups: Groups, group_b: Sequence[int]) -> Groups:
    """The groups `group_b` (in that order), renumbered 0 … len − 1 so that a batch stacked from
    several rounds has one id per question."""
    group_b = np.asarray(group_b, np.int64)
    g = groups.group_size
    rows = _group_rows(group_b, g)
    t = groups.traj
    traj = dataclasses.replace(
        t, tokens_NL=t.tokens_NL[rows], valid_NL=t.valid_NL[rows], loss_mask_NL=t.loss_mask_NL[rows],
        turn_id_NL=t.turn_id_NL[rows], turn_start_NT=t.turn_start_NT[rows], num_turns_N=t.num_turns_N[rows],
        group_id_N=np.repeat(np.arange(len(group_b), dtype=np.int32), g),
        sampled_logprob_NL=t.sampled_logprob_NL[rows], episodes=tuple(t.episodes[i] for i in rows))
    return Groups(tuple(groups.examples[b] for b in group_b), traj, _rows_of(groups.scores, rows),
                  groups.advantage_NL[rows])


def _fit(x: np.ndarray, length: int, fill=0) -> np.ndarray:
    """`x` right-padded with `fill`, or cut (past every row's last valid token), to `length` columns."""
    if x.shape[1] >= length:
        return x[:, :length]
    return np.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2), constant_values=fill)


def _stack(parts: Sequence, name: str, length: int):
    """One field stacked over `parts`; token fields (…_NL) fitted to `length` columns first."""
    if parts[0] is None:
        if any(p is not None for p in parts):
            raise ValueError(f"{name} is missing from some of the stacked groups")
        return None
    if name.endswith("_NL"):
        parts = [_fit(p, length, _TRAJECTORY_PAD.get(name, 0)) for p in parts]
    return np.concatenate(parts, axis=0)


def _stack_records(records: Sequence, length: int):
    """TurnScores-like records (NamedTuples of arrays or None) stacked field by field."""
    if records[0] is None:
        if any(r is not None for r in records):
            raise ValueError("scores are missing from some of the stacked groups")
        return None
    return type(records[0])(*(_stack([getattr(r, f) for r in records], f, length) for f in records[0]._fields))


def _used_columns(valid_NL: np.ndarray) -> int:
    used_L = valid_NL.any(axis=0)
    return int(np.flatnonzero(used_L)[-1]) + 1 if used_L.any() else 1


def concatenate(parts: Sequence[Groups]) -> Groups:
    """The groups of every part in order, renumbered 0 … B − 1, their rows right-padded (invalid, off
    the loss mask, turn id −1, advantage 0) to the longest row's length: groups taken out of a
    round keep no columns that only the groups left behind needed."""
    if not parts:
        raise ValueError("nothing to concatenate")
    if len({p.group_size for p in parts}) != 1 or len({p.traj.max_turns for p in parts}) != 1:
        raise ValueError("groups of different sizes or turn slots do not stack")
    length = max(_used_columns(p.traj.valid_NL) for p in parts)
    trajs = [p.traj for p in parts]
    fields = {f.name: _stack([getattr(t, f.name) for t in trajs], f.name, length)
              for f in dataclasses.fields(Trajectories) if f.name != "episodes"}
    g = parts[0].group_size
    fields["group_id_N"] = np.repeat(np.arange(fields["tokens_NL"].shape[0] // g, dtype=np.int32), g)
    traj = Trajectories(**fields, episodes=tuple(e for t in trajs for e in t.episodes))
    return Groups(tuple(e for p in parts for e in p.examples), traj,
                  _stack_records([p.scores for p in parts], length),
                  _stack([p.advantage_NL for p in parts], "advantage_NL", length))


def round_cap(max_num_gen_batches: int, batches_per_epoch: int) -> int:
    """The most generation rounds one step may run (its first included): max_num_gen_batches, or
    for 0 (veRL's "no limit") one pass over the training data, so that a policy that ties on every
    question cannot keep a step rolling out for ever."""
    if max_num_gen_batches < 0:
        raise ValueError(f"max_num_gen_batches={max_num_gen_batches} must be ≥ 0")
    return max_num_gen_batches or max(1, batches_per_epoch)


class Selection:
    """A step's update batch of `quota` groups, gathered round by round: the informative groups in
    the order they were rolled out, the first `quota` of them; where the rounds ran out first, the
    remaining slots hold groups that were dropped (their advantages are 0 on every token by the
    'advantage' metric: they add no policy gradient, but keep the batch's compiled shape)."""

    def __init__(self, quota: int):
        if quota < 1:
            raise ValueError(f"a batch of {quota} groups")
        self.quota = quota
        self._kept: list[Groups] = []
        self._spare: list[Groups] = []  # dropped groups, the earliest first, while a slot may need them
        self.generated = self.informative = self.dropped = 0

    @property
    def kept(self) -> int:
        return sum(p.num_groups for p in self._kept)

    @property
    def missing(self) -> int:
        """Slots still without an informative group."""
        return self.quota - self.kept

    def add(self, groups: Groups, informative_B: np.ndarray) -> None:
        """One round's groups and which of them are informative."""
        informative_B = np.asarray(informative_B, bool)
        if informative_B.shape != (groups.num_groups,):
            raise ValueError(f"{informative_B.shape} flags for {groups.num_groups} groups")
        self.generated += groups.num_groups
        self.informative += int(informative_B.sum())
        self.dropped += int((~informative_B).sum())
        take = np.flatnonzero(informative_B)[:self.missing]
        if take.size:
            self._kept.append(take_groups(groups, take))
        spares = sum(p.num_groups for p in self._spare)
        fill = np.flatnonzero(~informative_B)[:max(0, self.missing - spares)]
        if fill.size:
            self._spare.append(take_groups(groups, fill))

    def batch(self) -> Groups:
        """The update batch: `quota` groups, informative first, then dropped ones (if any are needed)."""
        parts, needed = list(self._kept), self.missing
        for spare in self._spare:
            if needed <= 0:
                break
            parts.append(take_groups(spare, range(min(needed, spare.num_groups))))
            needed -= parts[-1].num_groups
        if needed > 0:
            raise ValueError(f"{self.quota} groups were asked for, {self.generated} were rolled out")
        return concatenate(parts)

    def metrics(self, rounds: int, cap_hit: bool) -> dict[str, float]:
        """filter_groups/*: generation rounds run, groups rolled out, informative and dropped among
        them, informative groups in the update batch (kept) and dropped ones filling it (filled)."""
        return {"filter_groups/rounds": float(rounds), "filter_groups/generated": float(self.generated),
                "filter_groups/informative": float(self.informative), "filter_groups/dropped": float(self.dropped),
                "filter_groups/kept": float(self.kept), "filter_groups/filled": float(self.missing),
                "filter_groups/cap_hit": float(cap_hit)}
