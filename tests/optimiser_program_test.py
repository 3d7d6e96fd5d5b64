"""The optimiser step's two programs (update._apply_gradients): leaf by leaf (training/leafwise.py)
and one program for the whole tree give the same params and optimiser state bit for bit, skipped
non-finite steps included; 'auto' starts leaf by leaf and moves to the whole-tree program once a
background thread has built it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from igpo_jax.training import leafwise, update
from igpo_jax.training.update import UpdateConfig, make_optimizer

LOSSES = (1.0, 2.0, float("nan"), 0.5, 1.5)  # the third step is skipped (a NaN loss)


def _problem(grad_clip):
    cfg = UpdateConfig(lr=1e-2, warmup_steps=2, grad_clip=grad_clip, weight_decay=0.1)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))
    like = {"a": [jnp.zeros((3, 4)), jnp.zeros((3, 4))], "b": jnp.zeros((5,), jnp.bfloat16),
            "c": {"d": jnp.zeros((2, 3)), "e": jnp.zeros((7,))}}
    random = lambda: jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape).astype(x.dtype), like)
    params = random()
    grads = [jax.tree.map(lambda x: x.astype(jnp.float32), random()) for _ in LOSSES]
    grads[3]["c"]["e"] = grads[3]["c"]["e"].at[2].set(jnp.inf)  # and the fourth (an infinite gradient)
    return cfg, params, grads


def _run(monkeypatch, program, cfg, params, grads, wait=False):
    monkeypatch.setattr(update, "OPTIMISER_PROGRAM", program)
    params = jax.tree.map(jnp.copy, params)
    state = make_optimizer(cfg).init(params)
    metrics = []
    for loss, g in zip(LOSSES, grads):
        params, state, m = update._apply_gradients(params, state, g, jnp.float32(loss), cfg)
        metrics.append(jax.device_get(m))
        if wait:
            update._fused_when_ready.wait()
    return params, state, metrics


@pytest.mark.parametrize("grad_clip", [1e-3, 1e3])  # clipped / not clipped
def test_the_whole_tree_program_equals_the_leafwise_programs_bit_for_bit(monkeypatch, grad_clip):
    cfg, params, grads = _problem(grad_clip)
    leaf_params, leaf_state, leaf_metrics = _run(monkeypatch, "leafwise", cfg, params, grads)
    assert [float(m["skipped"]) for m in leaf_metrics] == [0, 0, 1, 1, 0]
    assert int(leaf_state[1][0].count) == 3
    for program, wait in (("fused", False), ("auto", True)):
        ours_params, ours_state, ours_metrics = _run(monkeypatch, program, cfg, params, grads, wait)
        assert jax.tree.structure((ours_params, ours_state)) == jax.tree.structure((leaf_params, leaf_state))
        for ours, theirs in zip(jax.tree.leaves((ours_params, ours_state)), jax.tree.leaves((leaf_params, leaf_state))):
            assert ours.dtype == theirs.dtype
            np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))
        for ours, theirs in zip(ours_metrics, leaf_metrics):
            assert ours.keys() == theirs.keys()
            for k in ours:
                np.testing.assert_array_equal(ours[k], theirs[k])


def test_auto_moves_to_the_whole_tree_program_once_built_in_the_background(monkeypatch):
    calls = []
    fused = update._apply_gradients_fused
    prebuilt = leafwise.Prebuilt(fused, static_argnums=(4,))
    monkeypatch.setattr(update, "_fused_when_ready", prebuilt)
    leaf = update._apply_gradients_leafwise
    monkeypatch.setattr(update, "_apply_gradients_leafwise", lambda *a: calls.append("leafwise") or leaf(*a))
    cfg, params, grads = _problem(1.0)
    state = make_optimizer(cfg).init(params)
    for i in range(4):
        executable = prebuilt._entries and next(iter(prebuilt._entries.values()))[1]
        before = len(calls)
        params, state, _ = update._apply_gradients(params, state, grads[0], jnp.float32(1.0), cfg)
        calls += [] if len(calls) > before else ["fused"]
        if i == 0:
            assert next(iter(prebuilt._entries.values()))[1] is None  # seen once: nothing built
        prebuilt.wait()
    assert calls == ["leafwise", "leafwise", "fused", "fused"]
    assert executable is not None and executable.done()
    # another signature starts leaf by leaf again
    other = jax.tree.map(lambda x: jnp.zeros((2, *x.shape), x.dtype), params)
    other_state = make_optimizer(cfg).init(other)
    update._apply_gradients(other, other_state, jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), other),
                            jnp.float32(1.0), cfg)
    assert calls[-1] == "leafwise"


def test_prebuilt_keeps_only_the_newest_signatures():
    f = jax.jit(lambda x: x + 1)
    prebuilt = leafwise.Prebuilt(f, build_on_sighting=1, keep=2)
    for n in range(1, 5):
        prebuilt.get(jnp.zeros(n))
    prebuilt.wait()
    assert len(prebuilt._entries) == 2
    assert prebuilt.get(jnp.zeros(4))(jnp.ones(4)).tolist() == [2.0] * 4
    assert prebuilt.get(jnp.float32(1.0)) is None and prebuilt.get(1.0) is None  # new; not an array


def test_in_a_multi_process_run_the_switch_waits_for_the_build_at_the_same_call(monkeypatch):
    """Processes must run the same programs in the same order: the call after the one that started
    the build gets the executable, however long the build takes."""
    import threading

    release = threading.Event()
    f = jax.jit(lambda x: x * 2)
    prebuilt = leafwise.Prebuilt(f)
    build = prebuilt._build
    monkeypatch.setattr(prebuilt, "_build", lambda spec: release.wait(30) and build(spec))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    x = jnp.ones(3)
    assert prebuilt.get(x) is None and prebuilt.get(x) is None  # seen once; the build starts
    threading.Timer(0.5, release.set).start()
    assert prebuilt.get(x)(x).tolist() == [2.0] * 3
