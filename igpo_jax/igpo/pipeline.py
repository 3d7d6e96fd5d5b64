"""Trajectories (+ per-turn gold-answer scores) → token advantages and reward metrics.

Legend: N rollouts, T turn slots, L tokens.

This is the host-side glue between the rollout and the update: outcome rewards from the final
answers (strings), information gain from the scores, curriculum weights for the step, then the
jitted `compute_advantages`. No model, no I/O.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from igpo_jax.rollout.trajectories import Trajectories
from igpo_jax.data.examples import ANSWER_SEPARATOR as ANSWER_SPLIT  # the reference's alias separator
from igpo_jax.igpo import diagnostics
from igpo_jax.igpo.advantages import compute_advantages, curriculum_weights
from igpo_jax.igpo.rewards import info_gain, score_outcome

# Tags whose balance the format check requires, per tool-call dialect (IGPO_SPEC §2).
FORMAT_TAGS = {"qwen_tool_call": ("think", "tool_call", "answer"), "search_tags": ("think", "search", "answer")}


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    use_info_gain: bool = True
    info_gain_type: str = "prob_diff"  # 'prob_diff' | 'log_prob_diff'
    info_gain_norm_mode: str = "joint"  # 'joint' | 'separate'
    norm_adv_by_std_in_grpo: bool = True
    gamma: float = 1.0
    use_curriculum: bool = False
    curriculum_f1_init: float = 0.5
    curriculum_f1_final: float = 1.0
    curriculum_ig_init: float = 1.0
    curriculum_ig_final: float = 0.5
    curriculum_steps: int = 0  # steps over which the weights move; 0 → total training steps
    format_penalty: float = -2.0
    eps: float = 1e-6
    # the controls of issue 33 (departures from the paper's IGPO, never defaults):
    use_outcome_reward: bool = True  # False: IG-only, the outcome reward left out of the advantages
    shuffle_info_gain: bool = False  # True: placebo, each group's gains permuted among its turn slots
    shuffle_seed: int = 0  # the placebo's permutations: from (shuffle_seed, step), so a run repeats
    info_gain_norm_scope: str = "group"  # 'turn': each turn position normalised on its own (advantages.IG_NORM_SCOPES)
    info_gain_std_floor: float = 0.0  # > 0: the gains' std taken as at least this (noise stays small)


@dataclasses.dataclass(frozen=True)
class Outcomes:
    reward_N: np.ndarray  # F1 or the format penalty
    f1_N: np.ndarray  # no-format F1 (penalty → 0)
    em_N: np.ndarray
    format_ok_N: np.ndarray


def score_outcomes(traj: Trajectories, dialect: str, format_penalty: float) -> Outcomes:
    """Outcome reward per rollout: F1 of the first <answer> against every alias, or the penalty,
    judged on the policy's own turns (tool results and inserted feedback are not its words)."""
    tags = FORMAT_TAGS[dialect]
    scores = [score_outcome(ep.policy_text, ANSWER_SPLIT.join(ep.golden_answers),
                            format_penalty=format_penalty, tags=tags) for ep in traj.episodes]
    return Outcomes(reward_N=np.asarray([s.reward for s in scores], np.float32),
                    f1_N=np.asarray([s.no_format_f1 for s in scores], np.float32),
                    em_N=np.asarray([s.em for s in scores], np.float32),
                    format_ok_N=np.asarray([s.format_ok for s in scores], bool))


def shuffle_within_groups(ig_NT: np.ndarray, ig_mask_NT: np.ndarray, group_id_N: np.ndarray,
                          rng: np.random.Generator) -> np.ndarray:
    """The placebo: each group's information gains (the slots of ig_mask_NT) permuted among the
    same slots, across its rollouts and turns. The group keeps its multiset of gains, hence the
    reward distribution and its normalisation, while a gain no longer sits on the turn that
    earned it. Unmasked slots are left as they are."""
    out = np.array(ig_NT, copy=True)
    mask_NT = np.asarray(ig_mask_NT, bool)
    for g in np.unique(group_id_N):
        slots_NT = mask_NT & (np.asarray(group_id_N) == g)[:, None]
        out[slots_NT] = rng.permutation(out[slots_NT])
    return out


def advantages_for(traj: Trajectories, outcomes: Outcomes, mean_logp_NT: np.ndarray | None,
                   scored_NT: np.ndarray | None, cfg: AlgorithmConfig, step: int,
                   total_steps: int) -> tuple[np.ndarray, dict[str, float]]:
    """Token advantages [N, L] (0 off the loss mask) and reward/IG metrics for one batch.

    `step`: the 0-based index of the training step being taken (its metrics say step + 1). The
    curriculum is evaluated at step + 1 of total, so the first step is one step in and the last
    gets the final weights (the reference's global step counts from 1)."""
    n, t = traj.num_rollouts, traj.max_turns
    if cfg.use_info_gain:
        if mean_logp_NT is None:
            raise ValueError("use_info_gain=True needs the per-turn gold-answer scores")
        gain = info_gain(mean_logp_NT, traj.num_turns_N, cfg.info_gain_type, valid_NT=scored_NT)
        ig_NT, ig_mask_NT = np.asarray(gain.reward_NT), np.asarray(gain.mask_NT)
    else:
        ig_NT, ig_mask_NT = np.zeros((n, t), np.float32), np.zeros((n, t), bool)
    # the gains the advantages credit; the metrics below report the gains as earned
    credited_ig_NT = ig_NT
    if cfg.use_info_gain and cfg.shuffle_info_gain:
        credited_ig_NT = shuffle_within_groups(ig_NT, ig_mask_NT, traj.group_id_N,
                                               np.random.default_rng([cfg.shuffle_seed, step]))
    w_f1, w_ig = curriculum_weights(step + 1, cfg.curriculum_steps or total_steps, use_curriculum=cfg.use_curriculum,
                                    f1_init=cfg.curriculum_f1_init, f1_final=cfg.curriculum_f1_final,
                                    ig_init=cfg.curriculum_ig_init, ig_final=cfg.curriculum_ig_final)
    adv = compute_advantages(outcomes.reward_N, credited_ig_NT, ig_mask_NT, traj.num_turns_N, traj.group_id_N,
                             traj.turn_id_NL, use_info_gain=cfg.use_info_gain, norm_mode=cfg.info_gain_norm_mode,
                             norm_by_std=cfg.norm_adv_by_std_in_grpo, gamma=cfg.gamma, f1_weight=w_f1,
                             ig_weight=w_ig, eps=cfg.eps, use_outcome=cfg.use_outcome_reward,
                             ig_scope=cfg.info_gain_norm_scope, ig_std_floor=float(cfg.info_gain_std_floor))
    token_NL = np.asarray(jax.device_get(adv.token_NL), np.float32) * traj.loss_mask_NL
    ig_values = ig_NT[ig_mask_NT]
    metrics = {
        "reward/mean": float(outcomes.reward_N.mean()),
        "reward/f1": float(outcomes.f1_N.mean()),
        "reward/em": float(outcomes.em_N.mean()),
        "reward/format_error_rate": float(1.0 - outcomes.format_ok_N.mean()),
        "ig/mean": float(ig_values.mean()) if ig_values.size else 0.0,
        "ig/std": float(ig_values.std()) if ig_values.size else 0.0,
        "ig/count": float(ig_values.size),
        "ig/positive_frac": float((ig_values > 0).mean()) if ig_values.size else 0.0,
        "curriculum/w_f1": float(w_f1),
        "curriculum/w_ig": float(w_ig),
        "advantage/mean": float(token_NL[traj.loss_mask_NL].mean()) if traj.loss_mask_NL.any() else 0.0,
    }
    metrics.update(step_diagnostics(traj, outcomes, token_NL, mean_logp_NT, scored_NT, ig_NT, ig_mask_NT))
    return token_NL, metrics


def step_diagnostics(traj: Trajectories, outcomes: Outcomes, token_NL: np.ndarray, mean_logp_NT, scored_NT,
                     ig_NT: np.ndarray, ig_mask_NT: np.ndarray) -> dict[str, float]:
    """diag/* metrics (igpo.diagnostics); P(gold) and IG ones only when the turns were scored."""
    searched_NT, answer_doc_NT = diagnostics.turn_retrieval(traj.episodes, traj.max_turns)
    out = {"diag/collapse_frac": diagnostics.collapse_fraction(token_NL, traj.loss_mask_NL, traj.group_id_N)}
    out.update(diagnostics.behaviour(searched_NT, np.asarray([ep.answer is not None for ep in traj.episodes]),
                                     outcomes.format_ok_N, answer_doc_NT))
    out.update(diagnostics.outcome_collapse(outcomes.reward_N, answer_doc_NT.any(axis=1), traj.group_id_N))
    if mean_logp_NT is not None:
        valid_NT = np.ones(mean_logp_NT.shape, bool) if scored_NT is None else np.asarray(scored_NT)
        out.update(diagnostics.p_gold(np.asarray(mean_logp_NT), valid_NT, traj.num_turns_N, searched_NT))
        out.update(diagnostics.ig_by_retrieval(ig_NT, ig_mask_NT, searched_NT, answer_doc_NT))
    return diagnostics.drop_nan(out)
