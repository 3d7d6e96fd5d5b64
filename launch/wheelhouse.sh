#!/usr/bin/env bash
# On a machine with internet: the wheels an accelerator host without internet needs, to copy there
# with the code. launch/gpu_check.sh and launch/single_gpu.sh install from launch/wheelhouse when it
# exists (pip --no-index), using the host's own CUDA/TPU build of JAX (launch/accelerator_setup.py).
#   bash launch/wheelhouse.sh [DIR] [--with-embedded-model]    (default DIR: launch/wheelhouse, ~20 MB;
#                                                               the embedded model adds 93 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="launch/wheelhouse"
if [[ $# -gt 0 && "$1" != --* ]]; then dir="$1"; shift; fi
exec python3 launch/accelerator_setup.py --download "$dir" "$@"
