"""A comparison sweep's result: each arm's validation curve, mean over its seeds.

    python -m bench.sweep_summary runs/world_igpo_vs_grpo [--keys val/no_format_f1,val/format_error]

Reads every RUN_DIR/metrics.jsonl under the sweep folder (runs named <arm>_seed<N>, as
`sweep.igpo_and_grpo` names them), prints per arm and validation step the mean over seeds and
each seed's value, then, as its last line, one JSON object: per arm the runs, the steps, the
mean and per-seed curve of each key, and the mean of each training diagnostic over steps (wall
times are not in metrics.jsonl: each run's bench.learning JSON line has its own).
"""

from __future__ import annotations

import argparse
import json
import math
import os

from igpo_jax.metrics import read_jsonl
from igpo_jax.plot import arm_of, curve, mean_curve

VAL_KEYS = ("val/no_format_f1", "val/f1", "val/format_error", "val/no_format_f1_se")
STEP_KEYS = ("diag/collapse_frac", "ig/mean", "diag/ig_answer_doc", "diag/ig_other_doc", "reward/f1")


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
        values = [v for records in runs.values() for v in curve(records, key)[1]]
        result[f"{key}_mean"] = round(sum(values) / len(values), 4) if values else math.nan
    return result


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
    print(json.dumps({"bench": "sweep_summary", "sweep": os.path.basename(os.path.normpath(args.sweep_dir)),
                      **summary}))


if __name__ == "__main__":
    main()
