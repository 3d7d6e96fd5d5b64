"""Experiment configs say what their docstrings say: the paper's config follows the reference's
script, and the arms of an experiment differ from each other by one switch."""

import importlib.util
import os

from igpo_jax import config_base

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_the_paper_config_uses_the_reference_scripts_information_gain():
    # the reference's train.sh and the paper's best variant (Table 5): log-prob IG, separate, γ = 1
    c = _config("qwen2_5_7b_igpo")
    assert (c.algorithm.info_gain_type, c.algorithm.info_gain_norm_mode, c.algorithm.gamma) == \
        ("log_prob_diff", "separate", 1.0)
    config_base.validate(c)
