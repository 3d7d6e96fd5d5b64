"""Experiment configs say what their docstrings say: the paper's config follows the reference's
script, and the arms of an experiment differ from each other by one switch."""

import os

from igpo_jax import config_base
from tests.conftest import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

_config = load_config


def test_the_paper_config_uses_the_reference_scripts_information_gain():
    # the reference's train.sh and the paper's best variant (Table 5): log-prob IG, separate, γ = 1
    c = _config("qwen2_5_7b_igpo")
    assert (c.algorithm.info_gain_type, c.algorithm.info_gain_norm_mode, c.algorithm.gamma) == \
        ("log_prob_diff", "separate", 1.0)
    config_base.validate(c)


def _flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_two_hop_arms_differ_from_igpo_by_one_switch():
    igpo = _flat(_config("world_two_hop_igpo"))
    assert (igpo["algorithm.info_gain_type"], igpo["algorithm.info_gain_norm_mode"], igpo["algorithm.gamma"]) == \
        ("log_prob_diff", "separate", 1.0)
    assert (igpo["rollout.forced_prefix"], igpo["rollout.last_turn_prefix"], igpo["rollout.max_turns"]) == \
        ("<", "<answer>", 4)  # free turns (a tag of the policy's choice), an answer forced on the last one only
    for name, switch in (("world_two_hop_grpo", {"algorithm.use_info_gain": False}),
                         ("world_two_hop_ig_only", {"algorithm.use_outcome_reward": False}),
                         ("world_two_hop_placebo", {"algorithm.shuffle_info_gain": True})):
        config = _config(name)
        config_base.validate(config)
        arm = _flat(config)
        assert {k: v for k, v in arm.items() if igpo[k] != v} == {**switch, "run_dir": f"runs/{name}"}, name


def test_the_two_hop_sweep_runs_each_arm_with_its_switch_and_seeds():
    from igpo_jax import sweep

    path = os.path.join(CONFIGS, "sweeps", "world_two_hop_arms.py")
    names = [cmd[4].rsplit("/", 1)[1] for cmd in sweep.commands(path)]
    assert names == ["igpo_seed0", "grpo_seed0", "ig_only_seed0", "placebo_seed0", "grpo_ds_seed0",
                     "igpo_seed1", "grpo_seed1", "igpo_seed2", "grpo_seed2"]
    placebo = sweep.commands(path)[3]
    assert placebo[3] == "--config=configs/world_two_hop_igpo.py"
    assert placebo[5:] == ["--config.algorithm.shuffle_info_gain=True", "--config.seed=0"]
    # the fifth arm: dynamic sampling at the rollouts the other arms generate in their 12 steps
    base = _config("world_two_hop_igpo")
    budget = base.trainer.total_training_steps * base.data.train_batch_size * base.rollout.n
    assert sweep.commands(path)[4][5:] == [
        "--config.algorithm.use_info_gain=False", "--config.algorithm.filter_groups.enable=True",
        f"--config.trainer.rollout_budget={budget}", "--config.seed=0"]


def test_the_group_size_attempt_changes_both_arms_alike_and_keeps_16_episodes_a_step():
    from igpo_jax import sweep

    path = os.path.join(CONFIGS, "sweeps", "world_two_hop_n8.py")
    cmds = {cmd[4].rsplit("/", 1)[1]: cmd[5:] for cmd in sweep.commands(path)}
    assert list(cmds) == ["igpo_seed0", "grpo_seed0", "igpo_seed1", "grpo_seed1", "igpo_seed2", "grpo_seed2"]
    shared = ["--config.rollout.n=8", "--config.data.train_batch_size=2"]
    assert cmds["igpo_seed1"] == shared + ["--config.seed=1"]
    assert cmds["grpo_seed1"] == shared + ["--config.algorithm.use_info_gain=False", "--config.seed=1"]
    base = _config("world_two_hop_igpo")
    assert base.rollout.n * base.data.train_batch_size == 8 * 2
    base.rollout.n, base.data.train_batch_size = 8, 2
    config_base.validate(base)
