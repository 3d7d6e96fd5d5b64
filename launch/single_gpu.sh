#!/usr/bin/env bash
# Train on one CUDA GPU: install the CUDA 12 build of the pinned JAX, then run the trainer.
#
#   bash launch/single_gpu.sh --config=configs/qwen3_1_7b_igpo.py
#   SKIP_INSTALL=1 bash launch/single_gpu.sh --config=configs/demo.py    # already installed
#
# jax[cuda12] brings its own CUDA/cuDNN wheels; only an NVIDIA driver ≥ 525 is needed on the host.
# Check what fits first: python -m igpo_jax.plan --preset=... --mesh=fsdp=1 --device=H100-80G
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  bash launch/install.sh
  python3 -m pip install -q --disable-pip-version-check "jax[cuda12]==0.10.2"
fi
python3 -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d; print('devices:', d)"
# XLA preallocates 75% of GPU memory by default; the planner assumes ~all of it is usable.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
exec python3 -m igpo_jax.train "$@"
