#!/usr/bin/env bash
# GPU check (< 10 minutes on one H100/H200): install the CUDA 12 build of the pinned JAX, then run
# the sampler, scoring and train step on a Qwen2.5-1.5B-shaped random model in bf16 (float32 master
# weights for the train step), and one attention through cuDNN's fused kernel against the blockwise
# one (attn_*: speed-up, error against fp32, finiteness). Prints tokens/s, MFU and the fraction of
# the HBM roofline; the last line is one JSON object (bench/gpu_check.py says what each figure measures).
#
#   bash launch/gpu_check.sh                    # install + check
#   SKIP_INSTALL=1 bash launch/gpu_check.sh --batch 128    # already installed; flags go to the check
set -euo pipefail
cd "$(dirname "$0")/.."
JAX_VERSION="$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' requirements.txt)"  # the pinned version
if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  bash launch/install.sh
  python3 -m pip install -q --disable-pip-version-check "jax[cuda12]==${JAX_VERSION}"
fi
python3 -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d; print('devices:', d)"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec timeout 600 python3 -m bench.gpu_check "$@"
