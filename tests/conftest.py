"""Shared fixtures. torch/transformers models appear here only as numerical references."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests leave nothing in ~/.cache: the weights cache is on only where a test turns it on (gguf_file_test)
os.environ.setdefault("IGPO_JAX_WEIGHTS_CACHE", "off")

# The reference dev file (Search-R1's parquet layout) lives in shared/ beside the checkout:
# <parent of the repository>/shared/data/igpo_dev.parquet, where CI (a fresh clone with a copy of
# shared/ beside it) has it. IGPO_JAX_DEV_FILE=/path/to/igpo_dev.parquet points elsewhere.
DEV_FILE_ENV = "IGPO_JAX_DEV_FILE"
DEFAULT_DEV_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "igpo_dev.parquet"


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_after_each_module():
    """Every XLA CPU executable a test compiles holds memory maps of its code while jit's caches keep
    it; one process running the whole suite kept thousands of them and crossed the kernel's
    vm.max_map_count (65530 here), after which XLA segfaulted in the next compile (update_test,
    2026-12-07, under jax 0.10.2 and 0.11.2 alike). A later module that needs a program again
    compiles it again (modules share few)."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session")
def reference_dev_file() -> Path:
    """The shared reference dev file; a test that needs it fails (never skips) where it is missing."""
    path = Path(os.environ.get(DEV_FILE_ENV) or DEFAULT_DEV_FILE)
    if not path.is_file():
        pytest.fail(f"the reference dev file {path} is missing: the tests read it from shared/data/ beside "
                    f"the checkout (copy shared/ there) or from ${DEV_FILE_ENV}", pytrace=False)
    return path


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def load_config(name: str):
    """configs/<name>.py's get_config(), loaded from its file (configs/ is not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def write_tiny_hf_model(model_type: str, path, seed: int = 0, **overrides):
    """A tiny random transformers model of `model_type`, saved with save_pretrained; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
               "llama": (LlamaConfig, LlamaForCausalLM)}
    config_cls, model_cls = classes[model_type]
    kwargs = dict(TINY, **overrides)
    if model_type == "qwen3":
        kwargs.setdefault("head_dim", 16)
    if model_type == "llama":
        kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 50000.0})
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # random biases and norm scales, so that every parameter is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="session")
def smollm2_path():
    from igpo_jax.model.embedded import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from igpo_jax.model.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from igpo_jax.model.weights import load_gguf

    return load_gguf(smollm2_path)
