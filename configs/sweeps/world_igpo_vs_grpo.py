"""IGPO vs GRPO × seeds 0, 1, 2 on the embedded world (6 runs of configs/world_igpo.py; GRPO is
the same config with algorithm.use_info_gain=False, i.e. configs/world_grpo.py):

    python -m igpo_jax.sweep configs/sweeps/world_igpo_vs_grpo.py [--launch]   # one after another
    python -m bench.sweep_summary runs/world_igpo_vs_grpo          # means, per seed, paired changes
    python -m igpo_jax.plot runs/world_igpo_vs_grpo/* --by_arm --out bench/results/world_igpo_vs_grpo.png \
        --keys val/no_format_f1,val/format_error,diag/collapse_frac,ig/mean,diag/ig_answer_doc
    python -m bench.learning --config=configs/world_igpo.py -- --config.seed=1   # one arm, one seed, JSON

On the 2-core development machine run them one at a time (--launch): each is one full
world_igpo run, ~17 minutes, so the six take under 1 hour 45 minutes (2026-12-06). The seed
changes the rollouts' sampling and the question order, not the world (data.world_seed) nor the
held-out validation questions. Expect both arms near 0.87-0.88 validation no-format F1 at step
12 (IGPO 0.882, GRPO 0.865, means of 3 seeds, 2026-12-06). Record: bench/results/world_igpo.md;
curves: bench/results/world_igpo_vs_grpo.png.
"""

from igpo_jax.sweep import igpo_and_grpo

BASE_CONFIG = "configs/world_igpo.py"


def get_sweep():
    return igpo_and_grpo(seeds=(0, 1, 2))
