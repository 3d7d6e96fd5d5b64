"""Checkpoints: exact round trip into a fresh model, keep-N, unfinished saves, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from igpo_jax.training import checkpoint
from igpo_jax.data.examples import BatchIterator, Example, Message
from igpo_jax.model.config import ModelConfig
from igpo_jax.model.qwen import Decoder
from igpo_jax.training.update import UpdateConfig, Updater, make_optimizer

CONFIG = ModelConfig("qwen2", 128, 32, 64, 2, 4, 2, 8, qkv_bias=True)
EXAMPLES = tuple(Example(index=str(i), data_source="t", question=f"q{i}", golden_answers=("a",),
                         prompt=(Message("user", f"q{i}"),), split="train") for i in range(10))


def fresh(seed: int):
    model = Decoder(CONFIG, nnx.Rngs(seed))
    return model, Updater(model, UpdateConfig(lr=1e-2)), BatchIterator(EXAMPLES, 3, seed=seed)


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
    la, lb = host(a), host(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def trained():
    """A model, an optimiser state after one real Adam step, and an iterator moved on by 2 batches."""
    model, updater, batches = fresh(0)
    _, params = nnx.split(model)
    grads = jax.tree.map(jnp.ones_like, params)
    # jitted: eager optax over every parameter costs seconds of dispatch on this CPU
    updates, updater.opt_state = jax.jit(make_optimizer(updater.cfg).update)(grads, updater.opt_state, params)
    nnx.update(model, jax.tree.map(jnp.add, params, updates))
    next(batches), next(batches)
    return model, updater, batches


def test_round_trip_into_a_fresh_model(tmp_path, trained):
    model, updater, batches = trained
    with checkpoint.RunCheckpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.restore_latest(*fresh(1)) == 0  # nothing saved yet: a fresh run
        ckpt.save(7, model, updater, batches, rng_state={"seed": 3, "key": [1, 2]}, metadata={"algo": "igpo"})

    model2, updater2, batches2 = fresh(1)  # other init, other data seed
    with checkpoint.RunCheckpointer(tmp_path / "checkpoints") as ckpt:
        restored = ckpt.restore(model2, updater2, batches2)
        assert ckpt.restore_latest(*fresh(2)) == 7
    assert restored.step == 7
    assert restored.rng_state == {"seed": 3, "key": [1, 2]}
    assert restored.metadata["algo"] == "igpo" and restored.metadata["step"] == 7
    assert_trees_equal(nnx.state(model2, nnx.Param), nnx.state(model, nnx.Param))
    assert_trees_equal(updater2.opt_state, updater.opt_state)
    assert jax.tree.structure(updater2.opt_state) == jax.tree.structure(updater.opt_state)
    assert batches2.state() == batches.state()
    # the restored run continues with the same batches as the original would
    original = BatchIterator(EXAMPLES, 3, seed=0)
    original.restore(batches.state())
    batches2.restore(batches.state())
    assert [e.index for e in next(batches2)] == [e.index for e in next(original)]


def test_restore_params_into_an_abstract_model(tmp_path, trained):
    model, updater, batches = trained
    with checkpoint.RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(3, model, updater, batches)
    abstract = nnx.eval_shape(lambda: Decoder(CONFIG, nnx.Rngs(0)))
    assert checkpoint.restore_params(tmp_path, abstract) == 3
    assert_trees_equal(nnx.state(abstract, nnx.Param), nnx.state(model, nnx.Param))


def test_keeps_the_newest_n_and_latest_step_accepts_a_run_directory(tmp_path, trained):
    model, _, _ = trained
    with checkpoint.RunCheckpointer(tmp_path / "checkpoints", max_to_keep=2) as ckpt:
        for step in (10, 20, 30, 40):
            ckpt.save(step, model)
        assert ckpt.save(40, model) is False  # an existing step is never overwritten
    assert checkpoint.available_steps(tmp_path / "checkpoints") == [30, 40]
    assert checkpoint.latest_step(tmp_path) == 40  # the run directory works too


def test_an_unfinished_save_is_not_a_checkpoint(tmp_path, trained):
    model, updater, batches = trained
    with checkpoint.RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(10, model, updater, batches)
        next(batches)
        ckpt.save(20, model, updater, batches)
    expected_data_state = batches.state()
    # A run killed while writing step 30: orbax's temporary directory, partly written.
    unfinished = tmp_path / "30.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "20", unfinished)
    shutil.rmtree(unfinished / checkpoint.DATA_STATE)
    for marker in ("commit_success.txt", "_CHECKPOINT_METADATA"):
        if (unfinished / marker).exists():
            os.remove(unfinished / marker)

    assert checkpoint.latest_step(tmp_path) == 20
    assert unfinished.exists()  # looking does not delete (another process may be writing)
    model2, updater2, batches2 = fresh(1)
    with checkpoint.RunCheckpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(model2, updater2, batches2) == 20
        assert batches2.state() == expected_data_state
        assert ckpt.save(30, model2, updater2, batches2)
    assert not unfinished.exists()  # the resumed run cleared the leftover before saving
    assert checkpoint.available_steps(tmp_path) == [10, 20, 30]


def test_clear_errors_for_missing_directory_and_step(tmp_path, trained):
    model, _, _ = trained
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="checkpoint directory not found: .*nowhere"):
        checkpoint.restore_params(tmp_path / "nowhere", model)
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="not found"):
        checkpoint.latest_step(tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    assert checkpoint.latest_step(tmp_path / "empty") is None
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="no finished checkpoint"):
        checkpoint.restore_params(tmp_path / "empty", model)

    with checkpoint.RunCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(4, model)
        ckpt.save(8, model)
        with pytest.raises(checkpoint.CheckpointNotFoundError,
                           match=r"step 8 in .*ckpt has no optimiser state \('opt_state'\); it has: metadata, params"):
            ckpt.restore(model, updater=fresh(1)[1])
    with pytest.raises(checkpoint.CheckpointNotFoundError,
                       match=r"checkpoint step 5 not found in .*ckpt; available steps: 4, 8"):
        checkpoint.restore_params(tmp_path / "ckpt", model, step=5)


def test_prng_key_json_round_trip():
    key = jax.random.split(jax.random.key(5))[1]
    saved = json.loads(json.dumps(checkpoint.prng_key_to_json(key)))
    restored = checkpoint.prng_key_from_json(saved)
    np.testing.assert_array_equal(jax.random.key_data(restored), jax.random.key_data(key))
    assert jax.random.uniform(restored) == jax.random.uniform(key)


def test_secrets_are_refused(tmp_path, trained):
    model, _, _ = trained
    with checkpoint.RunCheckpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="search.serper_api_key' looks like a credential"):
            ckpt.save(1, model, metadata={"search": {"engine": "google", "serper_api_key": "x"}})
        assert ckpt.all_steps() == []


SHARDED_RESTORE = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.config.update("jax_num_cpu_devices", 8)
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flax import nnx
    from igpo_jax.training import checkpoint
    from igpo_jax.model.config import ModelConfig
    from igpo_jax.model.qwen import Decoder
    from igpo_jax.training.update import UpdateConfig, Updater

    mesh = jax.make_mesh((4, 2), ("a", "b"))

    def sharded_model(seed, spec_for):
        model = Decoder(ModelConfig("qwen2", 128, 32, 64, 2, 4, 2, 8, qkv_bias=True), nnx.Rngs(seed))
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec_for(x))), state))
        return model

    saved = sharded_model(0, lambda x: P("a") if x.shape[0] % 4 == 0 else P())
    with checkpoint.RunCheckpointer(sys.argv[1]) as ckpt:
        ckpt.save(1, saved, Updater(saved, UpdateConfig()))
    # restored under another layout: the target's shardings win
    model = sharded_model(1, lambda x: P(None, "b") if x.ndim > 1 and x.shape[1] % 2 == 0 else P())
    updater = Updater(model, UpdateConfig())
    wanted = [x.sharding for x in jax.tree.leaves((nnx.state(model, nnx.Param), updater.opt_state))]
    with checkpoint.RunCheckpointer(sys.argv[1]) as ckpt:
        ckpt.restore(model, updater)
    got = jax.tree.leaves((nnx.state(model, nnx.Param), updater.opt_state))
    assert [x.sharding for x in got] == wanted
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in got)
    for a, b in zip(jax.tree.leaves(nnx.state(saved, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("OK")
""")


@pytest.mark.slow  # a fresh process with 8 simulated devices: ~15 s on 2 cores
def test_restore_onto_the_targets_shardings(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SHARDED_RESTORE, str(tmp_path)], cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
