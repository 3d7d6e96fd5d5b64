"""One HTML page per experiment: learning curves, config and final metrics, and what the agent did.

    python -m igpo_jax.report runs/demo [runs/grpo …] [--step N] [--out report.html]

Self-contained (the curves are an inline PNG drawn by igpo_jax.plot, no network), so it can be
mailed or opened from a cluster's file system. The episodes shown are a step's rollout samples
(RUN_DIR/samples/step_NNNNNN.jsonl, written at validation steps and every trainer.sample_freq
steps): `--step` picks the step, by default each run's latest. An `igpo_jax.evaluate` output
directory works as a RUN_DIR too (its episodes.jsonl has the same records).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
from collections.abc import Sequence

from igpo_jax import plot
from igpo_jax.reporting.metrics import read_jsonl
from igpo_jax.reporting import samples as samples_lib
from igpo_jax.reporting.html import RunView, flatten, render_page

EVAL_EPISODES = "episodes.jsonl"  # igpo_jax.evaluate's records, shown when a directory has no samples/


def load_run(run_dir: str, label: str, step: int | None) -> RunView:
    config_path = os.path.join(run_dir, "config.json")
    config = flatten(json.load(open(config_path, encoding="utf-8"))) if os.path.exists(config_path) else {}
    try:
        records = read_jsonl(run_dir)
    except FileNotFoundError:
        records = []
    final = {k: v for k, v in records[-1].items()} if records else {}
    steps = samples_lib.sample_steps(run_dir)
    if step is not None and step not in steps:
        raise ValueError(f"{run_dir} has no samples for step {step}; it has {steps or 'none'}")
    chosen = step if step is not None else (steps[-1] if steps else None)
    if chosen is not None:
        episodes = samples_lib.read_samples(run_dir, chosen)
    elif os.path.exists(os.path.join(run_dir, EVAL_EPISODES)):
        episodes = samples_lib.read_samples(os.path.join(run_dir, EVAL_EPISODES))
        chosen = int(final.get("step", 0))
    else:
        episodes = []
    return RunView(label, config, final, chosen, episodes)


def curves_png(run_dirs: Sequence[str]) -> tuple[str | None, list[str], str]:
    """(base64 PNG, keys, '') of every run's curves, or (None, [], why) where none can be drawn."""
    with_metrics = [d for d in run_dirs if os.path.exists(os.path.join(d, "metrics.jsonl"))]
    if not with_metrics:
        return None, [], "no metrics.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "curves.png")
        try:
            keys = plot.plot_runs(with_metrics, out)
        except (ImportError, ValueError) as e:
            return None, [], str(e)
        with open(out, "rb") as f:
            return base64.b64encode(f.read()).decode("ascii"), keys, ""


def build_report(run_dirs: Sequence[str], step: int | None = None) -> str:
    if not run_dirs:
        raise ValueError("no run directories given")
    labels = plot.run_labels(run_dirs)
    runs = [load_run(d, label, step) for d, label in zip(run_dirs, labels)]
    png, keys, why = curves_png(run_dirs)
    return render_page(f"igpo_jax report: {', '.join(labels)}", png, keys, runs, why)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m igpo_jax.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--step", type=int, default=None, help="the step whose samples to show (default: latest)")
    parser.add_argument("--out", default=None, help="HTML file (default: RUN_DIR/report.html of the first run)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.run_dirs[0], "report.html")
    try:
        page = build_report(args.run_dirs, args.step)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(1, f"error: {e}\n")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
