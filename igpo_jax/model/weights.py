"""Checkpoints in and out: HF safetensors directories and GGUF files → `Decoder`; `Decoder` → HF dir.

Loading goes tensor by tensor: the model is first built abstractly (`nnx.eval_shape`, no memory),
then each parameter is read from the file (memory-mapped), converted to our layout and dtype,
and placed on its device sharding before the next one is read, so the host never holds a
second full copy of the weights.

Our layout keeps heads as their own axes so that each can carry a logical axis name:
q/k/v kernels [D, heads, H], o [heads, H, D], MLP kernels [in, out], lm_head [D, V].
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from igpo_jax.runtime import sharding as sharding_lib
from igpo_jax.model import config as config_lib, gguf_file
from igpo_jax.model.config import ModelConfig
from igpo_jax.model.qwen import Decoder, abstract_decoder


class CheckpointError(ValueError):
    """A checkpoint file does not match what the model needs; the message names the tensor."""


Path = tuple  # a parameter's path in the NNX state, e.g. ('layers', 3, 'attn', 'q_proj')


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter: where it lives in the file and how its layout differs from ours."""

    path: Path
    name: str  # tensor name in the file
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_file: Callable[[np.ndarray], np.ndarray]


def _same(x):
    return x


def _transpose(x):
    return x.T


def _in_heads(heads: int):
    """File [heads*H, D] ↔ ours [D, heads, H] (q/k/v kernels)."""
    def to_ours(w):
        return w.T.reshape(w.shape[1], heads, w.shape[0] // heads)

    def to_file(w):
        return w.reshape(w.shape[0], -1).T
    return to_ours, to_file


def _bias_heads(heads: int):
    return (lambda b: b.reshape(heads, -1)), (lambda b: b.reshape(-1))


def _out_heads(heads: int):
    """File [D, heads*H] ↔ ours [heads, H, D] (o kernel)."""
    def to_ours(w):
        return w.T.reshape(heads, w.shape[1] // heads, w.shape[0])

    def to_file(w):
        return w.reshape(-1, w.shape[-1]).T
    return to_ours, to_file


def _tensor_maps(cfg: ModelConfig, names: dict[str, str]) -> list[TensorMap]:
    """The full parameter list of `cfg`, named by `names` (a per-format naming scheme)."""
    n, k = cfg.num_heads, cfg.num_kv_heads
    maps = [TensorMap(("embed",), names["embed"], _same, _same),
            TensorMap(("final_norm",), names["final_norm"], _same, _same)]
    if not cfg.tie_embeddings:
        maps.append(TensorMap(("lm_head",), names["lm_head"], _transpose, _transpose))
    for i in range(cfg.num_layers):
        def layer(path, key, conv=(_same, _same)):
            maps.append(TensorMap(("layers", i) + path, names[key].format(i=i), *conv))
        layer(("input_norm",), "input_norm")
        layer(("post_attn_norm",), "post_attn_norm")
        layer(("attn", "q_proj"), "q", _in_heads(n))
        layer(("attn", "k_proj"), "k", _in_heads(k))
        layer(("attn", "v_proj"), "v", _in_heads(k))
        layer(("attn", "o_proj"), "o", _out_heads(n))
        if cfg.qkv_bias:
            layer(("attn", "q_bias"), "q_bias", _bias_heads(n))
            layer(("attn", "k_bias"), "k_bias", _bias_heads(k))
            layer(("attn", "v_bias"), "v_bias", _bias_heads(k))
        if cfg.qk_norm:
            layer(("attn", "q_norm"), "q_norm")
            layer(("attn", "k_norm"), "k_norm")
        layer(("mlp", "gate_proj"), "gate", (_transpose, _transpose))
        layer(("mlp", "up_proj"), "up", (_transpose, _transpose))
        layer(("mlp", "down_proj"), "down", (_transpose, _transpose))
    return maps


HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "input_norm": "model.layers.{i}.input_layernorm.weight",
    "post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}

GGUF_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    "input_norm": "blk.{i}.attn_norm.weight",
    "post_attn_norm": "blk.{i}.ffn_norm.weight",
    "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight",
    "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias",
    "v_bias": "blk.{i}.attn_v.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight",
    "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
}


# ---------------------------------------------------------------------------------------------
# Building a model from a stream of (path, array) pairs


def _abstract_model(cfg: ModelConfig):
    abstract = abstract_decoder(cfg)
    return nnx.split(abstract)


def _placement(var: nnx.Variable, mesh: Mesh | None, rules) -> jax.sharding.Sharding | None:
    if mesh is None:
        return None
    return sharding_lib.named_sharding(mesh, rules, var.get_metadata()["axes"], var.shape)


def _build(cfg: ModelConfig, source: str, read: Callable[[TensorMap], np.ndarray], maps: list[TensorMap],
           mesh: Mesh | None, rules) -> Decoder:
    graphdef, state = _abstract_model(cfg)
    flat = dict(nnx.to_flat_state(state))
    for tmap in maps:
        var = flat[tmap.path]
        expected = tuple(var.shape)
        array = tmap.to_ours(read(tmap))
        if tuple(array.shape) != expected:
            raise CheckpointError(
                f"tensor {tmap.name!r} in {source} has shape {tuple(array.shape)} in our layout, "
                f"expected {expected} for {cfg.model_type} with hidden={cfg.hidden_size}, "
                f"heads={cfg.num_heads}/{cfg.num_kv_heads}, head_dim={cfg.head_dim}")
        # Convert on the host in the target dtype; device_put is the only copy onto the device.
        value = jax.device_put(np.asarray(array, dtype=cfg.jnp_param_dtype), _placement(var, mesh, rules))
        flat[tmap.path] = var.replace(value=value)
    state = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# HF safetensors directories


def _safetensor_files(path: str) -> dict[str, str]:
    """tensor name → file, for a single `model.safetensors` or a sharded index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")
    from safetensors import safe_open
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def load_hf(path: str, mesh: Mesh | None = None, rules=None, **config_overrides) -> Decoder:
    """Decoder from an HF model directory (config.json + safetensors, single or sharded)."""
    from safetensors import safe_open

    cfg = config_lib.from_hf_dir(path, **config_overrides)
    files = _safetensor_files(path)
    handles: dict[str, object] = {}

    def read(tmap: TensorMap) -> np.ndarray:
        if tmap.name not in files:
            raise CheckpointError(f"missing tensor {tmap.name!r} in {path}")
        file = files[tmap.name]
        if file not in handles:
            handles[file] = safe_open(file, framework="numpy")
        return handles[file].get_tensor(tmap.name)

    return _build(cfg, path, read, _tensor_maps(cfg, HF_NAMES), mesh, rules or sharding_lib.DEFAULT_RULES)


# ---------------------------------------------------------------------------------------------
# GGUF files

_GGUF_SUPPORTED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows of Llama checkpoints (interleaved RoPE); undo it."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, mesh: Mesh | None = None, rules=None, **config_overrides) -> Decoder:
    """Decoder from a GGUF file, dequantised to `param_dtype` tensor by tensor (or read back from
    the weights cache, gguf_file.py: the same bits)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path!r}")
    file = gguf_file.open_gguf(path)
    cfg = config_lib.from_gguf_metadata(file.metadata, has_output_tensor="output.weight" in file.tensor_shapes,
                                        **config_overrides)

    @functools.cache
    def tensors():  # the file is parsed only for a tensor the cache does not hold
        return {t.name: t for t in gguf_file.parsed(path).tensors}

    def dequantise(tmap: TensorMap) -> np.ndarray:
        import gguf

        t = tensors()[tmap.name]
        qtype = t.tensor_type.name
        if qtype not in _GGUF_SUPPORTED:
            raise CheckpointError(
                f"tensor {tmap.name!r} in {path} has unsupported GGUF type {qtype}; supported: {_GGUF_SUPPORTED}")
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = w.reshape(tuple(reversed([int(d) for d in t.shape])))  # GGUF lists dims innermost-first
        if cfg.model_type == "llama" and tmap.path[-1] in ("q_proj", "k_proj"):
            w = _unpermute_rope(w, cfg.num_heads if tmap.path[-1] == "q_proj" else cfg.num_kv_heads)
        return w

    with gguf_file.dequantised(file, cfg.jnp_param_dtype) as get:
        def read(tmap: TensorMap) -> np.ndarray:
            if tmap.name not in file.tensor_shapes:
                raise CheckpointError(f"missing tensor {tmap.name!r} in {path}")
            return get(tmap.name, lambda: dequantise(tmap))

        return _build(cfg, path, read, _tensor_maps(cfg, GGUF_NAMES), mesh, rules or sharding_lib.DEFAULT_RULES)


def load(path: str, mesh: Mesh | None = None, rules=None, **config_overrides) -> Decoder:
    """A GGUF file or an HF directory, by what `path` is."""
    if os.path.isdir(path):
        return load_hf(path, mesh, rules, **config_overrides)
    if path.endswith(".gguf"):
        return load_gguf(path, mesh, rules, **config_overrides)
    raise FileNotFoundError(f"{path!r} is neither an HF model directory nor a .gguf file")


# ---------------------------------------------------------------------------------------------
# Export


def _plan_shards(maps: list[TensorMap], flat, itemsize: int, max_bytes: int) -> list[list[TensorMap]]:
    """Group tensors into files of at most `max_bytes`, from shapes alone."""
    shards: list[list[TensorMap]] = [[]]
    size = 0
    for tmap in maps:
        nbytes = int(np.prod(flat[tmap.path].shape)) * itemsize
        if size and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tmap)
        size += nbytes
    return shards


def export_hf(model: Decoder, out_dir: str, tokenizer=None, dtype: str | None = None,
              max_shard_bytes: int = 4 << 30) -> str:
    """Write `model` as an HF directory that transformers (and vLLM/SGLang) load.

    Tensors go to safetensors shards of at most `max_shard_bytes` (with an index when there are
    several); only one shard is gathered on the host at a time.
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    np_dtype = jnp.dtype(dtype or model.cfg.param_dtype)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    shards = _plan_shards(_tensor_maps(model.cfg, HF_NAMES), flat, np_dtype.itemsize, max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        tensors = {}
        for tmap in shard:
            array = np.asarray(jax.device_get(flat[tmap.path][...]))
            tensors[tmap.name] = np.ascontiguousarray(tmap.to_file(array).astype(np_dtype))
            weight_map[tmap.name] = file
            total += tensors[tmap.name].nbytes
        save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg_dict = model.cfg.to_hf_dict()
    cfg_dict["torch_dtype"] = str(np_dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            cfg_dict[key] = getattr(tokenizer, key, None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    return out_dir
