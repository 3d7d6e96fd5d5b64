"""The jitted update: masking, ρ = 1 on the first mini-batch, learning, NaN safety, accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from igpo_jax.igpo.loss import AGG_MODES, policy_loss
from igpo_jax.model.weights import load_hf
from igpo_jax.training.update import UpdateBatch, UpdateConfig, Updater, compute_logprobs, train_step
from tests.conftest import write_tiny_hf_model

N, L = 4, 12


@pytest.fixture()
def model(tmp_path):
    write_tiny_hf_model("qwen2", tmp_path)
    return load_hf(str(tmp_path))


def _batch(model, advantage_scale=1.0):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.cfg.vocab_size, (N, L)).astype(np.int32)
    valid = np.ones((N, L), bool)
    valid[1, 9:] = False  # right padding
    loss_mask = np.zeros((N, L), np.float32)
    loss_mask[:, 4:7] = 1  # turn 1
    loss_mask[:, 9:11] = 1  # turn 2 (7, 8 are a tool result; 0..3 the prompt)
    loss_mask[1, 9:] = 0
    advantage = np.where(loss_mask > 0, advantage_scale * np.array([[1.0], [-0.5], [0.25], [-1.0]]), 0.0)
    old = compute_logprobs(model, tokens, valid)
    return UpdateBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(loss_mask),
                       jnp.asarray(advantage, jnp.float32), jnp.asarray(old), jnp.asarray(old))


def test_loss_gradient_is_exactly_zero_off_the_loss_mask(model):
    b = _batch(model)
    grad = jax.grad(lambda lp: policy_loss(lp, b.old_logp_NL, b.advantage_NL, b.loss_mask_NL,
                                           ref_logp_BL=b.ref_logp_NL)[0])(b.old_logp_NL)
    grad = np.asarray(grad)
    off = np.asarray(b.loss_mask_NL) == 0
    assert np.all(grad[off] == 0.0) and np.all(grad[~off] != 0.0)
    # and the parameter gradient ignores whatever advantages sit on prompt / tool / padding tokens
    cfg = UpdateConfig(lr=1e-3)
    graphdef, params = nnx.split(model)
    noisy = UpdateBatch(b.tokens_NL, b.valid_NL, b.loss_mask_NL,
                        jnp.where(b.loss_mask_NL > 0, b.advantage_NL, 1e6), b.old_logp_NL, b.ref_logp_NL)
    p1, _, m1 = train_step(graphdef, jax.tree.map(jnp.copy, params), Updater(model, cfg).opt_state, b, cfg, 1)
    p2, _, m2 = train_step(graphdef, jax.tree.map(jnp.copy, params), Updater(model, cfg).opt_state, noisy, cfg, 1)
    assert float(m1["grad_norm"]) == float(m2["grad_norm"])
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(x, y)


def _full_logits_logprobs(model, tokens_NL, valid_NL) -> np.ndarray:
    """log π(token j | tokens < j) computed independently of `token_logprobs`: the model's plain
    forward, every position's full [V] logits and a log_softmax (no chunks, no gathered positions,
    no custom gradient); column 0 is 0."""
    from igpo_jax.model.qwen import forward_padded

    tokens_NL = jnp.asarray(tokens_NL)
    logits = forward_padded(model, tokens_NL, jnp.asarray(valid_NL)) / model.cfg.logprob_temperature
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], axis=-1), tokens_NL[:, 1:, None], axis=-1)
    return np.pad(np.asarray(logp[..., 0]), ((0, 0), (1, 0)))


def test_first_mini_batch_has_ratio_one_and_the_second_measures_the_first_step(model):
    """Mini-batch 1 takes π_old = π_θ (ρ = 1), whatever old_logp the batch carries; mini-batch 2 takes
    the batch's π_old, so its approx_kl is mean(old − new) with `new` the log-probs after step 1."""
    b = _batch(model)
    cfg = UpdateConfig(lr=1e-3, ppo_mini_batch_size=2)
    first, second = slice(0, 2), slice(2, 4)
    # π_old of mini-batch 1 shifted: were it used, ρ = e^−0.3 there and approx_kl 0.3
    shifted = b.old_logp_NL.at[first].add(0.3 * b.loss_mask_NL[first])
    batch = UpdateBatch(b.tokens_NL, b.valid_NL, b.loss_mask_NL, b.advantage_NL, shifted, b.ref_logp_NL)
    graphdef, params = nnx.split(model)
    start = jax.tree.map(jnp.copy, params)
    opt = jax.tree.map(jnp.copy, Updater(model, cfg).opt_state)
    m1, m2 = Updater(model, cfg).update(batch)

    advantage1, mask1 = np.asarray(b.advantage_NL[first]), np.asarray(b.loss_mask_NL[first])
    assert float(m1["approx_kl"]) == 0.0
    assert float(m1["pg_loss"]) == pytest.approx(-float(np.sum(advantage1 * mask1) / mask1.sum()), rel=1e-6)
    # the params after step 1, by hand: the same step on mini-batch 1 from the same start
    after_first, _, _ = train_step(graphdef, start, opt, jax.tree.map(lambda x: x[first], batch), cfg, 1, True)
    new = _full_logits_logprobs(nnx.merge(graphdef, after_first), b.tokens_NL, b.valid_NL)[second]
    mask2 = np.asarray(b.loss_mask_NL[second])
    expected = float(np.sum((np.asarray(b.old_logp_NL[second]) - new) * mask2) / mask2.sum())
    assert abs(expected) > 1e-4  # the first step moved mini-batch 2's log-probs measurably
    assert float(m2["approx_kl"]) == pytest.approx(expected, rel=1e-3, abs=1e-7)


def test_trainer_logprobs_equal_a_full_logits_log_softmax(model):
    """`token_logprobs` (chunked vocab projection) and `compute_logprobs` (micro-batched, loss
    tokens only) against the plain full-logits computation, padding and several chunks included."""
    from igpo_jax.training.update import token_logprobs

    b = _batch(model)
    reference = _full_logits_logprobs(model, b.tokens_NL, b.valid_NL)
    valid = np.asarray(b.valid_NL)
    inside = np.asarray(token_logprobs(model, b.tokens_NL, b.valid_NL, 4)[0])  # 3 chunks of 4 positions
    np.testing.assert_allclose(inside[valid], reference[valid], atol=1e-5)
    assert np.all(inside[:, 0] == 0.0)
    mask = np.asarray(b.loss_mask_NL) > 0
    needed = np.asarray(compute_logprobs(model, b.tokens_NL, b.valid_NL, 2, chunk=4, needed_NL=b.loss_mask_NL))
    np.testing.assert_allclose(needed[mask], reference[mask], atol=1e-5)
    assert np.all(needed[~mask] == 0.0)


def test_step_metrics_cover_every_optimiser_step(model):
    """train.step_metrics logs the whole update, not its last optimiser step: a NaN-skipped first
    mini-batch shows in actor/skipped (a count) and the means are over the applied steps."""
    from types import SimpleNamespace

    from igpo_jax.train import step_metrics

    b = _batch(model)
    cfg = UpdateConfig(lr=1e-3, ppo_mini_batch_size=2)
    run = SimpleNamespace(search=SimpleNamespace(stats=SimpleNamespace(as_metrics=lambda prefix: {})), ucfg=cfg)
    traj = SimpleNamespace(loss_mask_NL=np.asarray(b.loss_mask_NL), valid_NL=np.asarray(b.valid_NL), num_rollouts=N)

    def logged(per_step):
        out = step_metrics(run, traj, {}, {}, per_step, {"rollout": 1.0, "update": 1.0}, {})
        return {k: float(v) for k, v in out.items()}

    updater = Updater(model, cfg)
    poisoned = UpdateBatch(b.tokens_NL, b.valid_NL, b.loss_mask_NL, b.advantage_NL.at[0, 5].set(jnp.nan),
                           b.old_logp_NL, b.ref_logp_NL)  # row 0: the first mini-batch
    per_step = updater.update(poisoned)
    assert [float(m["skipped"]) for m in per_step] == [1.0, 0.0]
    out = logged(per_step)
    assert out["actor/skipped"] == 1.0
    for key, of in (("grad_norm", "grad_norm"), ("grad_norm_max", "grad_norm"), ("loss", "loss")):
        assert out[f"actor/{key}"] == pytest.approx(float(per_step[1][of]), rel=1e-6), key  # the applied step's
    per_step = updater.update(b)  # both applied: means over the steps, and the largest norm
    out = logged(per_step)
    assert out["actor/skipped"] == 0.0
    for key in ("grad_norm", "loss", "pg_clipfrac_upper", "approx_kl", "kl_ref", "lr"):
        assert out[f"actor/{key}"] == pytest.approx(np.mean([float(m[key]) for m in per_step]), rel=1e-5), key
    assert out["actor/grad_norm_max"] == pytest.approx(max(float(m["grad_norm"]) for m in per_step), rel=1e-6)


def test_several_steps_on_a_fixed_batch_lower_the_loss(model):
    b = _batch(model)  # π_old fixed: the surrogate −A·ρ must fall as π_θ moves towards A
    cfg = UpdateConfig(lr=3e-3, use_kl_loss=False, clip_ratio_low=10.0, clip_ratio_high=10.0)
    graphdef, params = nnx.split(model)
    opt_state = Updater(model, cfg).opt_state
    losses = []
    for _ in range(6):
        params, opt_state, metrics = train_step(graphdef, params, opt_state, b, cfg, 2)
        losses.append(float(metrics["pg_loss"]))
    assert losses[0] == pytest.approx(-float(jnp.sum(b.advantage_NL) / jnp.sum(b.loss_mask_NL)), abs=1e-6)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.1, losses


def test_nan_loss_skips_the_update_and_leaves_params_unchanged(model):
    b = _batch(model)
    poisoned = UpdateBatch(b.tokens_NL, b.valid_NL, b.loss_mask_NL, b.advantage_NL.at[0, 5].set(jnp.nan),
                           b.old_logp_NL, b.ref_logp_NL)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(model))]
    updater = Updater(model, UpdateConfig(lr=1e-2))
    opt_before = [np.asarray(x).copy() for x in jax.tree.leaves(updater.opt_state)]
    metrics = updater.update(poisoned)
    assert float(metrics[0]["skipped"]) == 1.0
    for x, y in zip(before, jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(opt_before, jax.tree.leaves(updater.opt_state)):
        np.testing.assert_array_equal(x, y)
    # and a clean batch afterwards trains normally
    assert float(updater.update(b)[0]["skipped"]) == 0.0


@pytest.mark.parametrize("budget", [0, 16])  # padded and packed micro-batches
def test_every_mini_batch_shares_one_gradient_program(model, budget):
    """The first mini-batch (π_old = π_θ, ρ = 1) and the later ones (π_old given) are one program,
    traced once: a start-up pays for the largest program once (cache load, trace and lowering)."""
    b = jax.tree.map(lambda x: x[:, :11], _batch(model))  # a length no other test traces
    traced = []

    def on_duration(event, duration_secs, fun_name="", **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration" and fun_name.startswith("summed"):
            traced.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        metrics = Updater(model, UpdateConfig(lr=1e-3, ppo_mini_batch_size=2, micro_batch_size=1,
                                              max_tokens_per_micro_batch=budget)).update(b)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    assert traced == ["summed_packed_gradients" if budget else "summed_gradients"]
    assert float(metrics[0]["approx_kl"]) == 0.0 and float(metrics[1]["approx_kl"]) != 0.0  # ρ = 1, then not


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batch_accumulation_equals_one_big_batch(model, mode):
    b = _batch(model)
    cfg = UpdateConfig(lr=1e-3, loss_agg_mode=mode, loss_scale_factor=20.0)
    graphdef, params = nnx.split(model)
    opt = Updater(model, cfg).opt_state
    p1, _, m1 = train_step(graphdef, jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt), b, cfg, 1)
    p4, _, m4 = train_step(graphdef, jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt), b, cfg, 4)
    for key in ("loss", "pg_loss", "kl_loss", "approx_kl", "kl_ref"):
        np.testing.assert_allclose(float(m1[key]), float(m4[key]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-4)
    # Adam's first step is ≈ lr·g/|g|, which amplifies summation-order noise in tiny gradients:
    # compare params to 1% of the step size
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(x, y, atol=1e-2 * cfg.lr)


def test_bad_config_values():
    with pytest.raises(ValueError, match="schedule must be 'constant' or 'cosine'"):
        UpdateConfig(schedule="linear")
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        UpdateConfig(ppo_mini_batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="'seq-mean-token-sum-norm' needs loss_scale_factor > 0"):
        UpdateConfig(loss_agg_mode="seq-mean-token-sum-norm")  # no silent default from the padded length
    with pytest.raises(ValueError, match="loss_scale_factor=-1.0 must be ≥ 0"):
        UpdateConfig(loss_scale_factor=-1.0)


def test_adam_moments_are_float32_for_bf16_params(tmp_path):
    """optax's mu_dtype covers only the first moment; both must be float32 (a bf16 nu cannot hold
    the running mean of g²), while the params stay bf16 through a step."""
    write_tiny_hf_model("qwen2", tmp_path)
    model = load_hf(str(tmp_path), param_dtype="bfloat16", dtype="bfloat16")
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    updater = Updater(model, UpdateConfig(lr=1e-3))
    adam = updater.opt_state[1][0]  # chain(clip, adamw) → adamw's chain → ScaleByAdamState
    moments = jax.tree.leaves(adam.mu) + jax.tree.leaves(adam.nu)
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    metrics = updater.update(_batch(model))
    assert float(metrics[0]["skipped"]) == 0.0 and float(metrics[0]["grad_norm"]) > 0
    adam = updater.opt_state[1][0]
    assert {x.dtype for x in jax.tree.leaves(adam.mu) + jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    assert float(max(jnp.max(x) for x in jax.tree.leaves(adam.nu))) > 0  # it did accumulate g²
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


def test_only_an_fp32_compute_model_gets_the_cpu_dot_fusion_program(tmp_path):
    """The compiler option that sped up the fp32 train step slowed the bf16 one (xla_flags.py)."""
    from igpo_jax.training import update

    write_tiny_hf_model("qwen2", tmp_path)
    for dtype, program in (("float32", update._gradients_fp32), ("bfloat16", update._gradients_other)):
        graphdef, params = nnx.split(load_hf(str(tmp_path), dtype=dtype))
        assert update._gradient_program(graphdef, params) is program


def test_a_one_step_update_needs_no_old_logprobs(model):
    """π_old = π_θ on the only optimiser step: without old_logp_NL the step equals the one given
    the recomputed π_old exactly (ρ = 1 either way); with several steps it is refused."""
    from igpo_jax.training.update import optimiser_steps

    b = _batch(model)
    without = UpdateBatch(b.tokens_NL, b.valid_NL, b.loss_mask_NL, b.advantage_NL, None, b.ref_logp_NL)
    cfg = UpdateConfig(lr=1e-3, micro_batch_size=2)
    graphdef, params = nnx.split(model)
    opt = Updater(model, cfg).opt_state
    p1, _, m1 = train_step(graphdef, jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt), b, cfg, 2, True)
    p2, _, m2 = train_step(graphdef, jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt), without, cfg, 2,
                           True)
    assert float(m1["loss"]) == float(m2["loss"]) and float(m2["approx_kl"]) == 0.0
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(x, y)
    assert optimiser_steps(cfg, N) == 1 and optimiser_steps(UpdateConfig(ppo_mini_batch_size=2, ppo_epochs=3), N) == 6
    with pytest.raises(ValueError, match="takes 2 optimiser steps"):
        Updater(model, UpdateConfig(ppo_mini_batch_size=2)).update(without)


def test_old_logp_source_follows_the_config():
    from igpo_jax.config_base import base_config
    from igpo_jax.train import old_logp_source, update_config

    c = base_config()
    c.data.train_batch_size, c.rollout.n = 2, 4
    assert old_logp_source(c, update_config(c), 8) == "none"  # one step: π_old = π_θ
    c.actor.ppo_mini_batch_size = 4
    assert old_logp_source(c, update_config(c), 8) == "scoring"  # IG on: the scoring pass's log-probs
    c.algorithm.use_info_gain = False
    assert old_logp_source(c, update_config(c), 8) == "recompute"  # GRPO, two steps: a forward
    c.actor.ppo_mini_batch_size, c.algorithm.use_info_gain, c.actor.recompute_old_logp = 0, True, True
    assert old_logp_source(c, update_config(c), 8) == "recompute"


def test_cosine_schedule_decays_to_zero_at_the_runs_last_optimiser_step():
    from igpo_jax.config_base import base_config
    from igpo_jax.train import update_config
    from igpo_jax.training.update import learning_rate_schedule

    c = base_config()
    c.data.train_batch_size, c.rollout.n, c.actor.ppo_mini_batch_size = 4, 4, 8  # 2 optimiser steps per RL step
    c.trainer.total_training_steps, c.actor.lr, c.actor.warmup_steps = 10, 3e-5, 2
    c.actor.lr_schedule = "cosine"
    ucfg = update_config(c)
    assert ucfg.total_steps == 20
    lr = learning_rate_schedule(ucfg)
    assert float(lr(0)) == 0.0 and float(lr(2)) == pytest.approx(3e-5)
    assert float(lr(11)) == pytest.approx(1.5e-5, rel=1e-5)  # half-way through the decay
    assert float(lr(20)) == pytest.approx(0.0, abs=1e-12)
    c.actor.lr_schedule = "constant"
    assert float(learning_rate_schedule(update_config(c))(20)) == pytest.approx(3e-5)


@pytest.mark.parametrize("grad_clip", [1e-3, 1e3])  # clipped / not clipped
def test_the_leafwise_optimiser_step_equals_optax_over_the_whole_tree(grad_clip):
    """_apply_gradients runs make_optimizer's update one leaf at a time (training/leafwise.py): the
    same params and optimiser state, bit for bit, over several steps, bf16 leaves included."""
    from igpo_jax.training.update import _apply_gradients, make_optimizer
    import optax

    cfg = UpdateConfig(lr=1e-2, warmup_steps=2, grad_clip=grad_clip, weight_decay=0.1)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 32))
    like = {"a": [jnp.zeros((3, 4)), jnp.zeros((3, 4))], "b": jnp.zeros((5,), jnp.bfloat16), "c": {"d": jnp.zeros((2, 3))}}
    random = lambda: jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape).astype(x.dtype), like)
    params = random()
    state = make_optimizer(cfg).init(params)

    @jax.jit
    def whole_tree(params, state, grads):
        updates, state = make_optimizer(cfg).update(grads, state, params)
        return optax.apply_updates(params, updates), state

    ours_params, ours_state = params, jax.tree.map(jnp.copy, state)
    for _ in range(3):
        grads = random()
        params, state = whole_tree(params, state, grads)
        ours_params, ours_state, metrics = _apply_gradients(ours_params, ours_state, grads, jnp.float32(1.0), cfg)
        assert float(metrics["skipped"]) == 0.0
    assert jax.tree.structure(ours_state) == jax.tree.structure(state)
    for ours, theirs in zip(jax.tree.leaves((ours_params, ours_state)), jax.tree.leaves((params, state))):
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))
    assert int(ours_state[1][0].count) == 3  # Adam's counter advanced once per step, not per leaf


@pytest.mark.parametrize("loss,bad_grad", [(float("nan"), False), (1.0, True)])
def test_a_step_with_a_non_finite_loss_or_gradient_changes_nothing(loss, bad_grad):
    """A NaN loss or an infinite gradient skips the step: every leaf (params, both Adam moments,
    the step counter) stays as it was, and the step reports skipped = 1."""
    from igpo_jax.training.update import _apply_gradients, make_optimizer

    cfg = UpdateConfig(lr=1e-2, warmup_steps=0, grad_clip=1.0)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,), jnp.bfloat16)}
    state = make_optimizer(cfg).init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    if bad_grad:
        grads["w"] = grads["w"].at[0, 0].set(jnp.inf)
    before = [np.asarray(x, np.float32) for x in jax.tree.leaves((params, state))]
    params, state, metrics = _apply_gradients(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state), grads,
                                              jnp.float32(loss), cfg)
    assert float(metrics["skipped"]) == 1.0
    for ours, old in zip(jax.tree.leaves((params, state)), before):
        np.testing.assert_array_equal(np.asarray(ours, np.float32), old)
