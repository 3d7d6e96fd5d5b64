"""Shared fixtures. torch/transformers models appear here only as numerical references."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests leave nothing in ~/.cache: the weights cache is on only where a test turns it on (gguf_file_test)
os.environ.setdefault("IGPO_JAX_WEIGHTS_CACHE", "off")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


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
