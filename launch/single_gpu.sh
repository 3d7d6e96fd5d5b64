#!/usr/bin/env bash
# Train on one CUDA GPU: set up the host (launch/gpu_check.sh's set-up: the installed CUDA build
# of JAX when there is one, missing requirements from launch/wheelhouse when it exists, else from
# the index), then run the trainer.
#
#   bash launch/single_gpu.sh --config=configs/qwen3_1_7b_igpo.py
#   SKIP_INSTALL=1 bash launch/single_gpu.sh --config=configs/demo.py    # already set up
#
# jax[cuda12] brings its own CUDA/cuDNN wheels; only an NVIDIA driver ≥ 525 is needed on the host.
# The embedded default (configs/demo.py) needs the model's file too: `bash launch/wheelhouse.sh
# --with-embedded-model`, or IGPO_JAX_EMBEDDED_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf.
# Check what fits first: python -m igpo_jax.plan --preset=... --mesh=fsdp=1 --device=H100-80G
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELHOUSE="${WHEELHOUSE:-launch/wheelhouse}"
if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  if [[ -d "$WHEELHOUSE" ]]; then
    python3 launch/accelerator_setup.py --platform gpu --wheelhouse "$WHEELHOUSE"
  else
    python3 launch/accelerator_setup.py --platform gpu
  fi
fi
python3 -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d; print('devices:', d)"
# XLA preallocates 75% of GPU memory by default; the planner assumes ~all of it is usable.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
exec python3 -m igpo_jax.train "$@"
