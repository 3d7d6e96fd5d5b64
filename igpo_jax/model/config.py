"""Decoder hyper-parameters: one frozen record for Qwen2/2.5, Qwen3 and the Llama family.

A `ModelConfig` is derived from a checkpoint (HF `config.json` or GGUF metadata) or taken from a
preset; the decoder never reads a checkpoint's own dictionary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

# Architectures the decoder covers, and the switches that distinguish them.
_ARCHITECTURES = {
    # model_type: (qkv_bias, qk_norm)
    "qwen2": (True, False),
    "qwen3": (False, True),
    "llama": (False, False),
}
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint asks for something this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_type` as in transformers); 'default' means none."""

    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str  # 'qwen2' | 'qwen3' | 'llama'
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    # Storage dtype of the weights and dtype of the matmuls; norms and softmax run in fp32.
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False  # rematerialise each layer in the backward pass
    # cache-free forwards (update, scoring, π_ref) run the layers as one lax.scan (qwen.scan_layers)
    scan_layers: bool = False
    # query block of the cache-free causal attention (0: one block); 64 measured fastest for
    # forward + backward on the CPU
    attention_chunk: int = 64
    # 'dense' (`attention_chunk` above) or 'blockwise' (flash-style, O(length) memory in the
    # forward and the backward; blocks of `attention_block` queries × keys): blockwise_attention.py
    attention: str = "dense"
    attention_block: int = 512
    # with attention='blockwise': on an NVIDIA GPU, the masks cuDNN's fused attention takes
    # (right-padded causal rows, bf16/fp16) run through it instead (fused_attention.py)
    gpu_fused_attention: bool = False
    # the policy's log-probs (update, π_old, π_ref, information-gain scoring) are of logits / this:
    # the distribution a rollout at this temperature sampled from, as veRL's actor divides its
    # logits by the rollout temperature (token_logprobs.py); sampling applies its own temperature
    logprob_temperature: float = 1.0

    def __post_init__(self):
        if self.model_type not in _ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.model_type!r}; supported: {sorted(_ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_scaling.rope_type not in _SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope scaling type {self.rope_scaling.rope_type!r}; supported: {_SUPPORTED_ROPE_TYPES}")
        if self.attention not in ("dense", "blockwise") or self.attention_block < 1:
            raise ValueError(f"attention must be 'dense' or 'blockwise' with attention_block ≥ 1, got "
                             f"{self.attention!r}, {self.attention_block}")
        if self.gpu_fused_attention and self.attention != "blockwise":
            raise ValueError(f"gpu_fused_attention needs attention='blockwise' (the kernel for the masks cuDNN "
                             f"does not take), got attention={self.attention!r}")
        if not self.logprob_temperature > 0:
            raise ValueError(f"logprob_temperature must be > 0, got {self.logprob_temperature}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that transformers reads back as the matching architecture."""
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type != "default":
            rope["factor"] = self.rope_scaling.factor
        if self.rope_scaling.rope_type == "llama3":
            rope.update(low_freq_factor=self.rope_scaling.low_freq_factor,
                        high_freq_factor=self.rope_scaling.high_freq_factor,
                        original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings)
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
        out = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": None if self.rope_scaling.rope_type == "default" else rope,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.param_dtype,
        }
        if self.model_type == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        if self.model_type == "qwen3":
            out.update(attention_bias=False)
        return out


def _rope_from_hf(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """transformers 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope scaling type {rope_type!r}; supported: {_SUPPORTED_ROPE_TYPES}")
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    return float(theta), RopeScaling(rope_type=rope_type, **{k: merged[k] for k in fields if k in merged})


def from_hf_config(cfg: Mapping[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from a transformers `config.json` dictionary."""
    model_type = cfg.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture model_type={model_type!r}; supported: {sorted(_ARCHITECTURES)}")
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError("sliding-window attention (use_sliding_window=true) is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"unsupported activation {cfg['hidden_act']!r}; only silu (SwiGLU)")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    qkv_bias, qk_norm = _ARCHITECTURES[model_type]
    if model_type == "llama" and cfg.get("attention_bias"):
        qkv_bias = True
    theta, scaling = _rope_from_hf(cfg)
    heads = cfg["num_attention_heads"]
    kwargs = dict(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def from_hf_dir(path: str, **overrides) -> ModelConfig:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no config.json in model directory {path!r}")
    with open(config_path) as f:
        return from_hf_config(json.load(f), **overrides)


def _f32(value) -> float:
    """GGUF stores float32; take the shortest decimal that rounds to it (9.99999974e-06 → 1e-05)."""
    return float(str(np.float32(value)))


def from_gguf_metadata(meta: Mapping[str, Any], has_output_tensor: bool, **overrides) -> ModelConfig:
    """ModelConfig from GGUF key/values (`{arch}.block_count`, …)."""
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCHITECTURES)}")
    qkv_bias, qk_norm = _ARCHITECTURES[arch]
    heads = int(meta[f"{arch}.attention.head_count"])
    hidden = int(meta[f"{arch}.embedding_length"])
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise UnsupportedModelError(f"unsupported GGUF rope scaling type {scaling_type!r}")
    scaling = (RopeScaling("linear", float(meta[f"{arch}.rope.scaling.factor"]))
               if scaling_type == "linear" else RopeScaling())
    kwargs = dict(
        model_type=arch,
        vocab_size=int(meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=hidden,
        intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
        num_layers=int(meta[f"{arch}.block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        rope_theta=_f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=_f32(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        tie_embeddings=not has_output_tensor,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 32768)),
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def _qwen2_5(layers, hidden, inter, heads, kv, tie, vocab=152064) -> ModelConfig:
    return ModelConfig("qwen2", vocab, hidden, inter, layers, heads, kv, hidden // heads,
                       rope_theta=1e6, qkv_bias=True, tie_embeddings=tie, rms_norm_eps=1e-6)


def _qwen3(layers, hidden, inter, heads, kv, tie) -> ModelConfig:
    return ModelConfig("qwen3", 151936, hidden, inter, layers, heads, kv, 128, rope_theta=1e6,
                       qk_norm=True, tie_embeddings=tie, rms_norm_eps=1e-6, max_position_embeddings=40960)


# Shapes of the public checkpoints (from their config.json files), for planning and tests that
# need a real shape without the weights. Loading a checkpoint always derives its own config.
PRESETS: dict[str, ModelConfig] = {
    "Qwen2.5-0.5B-Instruct": _qwen2_5(24, 896, 4864, 14, 2, True, vocab=151936),
    "Qwen2.5-1.5B-Instruct": _qwen2_5(28, 1536, 8960, 12, 2, True, vocab=151936),
    "Qwen2.5-3B-Instruct": _qwen2_5(36, 2048, 11008, 16, 2, True, vocab=151936),
    "Qwen2.5-7B-Instruct": _qwen2_5(28, 3584, 18944, 28, 4, False),
    "Qwen2.5-14B-Instruct": _qwen2_5(48, 5120, 13824, 40, 8, False),
    "Qwen2.5-32B-Instruct": _qwen2_5(64, 5120, 27648, 40, 8, False),
    "Qwen3-0.6B": _qwen3(28, 1024, 3072, 16, 8, True),
    "Qwen3-1.7B": _qwen3(28, 2048, 6144, 16, 8, True),
    "Qwen3-4B": _qwen3(36, 2560, 9728, 32, 8, True),
    "Qwen3-8B": _qwen3(36, 4096, 12288, 32, 8, False),
    "Qwen3-14B": _qwen3(40, 5120, 17408, 40, 8, False),
    "Qwen3-32B": _qwen3(64, 5120, 25600, 64, 8, False),
    "SmolLM2-135M-Instruct": ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, rope_theta=1e5,
                                         rms_norm_eps=1e-5, tie_embeddings=True,
                                         max_position_embeddings=8192),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
