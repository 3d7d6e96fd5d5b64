"""Settings that cannot do what they say are refused, naming the key, before anything starts."""

import pytest

from igpo_jax.config_base import base_config, validate


def _config():
    c = base_config()
    c.data.synthetic_world = True  # a data source, so that validation reaches the algorithm's keys
    return c


@pytest.mark.parametrize("use_info_gain, norm_mode", [(True, "separate"), (False, "joint")])
def test_a_curriculum_that_would_cancel_under_std_division_is_refused(use_info_gain, norm_mode):
    c = _config()
    c.algorithm.use_info_gain, c.algorithm.info_gain_norm_mode = use_info_gain, norm_mode
    c.algorithm.use_curriculum = True
    with pytest.raises(ValueError, match="use_curriculum=True has no effect"):
        validate(c)
    c.algorithm.norm_adv_by_std_in_grpo = False  # mean-centring only: the weights scale each part
    validate(c)


def test_a_curriculum_in_joint_mode_is_accepted():
    c = _config()
    c.algorithm.use_info_gain, c.algorithm.info_gain_norm_mode, c.algorithm.use_curriculum = True, "joint", True
    validate(c)


def test_dynamic_sampling_is_off_by_default_and_bad_settings_name_their_key():
    c = _config()
    assert not c.algorithm.filter_groups.enable  # the paper trains on every group
    for metric in ("advantage", "acc", "score", "seq_final_reward", "seq_reward"):
        c.algorithm.filter_groups.metric = metric
        validate(c)
    c.algorithm.filter_groups.metric = "std"
    with pytest.raises(ValueError, match=r"config.algorithm.filter_groups.metric='std' is not allowed"):
        validate(c)
    c = _config()
    c.algorithm.filter_groups.max_num_gen_batches = -1
    with pytest.raises(ValueError, match=r"filter_groups.max_num_gen_batches=-1 must be an integer ≥ 0"):
        validate(c)
    c = _config()
    c.algorithm.filter_groups.enable, c.rollout.n = True, 1
    with pytest.raises(ValueError, match=r"filter_groups.enable=True needs rollout.n ≥ 2"):
        validate(c)
    c.rollout.n, c.algorithm.filter_groups.max_num_gen_batches = 2, 0  # 0: one pass over the data
    validate(c)


@pytest.mark.parametrize("key, value", [("use_outcome_reward", False), ("shuffle_info_gain", True)])
def test_the_ig_controls_need_information_gain(key, value):
    c = _config()
    c.algorithm[key] = value
    validate(c)  # IGPO: fine
    c.algorithm.use_info_gain = False
    with pytest.raises(ValueError, match=r"IG-only\) and config.algorithm.shuffle_info_gain=True \(placebo\) act on "
                                         r"information gains: they need config.algorithm.use_info_gain=True"):
        validate(c)


def test_the_gains_norm_scope_and_std_floor_need_their_own_normalisation():
    c = _config()
    c.algorithm.info_gain_norm_mode, c.algorithm.info_gain_norm_scope, c.algorithm.info_gain_std_floor = "separate", "turn", 0.5
    validate(c)
    c.algorithm.info_gain_norm_mode = "joint"
    with pytest.raises(ValueError, match=r"need use_info_gain=True and info_gain_norm_mode='separate'"):
        validate(c)
    c.algorithm.use_outcome_reward = False  # IG-only: the gains are normalised alone in either mode
    validate(c)
    c.algorithm.info_gain_std_floor = -1.0
    with pytest.raises(ValueError, match=r"info_gain_std_floor=-1.0 must be ≥ 0"):
        validate(c)
    c.algorithm.info_gain_std_floor, c.algorithm.norm_adv_by_std_in_grpo = 0.5, False
    with pytest.raises(ValueError, match="nothing is divided"):
        validate(c)
    c.algorithm.info_gain_norm_scope = "position"
    with pytest.raises(ValueError, match="info_gain_norm_scope"):
        validate(c)


def test_an_unknown_world_shape_key_is_refused():
    c = _config()
    c.data.world_shape.namesake = 3
    with pytest.raises(ValueError, match=r"config.data.world_shape has unknown key\(s\) \['namesake'\]"):
        validate(c)
