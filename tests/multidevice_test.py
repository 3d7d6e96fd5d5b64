"""Sharded runs on 8 simulated CPU devices (each check runs in its own process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from igpo_jax.runtime import sharding
from tests.conftest import write_tiny_hf_model
from tests.process_pair import run_process_pair

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_check(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.multidevice_checks", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_tensor_parallel_sampling_equals_unsharded_greedy(tmp_path):
    write_tiny_hf_model("qwen2", tmp_path)
    assert "equals unsharded greedy output" in _run_check("sampling", str(tmp_path))


def test_logical_rules_skip_axes_that_do_not_divide():
    import jax

    mesh = jax.sharding.Mesh(__import__("numpy").array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
    # a 1×1 mesh: every axis has size 1 and drops out
    assert sharding.logical_to_spec(("embed", "heads"), sharding.DEFAULT_RULES, mesh, (8, 4)) == \
        jax.sharding.PartitionSpec(None, None)
    # without a mesh the rules apply as written; a mesh axis is used once
    assert sharding.logical_to_spec(("batch", "embed", "mlp"), sharding.DEFAULT_RULES) == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh({"data": -1, "tensor": -1})
    with pytest.raises(ValueError, match="needs 4 devices, 1 available"):
        sharding.make_mesh({"data": 2, "tensor": 2})
    assert sharding.make_mesh({"data": -1, "tensor": 1}).shape == {"data": 1, "tensor": 1}


def test_sharded_update_equals_one_device(tmp_path):
    """fsdp=4 × tensor=2, layers unrolled and scanned: loss to rtol 1e-5 and params to atol 1e-6 of
    the 1-device step."""
    write_tiny_hf_model("qwen2", tmp_path)
    assert "equals one device" in _run_check("update", str(tmp_path))


def test_sequence_parallel_loss_and_gradients_equal_one_device(tmp_path):
    """sequence=2 (and fsdp=2 × sequence=2 × tensor=2): each row's length split over devices,
    keys/values all-gathered in attention; dense and blockwise attention, causal and IG-copies masks."""
    write_tiny_hf_model("qwen2", tmp_path)
    assert "sequence parallelism equals one device" in _run_check("sequence", str(tmp_path))


def test_fused_attention_route_under_meshes_equals_one_device(tmp_path):
    """The cuDNN route's call (run by XLA on the CPU) with rows split over fsdp; blockwise in the
    shards of rows split by length."""
    write_tiny_hf_model("qwen2", tmp_path)
    assert "fused route under meshes equals one device" in _run_check("sequence_fused", str(tmp_path))


def test_two_processes_update_and_checkpoint(tmp_path):
    """Two processes × 4 CPU devices (gloo) run one update over an 8-device mesh: the loss and
    params equal one process's; their multi-host orbax checkpoint restores in one process."""
    import numpy as np

    from igpo_jax.model.weights import load_hf
    from tests.multidevice_checks import one_update

    model_dir, out = tmp_path / "model", tmp_path / "out"
    out.mkdir()
    write_tiny_hf_model("qwen2", model_dir)
    run_process_pair("tests.multidevice_checks",
                     lambda address, i: ["multiprocess", str(model_dir), address, str(i), str(out)],
                     devices_per_process=4, timeout=120, log_tail=3000)

    plain = load_hf(str(model_dir))  # the reference: the same step on this process's one device
    loss, _ = one_update(plain)
    result = np.load(out / "result.npz")
    np.testing.assert_allclose(float(result["loss"]), loss, rtol=1e-5)
    from flax import nnx
    import jax

    for i, x in enumerate(jax.tree.leaves(nnx.state(plain, nnx.Param))):
        np.testing.assert_allclose(result[f"arr_{i}"], np.asarray(x), atol=1e-6, rtol=0)
    restored = _run_check("restore", str(model_dir), str(out / "ckpt"), str(out / "result.npz"))
    assert "restored 27 arrays written by two processes" in restored


def test_distributed_resolve_from_flags_slurm_and_tpu():
    from igpo_jax.runtime.distributed import DistributedConfigError, first_slurm_host, resolve

    assert resolve(env={}) is None  # a laptop: single process
    assert resolve("10.0.0.1:1234", 2, 1, env={}) == dict(coordinator_address="10.0.0.1:1234",
                                                           num_processes=2, process_id=1)
    assert resolve(num_processes=1, process_id=0, env={}) is None
    with pytest.raises(DistributedConfigError, match="missing: coordinator_address"):
        resolve(num_processes=2, process_id=0, env={})
    with pytest.raises(DistributedConfigError, match=r"outside \[0, 2\)"):
        resolve("h:1", 2, 2, env={})
    with pytest.raises(DistributedConfigError, match="not HOST:PORT"):
        resolve("h", 2, 0, env={})
    slurm = dict(SLURM_NTASKS="4", SLURM_PROCID="3", SLURM_STEP_NODELIST="gpu[007-010]", SLURM_JOB_ID="4001")
    assert resolve(env=slurm) == dict(coordinator_address="gpu007:12001", num_processes=4, process_id=3)
    assert resolve(env=dict(slurm, IGPO_COORDINATOR_PORT="9999"))["coordinator_address"] == "gpu007:9999"
    assert resolve(env=dict(slurm, SLURM_NTASKS="1", SLURM_PROCID="0")) is None
    assert first_slurm_host("node3,node4") == "node3" and first_slurm_host("a[1,3-5]") == "a1"
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}  # JAX detects the TPU slice
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "t0"}) is None
