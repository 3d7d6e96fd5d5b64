"""Expand a sweep file into training command lines (and optionally run them one after another).

    python -m igpo_jax.sweep configs/sweeps/igpo_vs_grpo.py            # print the commands
    python -m igpo_jax.sweep configs/sweeps/igpo_vs_grpo.py --launch   # run them here, in turn

A sweep file defines `BASE_CONFIG` (a config path) and `get_sweep()`, which returns a list of
{name: override dict}; each run gets `--config.run_dir=runs/<sweep>/<name>`. Pipe the printed
lines into your scheduler (one per SLURM job or TPU slice) to run them in parallel.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import shlex
import subprocess
import sys


def grid(**axes) -> list[dict]:
    """Cartesian product: grid(a=[1, 2], b=['x']) → [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}]."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def igpo_and_grpo(seeds=(0, 1, 2)) -> dict[str, dict]:
    """The comparison sweep: {igpo_seed<N>, grpo_seed<N>: overrides}, seed by seed (a sweep cut
    short still holds both arms for the seeds it ran); plot them with `plot --by_arm`."""
    runs = {}
    for point in grid(seed=list(seeds), use_info_gain=[True, False]):
        name = f"{'igpo' if point['use_info_gain'] else 'grpo'}_seed{point['seed']}"
        runs[name] = {"algorithm.use_info_gain": point["use_info_gain"], "seed": point["seed"]}
    return runs


def commands(sweep_path: str) -> list[list[str]]:
    spec = importlib.util.spec_from_file_location("sweep", sweep_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweep_name = os.path.splitext(os.path.basename(sweep_path))[0]
    out = []
    for name, overrides in module.get_sweep().items():
        argv = [sys.executable, "-m", "igpo_jax.train", f"--config={module.BASE_CONFIG}",
                f"--config.run_dir=runs/{sweep_name}/{name}"]
        argv += [f"--config.{key}={value}" for key, value in overrides.items()]
        out.append(argv)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep")
    parser.add_argument("--launch", action="store_true")
    args = parser.parse_args(argv)
    for cmd in commands(args.sweep):
        print(shlex.join(cmd))
        if args.launch:
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
