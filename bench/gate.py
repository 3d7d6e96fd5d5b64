"""The regime gate: is a world one where information gain can beat GRPO? Measured on the BASE model
(or, with --checkpoint, on a trained run's policy: whether the regime survives training).

    flock /work/heavy.lock python -m bench.gate --config=configs/world_two_hop_igpo.py [--questions 32]
        [--questions_per_rollout 8] [--set KEY=VALUE ...]

Rolls out the config's first `--questions` training questions, rollout.n rollouts each, with the
untrained policy, and scores them as a training step does (train.rollout_phase, then
train.advantages_phase: P(gold) per turn, outcome rewards, IGPO's advantages). Prints, per group
of rollout.n:
- collapsed_frac: the groups whose outcome rewards are all equal (GRPO's zero-advantage groups,
  the paper's Fig. 1 statistic);
- ig_informative_frac: among those, the groups whose IGPO advantages are not all zero, and
  ig_spread_frac: whose rollouts' gains differ from each other by more than --ig_tol at some turn
  (or that searched on different turns). The first is not enough: IG is normalised over all the
  turns of a group pooled, so a group of identical rollouts whose turn 1 gained more than its turn
  2 has live advantages without one rollout being told apart from another; the regime asks for
  the second (a spread above rounding noise, which the group z-score would blow up just the same);
- bridge_query_frac: the episodes whose second query names the bridge (the entity whose document
  states the answer: the question's last supporting document), and the same among the episodes
  that wrote a second query at all;
- collapsed_retrieval_split_frac: among the collapsed groups, those whose rollouts differ in
  whether a search found the answer's document (`diagnostics.outcome_collapse`): where IG can
  credit a turn the outcome cannot, a spread larger than any noise; a group that all found it,
  or none did, differs at most by how a query was spelt;
- ig_answer_doc / ig_other_doc: the mean information gain of search turns whose results held the
  answer's document, and of the other search turns.
Then ONE JSON line with these figures and the settings. The target regime (issue 33): most groups
collapsed, many of them informative, the bridge query written roughly 10-40% of the time.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import time

import numpy as np

REGIME = {"collapsed_frac": 0.5, "ig_spread_frac": 0.3, "bridge_query_frac": (0.1, 0.4)}


def apply_overrides(config, items) -> None:
    """--set KEY=VALUE: a Python literal, or else a string, at a dotted key."""
    for item in items:
        key, _, value = item.partition("=")
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        try:
            node[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[name] = value


def names_bridge(query: str, bridge: str) -> bool:
    """Whether `query` names `bridge` in full (case and spacing aside): half a name ("Pemdo" for
    "Pemdo Labs") may find a namesake's document, so it does not count."""
    norm = lambda s: " ".join(re.findall(r"\w+", s.lower()))
    return bool(bridge) and f" {norm(bridge)} " in f" {norm(query)} "


def group_regime(outcome_N: np.ndarray, live_N: np.ndarray, ig_NT: np.ndarray, ig_mask_NT: np.ndarray,
                 group_id_N: np.ndarray, ig_tol: float) -> dict[str, int]:
    """Counts of groups: all, outcome-collapsed, and among those the ones with a live IGPO advantage
    (`live_N`: a rollout has a non-zero advantage on some token) and the ones whose rollouts' gains
    differ: at some turn by more than ig_tol, or in which turns have a gain."""
    counts = {"groups": 0, "collapsed": 0, "informative": 0, "spread": 0}
    for g in np.unique(group_id_N):
        rows = group_id_N == g
        counts["groups"] += 1
        if np.ptp(outcome_N[rows]) != 0:
            continue
        counts["collapsed"] += 1
        counts["informative"] += int(live_N[rows].any())
        mask_GT = ig_mask_NT[rows].astype(bool)
        gains_GT = np.where(mask_GT, ig_NT[rows], 0.0)
        counts["spread"] += int(bool((mask_GT != mask_GT[0]).any() or (np.ptp(gains_GT, axis=0) > ig_tol).any()))
    return counts


def turn_queries(traj, tokenizer, rcfg) -> list[list[tuple[str, ...] | None]]:
    """Per episode, per turn: the queries it searched (None for a turn that did not search)."""
    from igpo_jax.rollout.parse import ParseLimits, ToolCall, parse_action

    out = []
    for i in range(traj.num_rollouts):
        turns = []
        for t in range(int(traj.num_turns_N[i])):
            text = rcfg.prefix(t) + tokenizer.decode(traj.tokens_NL[i][traj.turn_id_NL[i] == t].tolist(),
                                                     skip_special_tokens=True)
            action = parse_action(text, rcfg.dialect, ParseLimits(max_queries=rcfg.max_queries))
            searched = traj.episodes[i].retrieved_ids_per_turn[t] is not None
            turns.append(action.queries if searched and isinstance(action, ToolCall) else None)
        out.append(turns)
    return out


def bridge_counts(queries_per_episode, bridges: list[str]) -> dict[str, int]:
    """Episodes, those with a second query, and those whose second query names their bridge."""
    counts = {"episodes": 0, "second_queries": 0, "bridge_queries": 0}
    for turns, bridge in zip(queries_per_episode, bridges):
        searches = [q for q in turns if q is not None]
        counts["episodes"] += 1
        if len(searches) >= 2:
            counts["second_queries"] += 1
            counts["bridge_queries"] += int(any(names_bridge(q, bridge) for q in searches[1]))
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/world_two_hop_igpo.py")
    parser.add_argument("--questions", type=int, default=32, help="the first this many training questions")
    parser.add_argument("--questions_per_rollout", type=int, default=8, help="questions rolled out at once")
    parser.add_argument("--ig_tol", type=float, default=0.01, help="an IG spread above rounding noise")
    parser.add_argument("--run_dir", default="/tmp/igpo_gate", help="the world is written here (emptied first)")
    parser.add_argument("--show", type=int, default=2, help="print the episodes of this many groups")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--checkpoint", default=None,
                        help="a run's checkpoint (or run) directory: measure its newest policy, not the base model's")
    args = parser.parse_args()
    if args.questions % args.questions_per_rollout:
        raise SystemExit(f"--questions={args.questions} must be a multiple of "
                         f"--questions_per_rollout={args.questions_per_rollout}")

    from igpo_jax import components, config_base, train
    from igpo_jax.data import world as world_lib
    from igpo_jax.igpo import diagnostics, pipeline
    from igpo_jax.igpo.rewards import info_gain
    from igpo_jax.planning.memory import load_config
    from igpo_jax.rollout.episodes import make_sampler
    from igpo_jax.runtime import sharding
    from igpo_jax.training import checkpoint

    try:
        if args.checkpoint is not None and checkpoint.latest_step(args.checkpoint) is None:
            raise SystemExit(f"--checkpoint={args.checkpoint} holds no finished checkpoint")
    except checkpoint.CheckpointNotFoundError as e:
        raise SystemExit(f"--checkpoint: {e}") from None
    components.start_program()
    config = load_config(args.config)
    apply_overrides(config, args.set)
    config.run_dir = args.run_dir
    config.trainer.progress = False
    config_base.validate(config)
    if not config.algorithm.use_info_gain:
        raise SystemExit("the gate measures information gains: give it a config with algorithm.use_info_gain=True")
    shutil.rmtree(args.run_dir, ignore_errors=True)
    files = components.data_files(config)
    documents = world_lib.build_world(**components.world_arguments(config.data)).documents
    title = {d.id: d.title for d in documents}
    examples = components.load_examples(files.train)[:args.questions]
    if len(examples) < args.questions:
        raise SystemExit(f"the config has {len(examples)} training questions, fewer than --questions")

    start = time.perf_counter()
    mesh, rules = components.mesh_and_rules(config)
    g, b = config.rollout.n, args.questions_per_rollout
    regime = {"groups": 0, "collapsed": 0, "informative": 0, "spread": 0}
    bridges = {"episodes": 0, "second_queries": 0, "bridge_queries": 0}
    pooled = {k: [] for k in ("ig_NT", "ig_mask_NT", "searched_NT", "answer_doc_NT")}
    f1, format_ok, turns, last_turn, outcome, found, group = [], [], [], [], [], [], []
    with sharding.activate(mesh, rules), components.search_backend(config, files.corpus) as search:
        policy, tokenizer = components.load_policy(config, mesh, rules)
        checkpoint_step = None if args.checkpoint is None else checkpoint.restore_params(args.checkpoint, policy)
        rcfg = components.rollout_config(config)
        sampler = make_sampler(policy, tokenizer, rcfg, b * g, mesh=mesh, rules=rules)
        # a step's parts without an update: no reference, no optimiser, π_old not needed
        run = train.Run(config=config, mesh=mesh, local_mesh=mesh, rules=rules, rows=slice(0, b * g), num_rows=b * g,
                        policy=policy, reference=None, tokenizer=tokenizer, ucfg=None,
                        alg=train.algorithm_config(config), old_source="none", updater=None, rcfg=rcfg,
                        sampler=sampler, search=search, show=False, actor=policy, sampling_model=policy)
        for k in range(args.questions // b):
            chunk = examples[k * b:(k + 1) * b]
            traj, _ = train.rollout_phase(run, chunk, k)
            scores, advantage_NL, _ = train.advantages_phase(run, traj, k)
            outcomes = pipeline.score_outcomes(traj, rcfg.dialect, run.alg.format_penalty)
            gain = info_gain(scores.mean_logp_NT, traj.num_turns_N, run.alg.info_gain_type, valid_NT=scores.valid_NT)
            ig_NT, ig_mask_NT = np.asarray(gain.reward_NT), np.asarray(gain.mask_NT)
            live_N = np.any((np.abs(advantage_NL) > 1e-6) & traj.loss_mask_NL, axis=1)
            for key, value in group_regime(outcomes.reward_N, live_N, ig_NT, ig_mask_NT, traj.group_id_N,
                                           args.ig_tol).items():
                regime[key] += value
            queries = turn_queries(traj, tokenizer, rcfg)
            bridge_titles = [title.get(ep.supporting_doc_ids[-1], "") if ep.supporting_doc_ids else ""
                             for ep in traj.episodes]
            for key, value in bridge_counts(queries, bridge_titles).items():
                bridges[key] += value
            searched_NT, answer_doc_NT = diagnostics.turn_retrieval(traj.episodes, traj.max_turns)
            for key, value in (("ig_NT", ig_NT), ("ig_mask_NT", ig_mask_NT), ("searched_NT", searched_NT),
                               ("answer_doc_NT", answer_doc_NT)):
                pooled[key].append(value)
            outcome += outcomes.reward_N.tolist()
            found += answer_doc_NT.any(axis=1).tolist()
            group += (k * b + np.asarray(traj.group_id_N)).tolist()  # group ids restart each batch
            f1 += outcomes.f1_N.tolist()
            format_ok += outcomes.format_ok_N.tolist()
            turns += traj.num_turns_N.tolist()
            last_turn += (traj.num_turns_N == rcfg.max_turns).tolist()
            for i in range(min(args.show, b) * g if k == 0 else 0):
                ep = traj.episodes[i]
                print(f"--- group {i // g} rollout {i % g}: gold {ep.golden_answers[0]!r} bridge "
                      f"{bridge_titles[i]!r} F1 {outcomes.f1_N[i]:.2f} queries {queries[i]} "
                      f"IG {np.round(ig_NT[i][ig_mask_NT[i]], 3).tolist()}\n{ep.response_text}")
            print(f"batch {k + 1}/{args.questions // b}: {time.perf_counter() - start:.0f} s")
    by_retrieval = diagnostics.ig_by_retrieval(*(np.concatenate(pooled[key]) for key in
                                                 ("ig_NT", "ig_mask_NT", "searched_NT", "answer_doc_NT")))
    fraction = lambda a, b: round(a / b, 4) if b else float("nan")
    out = {
        "bench": "gate", "config": args.config, "overrides": args.set, "questions": args.questions,
        "checkpoint": args.checkpoint, "checkpoint_step": checkpoint_step, "rollout_n": g, "groups": regime["groups"],
        "collapsed_frac": fraction(regime["collapsed"], regime["groups"]),
        "ig_informative_frac": fraction(regime["informative"], regime["collapsed"]),
        "ig_spread_frac": fraction(regime["spread"], regime["collapsed"]), "ig_tol": args.ig_tol,
        "bridge_query_frac": fraction(bridges["bridge_queries"], bridges["episodes"]),
        "bridge_query_frac_of_second_queries": fraction(bridges["bridge_queries"], bridges["second_queries"]),
        "second_query_frac": fraction(bridges["second_queries"], bridges["episodes"]),
        "collapsed_retrieval_split_frac": round(diagnostics.outcome_collapse(
            np.asarray(outcome), np.asarray(found), np.asarray(group))["diag/collapsed_retrieval_split_frac"], 4),
        "ig_answer_doc": round(by_retrieval.get("diag/ig_answer_doc", float("nan")), 4),
        "ig_other_doc": round(by_retrieval.get("diag/ig_other_doc", float("nan")), 4),
        "ig_answer_doc_count": by_retrieval["diag/ig_answer_doc_count"],
        "ig_other_doc_count": by_retrieval["diag/ig_other_doc_count"],
        "no_format_f1": round(float(np.mean(f1)), 4), "format_ok_frac": round(float(np.mean(format_ok)), 4),
        "turns_per_episode": round(float(np.mean(turns)), 3),
        "forced_last_turn_frac": round(float(np.mean(last_turn)), 4),
        "info_gain_type": config.algorithm.info_gain_type, "wall_s": round(time.perf_counter() - start, 1),
    }
    low, high = REGIME["bridge_query_frac"]
    out["regime_holds"] = bool(out["collapsed_frac"] > REGIME["collapsed_frac"]
                               and out["ig_spread_frac"] > REGIME["ig_spread_frac"]
                               and low <= out["bridge_query_frac"] <= high)
    print(f"collapsed {out['collapsed_frac']:.2f} of {out['groups']} groups (regime: > {REGIME['collapsed_frac']}); "
          f"of those IG-informative {out['ig_informative_frac']:.2f}, gains differ between rollouts by > {args.ig_tol} "
          f"{out['ig_spread_frac']:.2f} (regime: > {REGIME['ig_spread_frac']}); bridge query "
          f"{out['bridge_query_frac']:.2f} of episodes (regime: {REGIME['bridge_query_frac']}); IG answer doc "
          f"{out['ig_answer_doc']} vs other {out['ig_other_doc']}")
    print(json.dumps({k: None if isinstance(v, float) and np.isnan(v) else v for k, v in out.items()}))


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
