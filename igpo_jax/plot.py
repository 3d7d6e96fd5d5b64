"""Learning curves from runs' metrics.jsonl, several runs on one figure (e.g. IGPO vs GRPO).

    python -m igpo_jax.plot runs/igpo runs/grpo [--out curves.png] [--keys reward/mean,val/f1]

One subplot per metric key, one line per run (labelled by its directory name). Steps where a run
has no finite value for a key (validation runs only every test_freq steps) are skipped, so the
points that exist are joined. Needs matplotlib (drawn off-screen with the Agg backend).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from igpo_jax.metrics import read_jsonl

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


def plot_runs(run_dirs: Sequence[str], out: str, keys: Sequence[str] | None = None) -> list[str]:
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
    for ax, key in zip(axes.flat, keys):
        for label, records in runs.items():
            steps, values = curve(records, key)
            if steps:
                ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None, markersize=3)
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
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    try:
        plotted = plot_runs(args.run_dirs, args.out, keys)
    except (ImportError, ValueError, FileNotFoundError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"wrote {args.out} ({', '.join(plotted)})")


if __name__ == "__main__":
    main()
