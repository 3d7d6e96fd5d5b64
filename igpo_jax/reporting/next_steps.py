"""The lines a finished training program ends with: where to look at what it did, and what to run
next. A newcomer's first run should not end on a metrics line with nothing said."""

from __future__ import annotations

import os

import ml_collections

# The comparison experiment each kind of run leads to (configs/sweeps/): IGPO against GRPO, 3 seeds.
WORLD_SWEEP = "configs/sweeps/world_igpo_vs_grpo.py"
DATA_FILES_SWEEP = "configs/sweeps/igpo_vs_grpo.py"


def next_steps(config: ml_collections.ConfigDict) -> str:
    run_dir = config.run_dir
    sweep = WORLD_SWEEP if config.data.synthetic_world else DATA_FILES_SWEEP
    return "\n".join([
        f"Done. Everything this run wrote is in {run_dir}/ (metrics.jsonl, samples/, checkpoints/). Next:",
        f"  python -m igpo_jax.report {run_dir}    # writes {os.path.join(run_dir, 'report.html')}: "
        "curves, config, episodes turn by turn",
        f"  python -m igpo_jax.plot {run_dir}      # the learning curves as a PNG",
        f"  python -m igpo_jax.sweep {sweep} --launch    # the comparison: IGPO against GRPO, 3 seeds each",
    ])
