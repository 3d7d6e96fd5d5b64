"""Learning curves from runs' metrics.jsonl, several runs on one figure (e.g. IGPO vs GRPO).

    python -m igpo_jax.plot runs/igpo runs/grpo [--out curves.png] [--keys reward/mean,val/f1]
    python -m igpo_jax.plot runs/sweep/* --by_arm      # igpo_seed0, igpo_seed1 … → one arm "igpo"

One subplot per metric key, one line per run (labelled by its directory name). Steps where a run
has no finite value for a key (validation runs only every test_freq steps) are skipped, so the
points that exist are joined. With --by_arm, runs whose names differ only in a `_seed<N>` suffix
are one arm: its seeds drawn thin in one colour, their mean (at the steps every seed of the arm
has) drawn bold. Needs matplotlib (drawn off-screen with the Agg backend).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Sequence

from igpo_jax.reporting.metrics import read_jsonl

DEFAULT_KEYS = ("reward/mean", "reward/f1", "ig/mean", "val/f1", "actor/pg_loss", "response_length/mean")
INSTALL_HINT = "pip install matplotlib"


def load_matplotlib_pyplot():
    """pyplot with the non-interactive Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from e
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def run_labels(run_dirs: Sequence[str]) -> list[str]:
    """Each run's directory name, or its last two path parts where names repeat (a/seed0, b/seed0)."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [os.path.join(*os.path.normpath(d).split(os.sep)[-2:]) for d in run_dirs]


def curve(records: Sequence[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, leaving out steps where it is missing or not finite."""
    points = [(int(r["step"]), r[key]) for r in records if key in r and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def arm_of(label: str) -> str:
    """A sweep run's arm: its label without the `_seed<N>` suffix (igpo_seed2 → igpo)."""
    return re.sub(r"_seed\d+$", "", label)


def mean_curve(curves: Sequence[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    """The mean of several (steps, values) curves at the steps all of them have."""
    common = sorted(set.intersection(*(set(steps) for steps, _ in curves))) if curves else []
    at = [dict(zip(steps, values)) for steps, values in curves]
    return common, [sum(c[s] for c in at) / len(at) for s in common]


def plot_runs(run_dirs: Sequence[str], out: str, keys: Sequence[str] | None = None,
              by_arm: bool = False) -> list[str]:
    """Writes the figure to `out` (PNG); returns the keys plotted.

    With `keys` None, the DEFAULT_KEYS that some run has; asking for a key no run has is an
    error that lists the keys there are."""
    if not run_dirs:
        raise ValueError("no run directories given")
    runs = {label: read_jsonl(d) for label, d in zip(run_labels(run_dirs), run_dirs)}
    available = sorted({k for records in runs.values() for r in records for k in r} - {"step"})
    has_points = lambda key: any(curve(records, key)[0] for records in runs.values())
    if keys is None:
        keys = [k for k in DEFAULT_KEYS if has_points(k)]
        if not keys:
            raise ValueError(f"none of the default keys {', '.join(DEFAULT_KEYS)} has values in these runs; "
                             f"choose with --keys from: {', '.join(available) or 'none (empty metrics files)'}")
    else:
        missing = [k for k in keys if not has_points(k)]
        if missing:
            raise ValueError(f"no values for {', '.join(missing)} in these runs; "
                             f"available keys: {', '.join(available) or 'none'}")

    plt = load_matplotlib_pyplot()
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    arms = {}
    for label in runs:
        arms.setdefault(arm_of(label) if by_arm else label, []).append(label)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        for i, (arm, labels) in enumerate(arms.items()):
            colour = colours[i % len(colours)]
            curves = [c for c in (curve(runs[label], key) for label in labels) if c[0]]
            marker = dict(marker="o", markersize=3) if curves and len(curves[0][0]) < 20 else {}
            if len(labels) == 1:
                if curves:
                    ax.plot(*curves[0], label=arm, color=colour, **marker)
                continue
            for steps, values in curves:
                ax.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
            steps, values = mean_curve(curves)
            if steps:
                ax.plot(steps, values, color=colour, linewidth=2.2, label=f"{arm} (mean of {len(curves)})", **marker)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return list(keys)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m igpo_jax.plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories holding metrics.jsonl")
    parser.add_argument("--out", default="learning_curves.png", help="PNG file to write")
    parser.add_argument("--keys", default=None,
                        help=f"comma-separated metric keys (default: those of {','.join(DEFAULT_KEYS)} present)")
    parser.add_argument("--by_arm", action="store_true",
                        help="runs named <arm>_seed<N>: per-seed curves thin, each arm's mean bold")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    try:
        plotted = plot_runs(args.run_dirs, args.out, keys, by_arm=args.by_arm)
    except (ImportError, ValueError, FileNotFoundError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"wrote {args.out} ({', '.join(plotted)})")


if __name__ == "__main__":
    main()
