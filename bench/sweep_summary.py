"""A comparison sweep's result: each arm's validation curve, mean over its seeds.

    python -m bench.sweep_summary runs/world_igpo_vs_grpo [--keys val/no_format_f1,val/format_error]

Reads every RUN_DIR/metrics.jsonl under the sweep folder (runs named <arm>_seed<N>, as
`sweep.igpo_and_grpo` names them), prints per arm and validation step the mean over seeds and
each seed's value, then, as its last line, one JSON object: per arm the runs, the steps, the
mean and per-seed curve of each key, and each training diagnostic's mean over steps and its
curve (seeds averaged, at the steps every seed has; e.g. the zero-advantage groups per step) (wall
times are not in metrics.jsonl: each run's bench.learning JSON line has its own).

Paired statistics, from the greedy validation episodes (RUN_DIR/samples/val_step_*.jsonl): every
run validates the same held-out questions, so a change is measured per question and its
standard error is that of the per-question differences, far below the se of either mean (most
questions do not change): per arm, the change of no-format F1 since step 0 (`change`), and
between two arms at each step (`paired`: "igpo-grpo" is IGPO − GRPO; other arms in name order,
per question averaged over seeds).

On the embedded world, the same per-question F1s by question kind (`by_kind`: per arm and
validation step, the mean over the questions of each kind, seeds averaged; the world is rebuilt
from the runs' config.json): which kinds of answer a policy has learnt, and which it never writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

from bench.gate import names_bridge
from igpo_jax.data import world
from igpo_jax.rollout.parse import ToolCall, parse_action
from igpo_jax.components import world_arguments
from igpo_jax.reporting.metrics import read_jsonl
from igpo_jax.plot import arm_of, curve, mean_curve
from igpo_jax.reporting.samples import validation_samples_path

VAL_KEYS = ("val/no_format_f1", "val/f1", "val/format_error", "val/no_format_f1_se")
STEP_KEYS = ("diag/collapse_frac", "diag/outcome_collapse_frac", "diag/collapsed_retrieval_split_frac",
             "ig/mean", "diag/ig_answer_doc", "diag/ig_other_doc", "reward/f1")


def arms(sweep_dir: str) -> dict[str, dict[str, list[dict]]]:
    """{arm: {run name: metric records}} of the runs under `sweep_dir` that have metrics."""
    out: dict[str, dict[str, list[dict]]] = {}
    for name in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, name)
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            out.setdefault(arm_of(name), {})[name] = read_jsonl(path)
    if not out:
        raise FileNotFoundError(f"no run with a metrics.jsonl under {sweep_dir!r}")
    return out


def summarise_arm(runs: dict[str, list[dict]], val_keys=VAL_KEYS, step_keys=STEP_KEYS) -> dict:
    result = {"runs": sorted(runs)}
    for key in val_keys:
        curves = [c for c in (curve(records, key) for records in runs.values()) if c[0]]
        steps, values = mean_curve(curves)
        result[key] = {"steps": steps, "mean": [round(v, 4) for v in values],
                       "per_seed": [[round(v, 4) for v in c[1]] for c in curves]}
    for key in step_keys:
        curves = [c for c in (curve(records, key) for records in runs.values()) if c[0]]
        values = [v for c in curves for v in c[1]]
        result[f"{key}_mean"] = round(sum(values) / len(values), 4) if values else None  # JSON null
        steps, means = mean_curve(curves) if curves else ([], [])
        result[f"{key}_by_step"] = {"steps": steps, "mean": [round(v, 4) for v in means]}
    return result


def paired_difference(a: dict[str, float], b: dict[str, float]) -> tuple[float, float, int]:
    """(mean, standard error, count) of a[q] − b[q] over the questions q both have."""
    diffs = [a[q] - b[q] for q in sorted(a.keys() & b.keys())]
    if not diffs:
        return math.nan, math.nan, 0
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else 0.0
    return mean, math.sqrt(var / len(diffs)), len(diffs)


def per_question(run_dirs: list[str], step: int, key: str = "no_format_f1") -> dict[str, float]:
    """{question index: `key` of its greedy validation episode at `step`, averaged over the runs
    that have that step's episodes} (empty when none has)."""
    sums: dict[str, list[float]] = {}
    for run_dir in run_dirs:
        for r in validation_episodes(run_dir, step):
            sums.setdefault(str(r["index"]), []).append(float(r[key]))
    return {q: sum(v) / len(v) for q, v in sums.items()}


def validation_episodes(run_dir: str, step: int) -> list[dict]:
    """A run's greedy validation episodes at `step` ([] when it has none)."""
    path = validation_samples_path(run_dir, step)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def paired_statistics(sweep_dir: str, arm_runs: dict[str, list[str]], steps: list[int]) -> dict:
    """Per arm the per-question change since step 0; per pair of arms their per-question
    difference at each step (module docstring)."""
    def pack(t):
        return {"mean": round(t[0], 4), "se": round(t[1], 4), "questions": t[2]}

    dirs = {arm: [os.path.join(sweep_dir, name) for name in names] for arm, names in arm_runs.items()}
    at = {(arm, step): per_question(d, step) for arm, d in dirs.items() for step in steps}
    out = {"change": {arm: {str(step): pack(paired_difference(at[arm, step], at[arm, 0]))
                            for step in steps if step and at[arm, step]} for arm in dirs}}
    names = sorted(dirs, key=lambda arm: (arm != "igpo", arm))  # IGPO first: the pair reads "igpo-grpo"
    out["paired"] = {f"{a}-{b}": {str(step): pack(paired_difference(at[a, step], at[b, step]))
                                  for step in steps if at[a, step] and at[b, step]}
                     for i, a in enumerate(names) for b in names[i + 1:]}
    return out


def run_world(run_dir: str) -> world.World | None:
    """The embedded world a run trained on, rebuilt from its config.json (None for any other data,
    or without the run's config.json)."""
    data = run_config(run_dir).get("data", {})
    return world.build_world(**world_arguments(data)) if data.get("synthetic_world") else None


def run_config(run_dir: str) -> dict:
    """A run's config.json as a dict ({} without one)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def world_question_kinds(run_dir: str) -> dict[str, str]:
    """{question index: kind} of the embedded world a run trained on ({} for any other data)."""
    built = run_world(run_dir)
    return {q.index: q.kind for q in built.questions} if built else {}


_INFORMATION = re.compile(r"<information>.*?</information>", re.S)


def search_queries(response: str) -> list[tuple[str, ...]]:
    """The queries of each search turn of a search_tags response, in order (the turns are the
    text between the <information> blocks the rollout inserted; a turn that is not a search,
    an answer or a malformed turn, is left out)."""
    turns = (parse_action(text, "search_tags") for text in _INFORMATION.split(response))
    return [turn.queries for turn in turns if isinstance(turn, ToolCall)]


def bridge_rates(sweep_dir: str, arm_runs: dict[str, list[str]], steps: list[int]) -> dict:
    """{arm: {step: {"bridge_query_frac", "second_query_frac", "episodes"}}} over the validation
    episodes (every seed) of the world's two-hop questions; {} when the runs are not on the
    embedded world or not in the search_tags dialect."""
    first = os.path.join(sweep_dir, next(iter(arm_runs.values()))[0])
    built = run_world(first)
    if built is None or run_config(first).get("rollout", {}).get("dialect") != "search_tags":
        return {}
    bridge_of = {q.index: built.document(q.supporting_doc_ids[-1]).title
                 for q in built.questions if q.hops == 2}
    out = {}
    for arm, names in arm_runs.items():
        out[arm] = {}
        for step in steps:
            episodes = second = named = 0
            for r in (r for name in names for r in validation_episodes(os.path.join(sweep_dir, name), step)
                      if r["index"] in bridge_of):
                searches = search_queries(r.get("response", ""))
                episodes += 1
                second += len(searches) >= 2
                named += len(searches) >= 2 and any(names_bridge(q, bridge_of[r["index"]]) for q in searches[1])
            if episodes:
                out[arm][str(step)] = {"bridge_query_frac": round(named / episodes, 4),
                                       "second_query_frac": round(second / episodes, 4), "episodes": episodes}
    return out


def steps_to_reach(summary: dict, key: str = "val/no_format_f1", reference: str = "grpo") -> dict:
    """{arm: first validation step whose mean `key` reaches the reference arm's final mean, or
    None}; {} without the reference arm."""
    if reference not in summary or not summary[reference][key]["mean"]:
        return {}
    target = summary[reference][key]["mean"][-1]
    return {arm: next((st for st, m in zip(s[key]["steps"], s[key]["mean"]) if m >= target), None)
            for arm, s in summary.items() if arm != reference}


def by_kind(sweep_dir: str, arm_runs: dict[str, list[str]], steps: list[int]) -> dict:
    """{arm: {step: {kind: {"mean", "questions"}}}}: per-question no-format F1 (seeds averaged)
    averaged by question kind; {} when the runs are not on the embedded world."""
    out = {}
    for arm, names in arm_runs.items():
        dirs = [os.path.join(sweep_dir, name) for name in names]
        kinds = world_question_kinds(dirs[0])  # a sweep's runs share the world (data.world_*)
        if not kinds:
            return {}
        out[arm] = {}
        for step in steps:
            grouped: dict[str, list[float]] = {}
            for question, f1 in per_question(dirs, step).items():
                if question not in kinds:
                    raise ValueError(f"validation question {question!r} of arm {arm!r} is not in the world "
                                     f"{names[0]}'s config.json describes: the runs were not on one world")
                grouped.setdefault(kinds[question], []).append(f1)
            if grouped:
                out[arm][str(step)] = {kind: {"mean": round(sum(v) / len(v), 4), "questions": len(v)}
                                       for kind, v in sorted(grouped.items())}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--keys", default=",".join(VAL_KEYS), help="validation keys to average")
    args = parser.parse_args(argv)
    keys = tuple(k for k in args.keys.split(",") if k)
    summary = {arm: summarise_arm(runs, keys) for arm, runs in arms(args.sweep_dir).items()}
    for arm, s in summary.items():
        print(f"{arm}: {len(s['runs'])} runs ({', '.join(s['runs'])})")
        for key in keys:
            k = s[key]
            rows = "  ".join(f"step {st}: {m:.3f} [{', '.join(f'{c[i]:.3f}' for c in k['per_seed'] if i < len(c))}]"
                             for i, (st, m) in enumerate(zip(k["steps"], k["mean"])))
            print(f"  {key:22s} {rows}")
        print("  " + "  ".join(f"{key} {s[f'{key}_mean']}" for key in STEP_KEYS))
    steps = sorted({st for s in summary.values() for st in s[keys[0]]["steps"]}) if keys else []
    stats = paired_statistics(args.sweep_dir, {arm: s["runs"] for arm, s in summary.items()}, steps)
    for arm, by_step in stats["change"].items():
        print(f"{arm} no-format F1 change since step 0 (per question): " +
              "  ".join(f"step {st}: {v['mean']:+.3f} ± {v['se']:.3f}" for st, v in by_step.items()))
    for pair, by_step in stats["paired"].items():
        print(f"{pair} no-format F1 at equal steps (per question, seeds averaged): " +
              "  ".join(f"step {st}: {v['mean']:+.3f} ± {v['se']:.3f}" for st, v in by_step.items()))
    kinds = by_kind(args.sweep_dir, {arm: s["runs"] for arm, s in summary.items()}, steps)
    for arm, by_step in kinds.items():
        for st, per_kind in by_step.items():
            print(f"{arm} step {st} no-format F1 by question kind (seeds averaged): " +
                  "  ".join(f"{kind} {v['mean']:.2f} ({v['questions']})" for kind, v in per_kind.items()))
    bridges = bridge_rates(args.sweep_dir, {arm: s["runs"] for arm, s in summary.items()}, steps)
    for arm, by_step in bridges.items():
        print(f"{arm} two-hop validation episodes whose second search names the bridge: " +
              "  ".join(f"step {st}: {v['bridge_query_frac']:.2f} (second search {v['second_query_frac']:.2f}, "
                        f"{v['episodes']} episodes)" for st, v in by_step.items()))
    reach = steps_to_reach(summary, keys[0]) if keys else {}
    for arm, step in reach.items():
        print(f"{arm} reaches GRPO's final {keys[0]}: " + (f"at step {step}" if step is not None else "never"))
    print(json.dumps({"bench": "sweep_summary", "sweep": os.path.basename(os.path.normpath(args.sweep_dir)),
                      **summary, **stats, "by_kind": kinds, "bridge": bridges, "steps_to_reach": reach}))


if __name__ == "__main__":
    main()
