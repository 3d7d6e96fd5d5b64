"""bench/gpu_check.py on the CPU with a tiny shape: one JSON line with every figure, all sane."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from bench import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# launch/accelerator_setup.py is a stand-alone script (it runs before any requirement is installed)
_spec = importlib.util.spec_from_file_location("accelerator_setup", os.path.join(REPO, "launch", "accelerator_setup.py"))
accelerator_setup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accelerator_setup)


def test_device_peaks_from_device_kind():
    assert gpu_check.device_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert gpu_check.device_peaks("NVIDIA H200") == (989e12, 4.8e12)
    assert gpu_check.device_peaks("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert gpu_check.device_peaks("cpu") == (None, None)


def test_tiny_run_prints_one_json_line_with_the_figures():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--tiny"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("sample_tok_s", "score_tok_s", "train_tok_s", "decode_bytes_per_step", "score_mfu_measured",
                "train_mfu_measured", "decode_roofline_frac_measured", "train_mfu", "decode_hbm_roofline_frac"):
        assert key in result, key
    assert result["platform"] == "cpu" and result["train_mfu"] is None  # no nominal peak for a CPU
    for key in ("sample_tok_s", "score_tok_s", "train_tok_s", "score_mfu_measured", "train_mfu_measured",
                "decode_roofline_frac_measured"):
        assert result[key] > 0, key
    assert result["train_loss_finite"] and result["train_skipped"] == 0
    # the attention check: off a GPU the cuDNN route's call runs by XLA, within bf16 of fp32
    assert result["attn_kernel"] == "xla" and result["attn_finite"]
    assert result["attn_fused_s"] > 0 and result["attn_blockwise_s"] > 0 and result["attn_speedup"] > 0
    assert 0 < result["attn_fused_err"] < 0.02 and 0 < result["attn_blockwise_err"] < 0.02
    # bf16 weights (140k params) + a 2-layer KV window of 4 rows × 32 slots: about 0.3 MB a step
    assert result["params"] * 2 < result["decode_bytes_per_step"] < result["params"] * 2 + 2 ** 20


# What an air-gapped accelerator image is assumed to hold of ours: JAX and the compiled packages.
PURE_PYTHON_REQUIREMENTS = ("flax", "optax", "orbax-checkpoint", "ml-collections", "absl-py", "transformers",
                            "jinja2", "gguf", "bm25s", "tensorboardx", "tqdm")


@pytest.mark.slow
def test_gpu_check_tiny_sets_up_from_a_wheelhouse_with_the_network_off(tmp_path):
    """launch/gpu_check.sh on a host without internet whose JAX is installed: the pure-Python
    requirements come from a wheelhouse made beforehand by launch/wheelhouse.sh, none from an index."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "JAX_PLATFORMS")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    python = str(venv / "bin" / "python")
    subprocess.run(["bash", "launch/install.sh"], cwd=REPO, env=env, check=True, capture_output=True, timeout=1800)
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", *PURE_PYTHON_REQUIREMENTS], env=env, check=True)
    wheelhouse = tmp_path / "wheelhouse"
    subprocess.run(["bash", "launch/wheelhouse.sh", str(wheelhouse)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=600)
    # no network at all where this machine can make a namespace without one; pip told no index anyway
    offline = ["unshare", "-n"] if subprocess.run(["unshare", "-n", "true"]).returncode == 0 else []
    run = subprocess.run([*offline, "bash", "launch/gpu_check.sh", "--tiny"], cwd=REPO,
                         env={**env, "WHEELHOUSE": str(wheelhouse), "PIP_NO_INDEX": "1"},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "using the installed jax" in run.stdout and f"--find-links {wheelhouse}" in run.stdout
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["platform"] == "cpu" and result["train_loss_finite"] and result["sample_tok_s"] > 0
    for name in PURE_PYTHON_REQUIREMENTS:  # back, from the wheelhouse
        assert subprocess.run([python, "-m", "pip", "show", "-q", name], env=env).returncode == 0, name


def test_accelerator_setup_reads_the_pins_and_names_a_missing_wheelhouse(tmp_path):
    pins = dict(accelerator_setup.requirements())
    assert pins["jax"] == pins["jaxlib"] and "jinja2" in pins and "torch" not in pins  # runtime pins only
    run = subprocess.run([sys.executable, "launch/accelerator_setup.py", "--wheelhouse", str(tmp_path / "none")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "no wheelhouse at" in run.stderr
