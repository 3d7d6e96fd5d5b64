"""bench/gpu_check.py on the CPU with a tiny shape: one JSON line with every figure, all sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
