"""Does the policy learn? One config for its full length, validation before and after.

    python -m bench.learning --config=configs/world_igpo.py [--run_dir /tmp/igpo_learning] [-- --config.x=y …]

Runs `python -m igpo_jax.train` as a child process in a fresh run directory (nothing resumed),
with validation before the first update forced on, then reads its metrics.jsonl. Prints the
validation curve, then, as its last line, one JSON object: val_f1_step0, val_f1_final,
val_no_format_f1_step0, val_no_format_f1_final (with their standard errors), format_error_final,
collapse_frac_mean (fraction of groups with all-zero advantages, mean over steps) and wall_s, and
val_no_format_f1_change with its paired standard error (per question, final − step 0, from the
validation episodes: the noise of the change itself, far below either mean's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from bench.sweep_summary import paired_difference, per_question
from igpo_jax.reporting.metrics import read_jsonl


def summarise(records: list[dict], wall_s: float) -> dict:
    """The bench's JSON from a run's metric records (step 0: validation before training)."""
    val = sorted((r for r in records if "val/f1" in r), key=lambda r: r["step"])
    if not val or val[0]["step"] != 0:
        raise ValueError("no step-0 validation in the run's metrics (trainer.val_before_train and test files?)")
    first, last = val[0], val[-1]
    collapse = [r["diag/collapse_frac"] for r in records if "diag/collapse_frac" in r]
    nan = float("nan")
    return {
        "bench": "learning", "steps": max(r["step"] for r in records), "val_steps": [r["step"] for r in val],
        "val_questions": first.get("val/questions", nan),
        "val_f1_step0": first["val/f1"], "val_f1_final": last["val/f1"],
        "val_no_format_f1_step0": first["val/no_format_f1"], "val_no_format_f1_final": last["val/no_format_f1"],
        "val_no_format_f1_se_step0": first.get("val/no_format_f1_se", nan),
        "val_no_format_f1_se_final": last.get("val/no_format_f1_se", nan),
        "format_error_step0": first.get("val/format_error", nan),
        "format_error_final": last.get("val/format_error", nan),
        "collapse_frac_mean": sum(collapse) / len(collapse) if collapse else nan,
        "wall_s": round(wall_s, 1),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/world_igpo.py")
    parser.add_argument("--run_dir", default="/tmp/igpo_learning")
    args, extra = parser.parse_known_args()
    shutil.rmtree(args.run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "igpo_jax.train", f"--config={args.config}", f"--config.run_dir={args.run_dir}",
           "--config.trainer.val_before_train=True", *[x for x in extra if x != "--"]]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall_s = time.perf_counter() - start
    records = read_jsonl(args.run_dir)
    for r in records:
        if "val/f1" in r:
            print(f"step {r['step']:>3}  val/f1 {r['val/f1']:+.3f} ± {r.get('val/f1_se', float('nan')):.3f}  "
                  f"no_format_f1 {r['val/no_format_f1']:.3f} ± {r.get('val/no_format_f1_se', float('nan')):.3f}  "
                  f"format_error {r.get('val/format_error', float('nan')):.2f}")
    out = summarise(records, wall_s)
    change, se, _ = paired_difference(per_question([args.run_dir], out["val_steps"][-1]),
                                      per_question([args.run_dir], 0))
    out.update(val_no_format_f1_change=round(change, 4), val_no_format_f1_change_se=round(se, 4))
    print(json.dumps(out))


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
