"""The embedded default run, measured: wall time per phase and peak resident memory.

    python -m bench.demo [--run_dir /tmp/igpo_demo_bench] [-- extra --config.x=y flags]

Runs `python -m igpo_jax.train --config=configs/demo.py` as a child process in a fresh run
directory (so nothing is resumed), then reads its metrics.jsonl. Targets (2 CPU cores, alone): the
final validation's no-format F1 at least 0.25 above step 0's (on ≥ 48 held-out questions), the
whole run ≤ 12 minutes, peak RSS ≤ 6 GiB. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

from igpo_jax.reporting.metrics import read_jsonl


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run_dir", default="/tmp/igpo_demo_bench")
    args, extra = parser.parse_known_args()
    shutil.rmtree(args.run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "igpo_jax.train", "--config=configs/demo.py", f"--config.run_dir={args.run_dir}",
           *[x for x in extra if x != "--"]]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall_s = time.perf_counter() - start
    peak_rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    records = read_jsonl(args.run_dir)
    phases = {}
    for phase in ("rollout", "scoring", "update"):
        phases[f"{phase}_s"] = round(sum(r.get(f"time/{phase}_s", 0.0) for r in records), 1)
    result = {
        "bench": "demo", "steps": max((int(r["step"]) for r in records), default=0), "wall_s": round(wall_s, 1), **phases,
        "other_s": round(wall_s - sum(phases.values()), 1),  # start-up, compilation outside steps, validation
        "peak_rss_gib": round(peak_rss_gib, 2),
        "ig_mean_per_step": [round(r.get("ig/mean", float("nan")), 4) for r in records],
        "searches_per_episode": [round(r.get("rollout/searches_per_episode", 0.0), 2) for r in records],
        "val_f1": next((r["val/f1"] for r in reversed(records) if "val/f1" in r), None),
        "within_time_and_memory": wall_s <= 720 and peak_rss_gib <= 6,
    }
    val = [r for r in records if "val/no_format_f1" in r]
    if val:  # step 0 (before the first update) and the last validation
        for key in ("val/no_format_f1", "val/no_format_f1_se", "val/f1", "val/format_error"):
            name = key.split("/", 1)[1]
            result[f"{name}_step{val[0]['step']}"] = round(val[0].get(key, float("nan")), 4)
            result[f"{name}_final"] = round(val[-1].get(key, float("nan")), 4)
        result["no_format_f1_rise"] = round(val[-1]["val/no_format_f1"] - val[0]["val/no_format_f1"], 4)
        result["validation_questions"] = int(val[-1].get("val/questions", 0))
        result["within_targets"] = (result["within_time_and_memory"] and val[-1]["step"] > val[0]["step"]
                                    and result["no_format_f1_rise"] >= 0.25 and result["validation_questions"] >= 48)
    print(json.dumps(result))


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
