"""The memory planner: its per-device bytes equal what a sharded model actually allocates."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from igpo_jax import plan
from igpo_jax.planning import memory
from igpo_jax.runtime import sharding
from igpo_jax.model import config as model_config
from tests.conftest import write_tiny_hf_model
from tests.multidevice_test import _run_check


def test_planned_bytes_equal_allocated_bytes_on_8_devices(tmp_path):
    write_tiny_hf_model("qwen2", tmp_path)
    line = next(l for l in _run_check("plan", str(tmp_path)).splitlines() if l.startswith("PLAN "))
    cases = json.loads(line[len("PLAN "):])
    assert len(cases) == 3
    for case in cases:
        assert case["planned"] == case["allocated"], case


def test_shard_shape_divides_by_the_mesh_axes_of_each_dimension():
    mesh = memory.abstract_mesh({"data": 2, "fsdp": 4, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    assert memory.shard_shape((64, 4, 16), ("embed", "heads", "head_dim"), mesh, rules) == (16, 2, 16)
    # batch spans data × fsdp = 8
    assert memory.shard_shape((16, 100), ("batch", "length"), mesh, rules) == (2, 100)
    # 3 kv heads do not divide over tensor=2: replicated on that axis
    assert memory.shard_shape((8, 3, 64, 64), memory.KV_AXES, mesh, rules) == (1, 3, 64, 64)
    assert memory.shard_shape((5,), None, mesh, rules) == (5,)


def test_tiny_config_by_hand():
    """2 layers, D 8, F 16, 2 heads, 1 kv head, head dim 4, vocab 32, fp32, untied, no bias."""
    cfg = model_config.ModelConfig("llama", 32, 8, 16, 2, 2, 1, 4)
    mesh = {"fsdp": 2, "tensor": 1}
    p = memory.plan(cfg, mesh, rollout_batch=4, context=10, micro_batch=2, update_len=6)
    # embed 32×8 + lm_head 8×32 + final norm 8 + 2 × (norms 2×8 + q 8×2×4 + k, v 8×1×4 + o 2×4×8
    # + mlp 3×8×16): every tensor has one 'embed' dim, halved by fsdp = 2
    per_layer = 2 * 8 + 64 + 32 + 32 + 64 + 3 * 128
    assert p.params == (256 + 256 + 8 + 2 * per_layer) // 2 * 4
    assert p.reference == p.params and p.grads == 2 * p.params
    # two moments like the params, plus int32 counts of Adam and of the schedule
    assert p.opt_state == 2 * p.params + 2 * 4
    # k, v [2, 4/2, 10, 1, 4] fp32 + valid [2, 10] bool + next_pos [2] int32 + length
    assert p.kv_cache == 2 * (2 * 2 * 10 * 1 * 4) * 4 + 2 * 10 + 2 * 4 + 4
    u, t = 1, 6
    assert p.activations == (2 * u * t * 8 * 4 + u * t * (4 * 8 + (4 + 2) * 4 + 3 * 16) * 4
                             + u * 2 * t * t // 2 * 8 + 3 * u * 6 * 32 * 4)
    assert p.peak == 4 * p.params + 8 + max(p.kv_cache, p.grads + p.activations)


def test_fits_uses_headroom():
    p = memory.Plan(params=10 * memory.GiB, opt_state=0, reference=0, kv_cache=4 * memory.GiB, grads=0, activations=0)
    assert memory.fits(p, "v5e", headroom=0.1)[0]  # 14 ≤ 14.4 GiB
    assert not memory.fits(p, "v5e", headroom=0.2)[0]  # 14 > 12.8 GiB


def test_cli_for_qwen2_5_7b_on_fsdp_8(capsys):
    text = plan.main(["--preset=Qwen2.5-7B-Instruct", "--mesh=fsdp=8,tensor=1", "--param_dtype", "bfloat16",
                      "--rollout_batch", "512", "--context", "32768", "--device", "H100-80G"])
    assert "7.62 B params" in text
    params_gb = float(next(l for l in text.splitlines() if "params   " in l).split()[1])
    assert params_gb == pytest.approx(15.23 / 8, abs=0.01)  # 7.62 B × 2 bytes over 8 devices
    assert "H100-80G" in text and "does NOT fit" in text  # a 512 × 32k KV cache is 962 GB in all
    assert capsys.readouterr().out.strip() == text


def test_cli_reads_a_model_dir_and_rejects_bad_meshes(tmp_path):
    write_tiny_hf_model("qwen2", tmp_path)
    text = plan.main(["--model_path", str(tmp_path), "--mesh=fsdp=2,tensor=2", "--param_dtype=float32",
                      "--rollout_batch=4", "--context=16", "--device=v5e"])
    assert "fits" in text
    with pytest.raises(ValueError, match="NAME=SIZE"):
        memory.parse_mesh("fsdp:8")
    assert math.prod(memory.parse_mesh("data=2,fsdp=4,tensor=2").values()) == 16


def test_config_plan_reads_the_experiment_keys():
    """--config plans the 7B config's own settings; bounded concurrency and a token budget shrink
    the KV cache and the activations by the factors they should."""
    base = plan.main(["--config=configs/qwen2_5_7b_igpo.py", "--device=H100-80G", "--set", "rollout.max_concurrent_rows=0",
                      "--set", "actor.max_tokens_per_micro_batch=0"])
    assert "7.62 B params" in base and "512 rollouts" in base and "context 32768" in base
    assert "2 moments in float32" in base and "KL on" in base
    bounded = plan.main(["--config=configs/qwen2_5_7b_igpo.py", "--device=H100-80G", "--device=A100-80G",
                         "--set", "rollout.max_concurrent_rows=64", "--set", "actor.max_tokens_per_micro_batch=16384"])
    gb = lambda text, label: float(next(l for l in text.splitlines()
                                        if l.strip().startswith(label)).split()[len(label.split())])
    assert gb(base, "KV cache") == pytest.approx(8 * gb(bounded, "KV cache"), rel=1e-3)  # 512 → 64 rows
    # the update's phases: the layer backward scales with the micro-batch's tokens (32768 → 16384,
    # plus one layer's weights either way); the gradient all-reduce does not
    phase = lambda text, name: float(re.search(rf"{name} ([0-9.]+) GB", next(
        l for l in text.splitlines() if l.strip().startswith("activations"))).group(1))
    assert phase(bounded, "layer backward") < phase(base, "layer backward") / 1.8
    assert phase(bounded, "gradient all-reduce") == phase(base, "gradient all-reduce") > 0
    assert "H100-80G" in bounded and "A100-80G" in bounded
    assert [l for l in bounded.splitlines() if "→" in l and "fits" in l and "NOT" not in l]


SMALL_CONFIG = '''
from igpo_jax.config_base import base_config


def get_config():
    c = base_config()
    c.model.path = {path!r}
    c.model.remat = True
    c.model.scan_layers = {scan!r}
    c.model.attention = "blockwise"
    c.model.attention_block = 256
    c.mesh.shape = {mesh!r}
    c.model.param_dtype = {param_dtype!r}
    c.model.dtype = {dtype!r}
    c.rollout.dtype = {dtype!r}
    c.data.train_batch_size = 4
    c.rollout.n = 4
    c.rollout.context_length = 1024
    c.rollout.max_turns = 2
    c.actor.micro_batch_size = 8
    c.algorithm.scoring_batch_size = 8
    return c
'''
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pinned_jax() -> str:
    with open(os.path.join(REPO, "requirements.txt")) as f:
        return re.search(r"^jax==(\S+)", f.read(), re.M).group(1)


# The estimate is calibrated against the pinned JAX's XLA: within 15% either way there. Another
# release assigns buffers its own way (jax 0.11.2 compiled the scanned fsdp update 18% smaller,
# bench/results/jax_versions.md): there the safe side still holds at 15% (an estimate below what
# XLA needs would let a config through that does not fit) and an over-estimate may reach 25%.
ESTIMATE_OVER_COMPILED = (0.85, 1.15) if jax.__version__ == _pinned_jax() else (0.85, 1.25)


def _plan_with_compile(config: str, *args: str, timeout: int = 600) -> tuple[dict[str, float], str]:
    """`plan --config=<config> --compile` in a fresh process (its own simulated devices): the
    estimate/compiled ratio of each program and of the peak, and the whole output."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "igpo_jax.plan", f"--config={config}", "--compile", "--devices=8",
                          *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    ratios = {l.split()[0]: float(l.rsplit(" ", 1)[-1].rstrip(")")) for l in out.stdout.splitlines()
              if "estimate/compiled" in l}
    assert set(ratios) == {"decode", "scoring", "update", "peak"}, out.stdout
    return ratios, out.stdout


@pytest.mark.parametrize("mesh, param_dtype, dtype, scan", [
    ({"data": -1}, "float32", "float32", False),  # data parallel, float32 throughout
    # fsdp with float32 master weights and bf16 compute: gathered and hoisted weights, gradients
    # all-reduced in full and combined, float32 upcasts of saved inputs
    ({"data": 1, "fsdp": -1, "tensor": 1}, "float32", "bfloat16", False),
    # the same with the layers scanned (the 7B config's layout): stacked weights and gradients
    ({"data": 1, "fsdp": -1, "tensor": 1}, "float32", "bfloat16", True),
])
def test_estimate_within_15_percent_of_xla_compiled_memory(tmp_path, mesh, param_dtype, dtype, scan):
    """--compile on a small config (4 layers, D 256, vocab 4096, 8 simulated devices): every program's
    estimate and the peak within 15% of XLA's memory_analysis."""
    from igpo_jax.model.config import ModelConfig

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    cfg = ModelConfig("qwen2", 4096, 256, 768, 4, 8, 2, 32, qkv_bias=True)
    (model_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (tmp_path / "small.py").write_text(SMALL_CONFIG.format(path=str(model_dir), mesh=mesh, param_dtype=param_dtype,
                                                           dtype=dtype, scan=scan))
    ratios, text = _plan_with_compile(str(tmp_path / "small.py"), "--device=v5e")
    assert "compiled whole (4 layers)" in text
    low, high = ESTIMATE_OVER_COMPILED
    for name, ratio in ratios.items():
        assert low <= ratio <= high, (name, ratio, text)
    assert "fits (compiled" in text and "fits (estimate" in text


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [
    8192,
    # the config's own budget: with the layers unrolled XLA:CPU's schedule deferred the
    # weight-gradient dots of several layers (update 68.3 GB compiled, 46.8 estimated); scanned,
    # each layer's backward ends in its own iteration (38.8 GB compiled)
    32768,
])
def test_qwen2_5_7b_estimate_within_15_percent_of_xla_compiled_memory(tokens):
    """The 7B config itself (28 layers compiled whole for fsdp=8, about two minutes on 2 cores):
    decode, scoring, update and the peak within 15% of XLA's memory_analysis."""
    ratios, text = _plan_with_compile("configs/qwen2_5_7b_igpo.py", "--device=H100-80G",
                                      f"--set=actor.max_tokens_per_micro_batch={tokens}", timeout=1200)
    assert "compiled whole (28 layers)" in text
    for name, ratio in ratios.items():
        assert 0.85 <= ratio <= 1.15, (name, ratio, text)
