#!/usr/bin/env bash
# GPU check (< 10 minutes on one H100/H200): the sampler, scoring and train step on a
# Qwen2.5-1.5B-shaped random model in bf16 (float32 master weights for the train step), and one
# attention through cuDNN's fused kernel against the blockwise one (attn_*: speed-up, error against
# fp32, finiteness). Prints tokens/s, MFU and the fraction of the HBM roofline; the last line is
# one JSON object (bench/gpu_check.py says what each figure measures).
#
#   bash launch/gpu_check.sh                    # set up (below), then check
#   bash launch/gpu_check.sh --tiny             # a tiny shape; runs on a CPU build of JAX as well
#   SKIP_INSTALL=1 bash launch/gpu_check.sh --batch 128    # no set-up; flags go to the check
#
# Set-up (launch/accelerator_setup.py): a CUDA build of JAX already installed is used as it is (an
# air-gapped node's admin install; the suite runs on 0.10.x, others get a warning), else jax[cuda12] is
# installed from the index; missing requirements come from launch/wheelhouse (or $WHEELHOUSE) when
# it exists — made on a connected machine by `bash launch/wheelhouse.sh` — with no index contacted.
set -euo pipefail
cd "$(dirname "$0")/.."
platform=gpu
for arg in "$@"; do [[ "$arg" == "--tiny" ]] && platform="${JAX_PLATFORMS:-cpu}"; done
if [[ "$platform" == "cpu" ]]; then export JAX_PLATFORMS=cpu; fi
WHEELHOUSE="${WHEELHOUSE:-launch/wheelhouse}"
if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  if [[ -d "$WHEELHOUSE" ]]; then
    python3 launch/accelerator_setup.py --platform "$platform" --wheelhouse "$WHEELHOUSE"
  else
    python3 launch/accelerator_setup.py --platform "$platform"
  fi
fi
python3 -c "import jax; d = jax.devices(); assert d[0].platform == '$platform', d; print('devices:', d)"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec timeout 600 python3 -m bench.gpu_check "$@"
