"""Sharded runs on 8 simulated CPU devices (each check runs in its own process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from igpo_jax import sharding
from tests.conftest import write_tiny_hf_model

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
