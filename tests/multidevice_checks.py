"""Checks that need several (simulated) devices; run in a subprocess by multidevice_test.py,
because the device count is fixed when JAX starts.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.multidevice_checks sampling DIR
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from igpo_jax import sharding
from igpo_jax.model.weights import load_hf
from igpo_jax.sampling import Sampler, SamplingParams

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 7, 12], [100, 2, 33, 4, 9], [1, 2, 3, 4]]


def check_sampling(model_dir: str):
    assert len(jax.devices()) == 8, jax.devices()
    greedy = SamplingParams(temperature=0.0)
    plain = load_hf(model_dir)
    expected = [o.tokens for o in Sampler(plain, None, 4, 64, greedy).generate(PROMPTS, [0] * 4, 12)]

    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    model = load_hf(model_dir, mesh=mesh, rules=rules)  # loaded straight into its shardings
    q = model.layers[0].attn.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None), q.sharding.spec
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (q.shape[0] // 4, q.shape[1] // 2, q.shape[2])
    with sharding.activate(mesh, rules):
        s = Sampler(model, None, 4, 64, greedy, mesh=mesh, rules=rules)
        got = [o.tokens for o in s.generate(PROMPTS, [0] * 4, 12)]
        k_spec = s.cache.k_LBSKH.sharding.spec
    assert got == expected, (got, expected)
    assert "tensor" in str(k_spec) and "fsdp" in str(k_spec), k_spec
    print("sampling under fsdp=4 x tensor=2 equals unsharded greedy output")


if __name__ == "__main__":
    {"sampling": check_sampling}[sys.argv[1]](*sys.argv[2:])
