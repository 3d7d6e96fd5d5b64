"""Multi-host training: two processes × 2 CPU devices (gloo on 127.0.0.1) train like one process.

Each process rolls out only its own question (of two) × n rollouts, with the seeds of those
global rows; the update runs over the 4-device global mesh. Same config in this (1-device)
process is the reference.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from igpo_jax import components
from igpo_jax.reporting import host_metrics
from igpo_jax.training import checkpoint
from igpo_jax.train import train
from tests.process_pair import run_process_pair
from tests.train_test import smoke_config, tiny_model_dir  # noqa: F401  (fixture)

STEPS = 1  # validation runs after the update, so it also reads the refreshed local params


def multihost_config(model_dir: str, run_dir: str, steps: int):
    """The train_test smoke config (2 questions × 2 rollouts, mock search, tiny model), with one
    checkpoint at the end and validation at the last step."""
    c = smoke_config(model_dir, run_dir, steps)
    c.trainer.save_freq = steps
    c.trainer.test_freq = steps
    c.trainer.use_tensorboard = False
    # Scoring that computes a micro-batch's shared prompt once (on by default) sums in an order that
    # depends on which rows share a micro-batch, and the two layouts batch different rows. The random
    # tiny model's information gains are float noise (~1e-7) that the group z-score turns into
    # full-size advantages, so any change of summation order changes the update. Whole-row scoring
    # keeps both layouts' sums alike; the shared-prompt path is held to whole-row scoring in
    # scoring_test.py.
    c.actor.share_prompt_prefix = False
    return c


def _train_in_two_processes(model_dir: str, run_dir: str, steps: int) -> list[dict]:
    run_process_pair("tests.multihost_train_checks",
                     lambda address, i: [model_dir, run_dir, str(steps), address, str(i)],
                     devices_per_process=2, timeout=540)
    with open(os.path.join(run_dir, "history.json")) as f:
        return json.load(f)


def _final_params(model_dir: str, run_dir: str, steps: int) -> list[np.ndarray]:
    model, _ = components.load_policy(multihost_config(model_dir, run_dir, steps))
    checkpoint.restore_params(os.path.join(run_dir, "checkpoints"), model, step=steps)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


# Host-side metrics that must agree exactly in meaning: the same rollouts, rewards and update.
COMPARED = ("reward/mean", "reward/f1", "reward/format_error_rate", "ig/mean", "ig/std", "ig/count",
            "advantage/mean", "response_length/mean", "rollout/turns_per_episode",
            "rollout/searches_per_episode", "search/queries", "actor/loss", "actor/pg_loss", "actor/kl_ref",
            "actor/entropy", "actor/grad_norm", "val/f1", "val/turns")


def test_two_process_training_equals_one_process(tiny_model_dir, tmp_path):  # noqa: F811
    """Metrics to rel 1e-4 (abs 1e-6), final params to atol 1e-2·lr (measured here: equal loss,
    max |Δparam| 3e-6 for a 1e-3 step): float rounding differs (4 devices and a gloo all-reduce
    against 1 device), and Adam's first step amplifies it in parameters whose gradient is ~0."""
    run_2, run_1 = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
    two = _train_in_two_processes(tiny_model_dir, run_2, STEPS)
    one = train(multihost_config(tiny_model_dir, run_1, STEPS))
    assert [h["step"] for h in two] == [h["step"] for h in one] == list(range(1, STEPS + 1))
    assert one[0]["response_length/mean"] > 0 and one[0]["actor/grad_norm"] > 0
    for a, b in zip(one, two):
        for key in COMPARED:
            if key in a or key in b:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    lr = multihost_config(tiny_model_dir, run_1, STEPS).actor.lr
    after_one = _final_params(tiny_model_dir, run_1, STEPS)
    after_two = _final_params(tiny_model_dir, run_2, STEPS)
    worst = max(float(np.max(np.abs(x - y))) for x, y in zip(after_one, after_two))
    moved = max(float(np.max(np.abs(x - y))) for x, y in
                zip(after_one, (np.asarray(p) for p in jax.tree.leaves(nnx.state(
                    components.load_policy(multihost_config(tiny_model_dir, run_1, STEPS))[0], nnx.Param)))))
    print(f"two processes vs one: loss {two[-1]['actor/loss']!r} vs {one[-1]['actor/loss']!r}, "
          f"max |Δparam| {worst:.2e} (the steps moved params by up to {moved:.2e})")
    assert moved > 10 * worst  # the comparison is not vacuous: training did move the params
    assert worst <= 1e-2 * lr, worst
    assert not os.path.exists(os.path.join(run_2, "metrics.jsonl.1"))  # one writer: process 0


def test_host_metrics_combine_by_meaning():
    a = {"reward/mean": 1.0, "ig/mean": 0.5, "ig/std": 0.0, "ig/count": 2.0, "advantage/mean": 1.0,
         "search/queries": 3, "time/update_s": 2.0, "rollout/decode_s": 1.0, "time/rollout_tok_s": 10.0,
         "curriculum/w_f1": 0.7, "memory/peak_rss_after_update_gib": 5.0}
    b = {"reward/mean": 0.0, "ig/mean": -0.5, "ig/std": 0.0, "ig/count": 2.0, "advantage/mean": -1.0,
         "search/queries": 4, "time/update_s": 3.0, "rollout/decode_s": 0.5, "time/rollout_tok_s": 5.0,
         "curriculum/w_f1": 0.7, "memory/peak_rss_after_update_gib": 4.0}
    out = host_metrics.combine([a, b], rows=[2, 2], generated_tokens=[1, 3])
    assert out == {"reward/mean": 0.5, "ig/mean": 0.0, "ig/std": 0.5, "ig/count": 4.0,
                   "advantage/mean": -0.5,  # (1·1 − 1·3) / 4
                   "search/queries": 7.0, "time/update_s": 3.0, "rollout/decode_s": 1.0,
                   "time/rollout_tok_s": 15.0, "curriculum/w_f1": 0.7, "memory/peak_rss_after_update_gib": 5.0}
    # values {1, 3} and {5}: mean 3, population std √(8/3)
    pooled = host_metrics.combine([{"ig/mean": 2.0, "ig/std": 1.0, "ig/count": 2},
                                   {"ig/mean": 5.0, "ig/std": 0.0, "ig/count": 1}], [1, 1], [0, 0])
    assert pooled["ig/mean"] == pytest.approx(3.0) and pooled["ig/std"] == pytest.approx(np.sqrt(8 / 3))
    empty = host_metrics.combine([{"ig/mean": 0.0, "advantage/mean": 0.0, "ig/count": 0}] * 2, [2, 2], [0, 0])
    assert empty["ig/mean"] == 0.0 and empty["advantage/mean"] == 0.0
    with pytest.raises(ValueError, match="one metrics dict, row count and token count per process"):
        host_metrics.combine([a], rows=[1, 1], generated_tokens=[1])
