"""Memory plan per device, from shapes alone (no weights, no devices, no allocation).

The estimates behind `python -m igpo_jax.plan` (the command line is igpo_jax/plan.py).

Each array's bytes on one device follow from its shape, its logical axes (the `axes` metadata of
the model's params; the KV cache's axes as in `KVCache.init`), the sharding rules and the mesh
axis sizes: `sharding.logical_to_spec` picks the mesh axes of each dimension and the dimension is
divided by their product. The mesh is an `AbstractMesh`, so any mesh size plans on a laptop.

What is resident, and when (per device):
  always   params + optimiser state (as `update.make_optimizer` builds it: AdamW moments in
           float32 whatever the params' dtype, step counts) + the frozen reference policy (a copy
           of params in the compute dtype) + the sampling copy (`rollout.dtype`, when it differs)
  rollout  + KV cache: rollout_batch × context slots, batch over data×fsdp, kv_heads over tensor
  update   + gradients (the accumulator and one micro-batch's, both params-sized)
           + activations of one micro-batch, with remat per layer (estimate below)
Peak = always + max(rollout, update).

Activation estimate, per device, b = compute-dtype bytes, u = micro-batch rows per device
(micro_batch / (data·fsdp), at least 1), T = update sequence length, tp = tensor axis size,
D hidden, F mlp, N heads, K kv heads, H head dim, V vocab, C = logprob chunk:
  saved layer inputs   num_layers · u·T·D · b              (what remat keeps between layers)
  one layer recomputed u·T·(4D + (2N + 2K)·H/tp + 3F/tp) · b (norms, q/k/v/o, gate/up/act)
  attention            u·(N/tp)·T²/2 · (4 + b)              (fp32 scores + probs of the causal
                                                           half; no flash attention here)
  vocab projection     3 · u·C·(V/tp) · 4                   (fp32 logits, softmax, their grad)
It is an estimate (XLA may fuse or keep more); the other lines are exact for what the code
allocates, as tests/plan_test.py checks against a sharded model on 8 simulated devices.

With --config the plan follows the programs a training step runs, phase by phase (`plan_settings`),
and `--compile` sets it beside XLA's memory_analysis of them (compiled.py, which imports this module). What XLA keeps was
read from their buffer assignments (heap-simulator traces of Qwen2.5-7B on fsdp=8 and of small
models); per device, b = compute-dtype bytes, L layers, W = one layer's params all-gathered over
fsdp (elements), R = rows over all batch devices:
  decode   sampling copy + KV cache + every weight but the embedding table gathered in
           rollout.dtype: the all-gathers are loop-invariant, so XLA hoists them out of the
           decode loop and all of them live while it runs (the table is read where it lies)
  scoring  params + the larger of: the layers (residual stream, one layer's intermediates and
           attention, its weights gathered, W·(4 + b), freed with the layer: no loop keeps them)
           and the log-prob gather (below)
  update   params + float32 gradient accumulator + the largest of:
           layer backward   saved layer inputs L·u·T·D·(b + 4, or 4 in float32) + one layer's
                            recompute, its attention backward, its weights W·(4 + b) and full
                            gradient W·4
           log-prob gather  saved inputs + 2·R·(T−1)·D·4 + the last layer's recompute up to its MLP
           gradient all-reduce  2·G·W·4, G = min(L, 256 // arrays per layer)
where XLA:CPU (the compile check's backend) adds what a GPU build may not:
  - saved inputs at b + 4 bytes: its remat barriers are dropped before its last CSE pass, which
    shares rms_norm's float32 upcast of each layer input between the forward and the recompute;
  - bf16 all-gathers and all-reduces run in float32 (converted on either side);
  - fsdp gradients are all-reduced in full, then sliced (no reduce-scatter), and its combiner
    merges up to 256 all-reduces into one, whose operands and results all live at once.
The log-prob gather is the code's own: token_logprobs sorts the loss positions of the flattened,
batch-sharded [rows·T] axis to the front, and the SPMD partitioner cannot split that gather, so
every device assembles all devices' positions (a masked local gather summed by an all-reduce: two
global [R·(T−1), D] copies) in the forward and again in the backward's scatter.
With `model.scan_layers` (qwen.scan_layers, the 7B config's layout) the layers' weights are
stacked (a copy in the param dtype; the loop's stacked weight gradients take as many bytes), the
saved layer inputs are the float32 upcast alone, and each iteration all-reduces one layer's
gradients (nothing to combine). Unrolled, at long micro-batches XLA:CPU's schedule defers the
weight-gradient dots of several layers and keeps their MLP gradients ([T, F] each) alive across
later layers' backward, which is not modelled (7B, 32768 tokens: update 68.3 GB compiled, 46.8 GB
estimated; scanned: 38.8 GB compiled); see tests/plan_test.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from igpo_jax.runtime import sharding
from igpo_jax.model import config as model_config
from igpo_jax.model.kv_cache import KV_AXES
from igpo_jax.model.qwen import abstract_decoder

GiB = 1024 ** 3
# Memory per device, bytes. GPUs list their nominal HBM; nvidia-smi shows slightly less
# (H100-80G: 79.6 GiB, H200: 140.4 GiB).
DEVICES: dict[str, int] = {
    "v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB,
    "A100-80G": 80 * GiB, "H100-80G": 80 * GiB, "H200": 141 * GiB,
}


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=8,tensor=1' → {'fsdp': 8, 'tensor': 1}."""
    out = {}
    for part in text.split(","):
        name, sep, size = part.partition("=")
        if not sep or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"mesh {text!r}: expected NAME=SIZE,... with sizes ≥ 1, got {part!r}")
        out[name.strip()] = int(size)
    return out


def abstract_mesh(shape: Mapping[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(shape.values()), tuple(shape))


def shard_shape(shape: Sequence[int], axes: Sequence[str | None] | None, mesh: AbstractMesh,
                rules: sharding.Rules) -> tuple[int, ...]:
    """The shape of one device's shard (None axes: replicated)."""
    if axes is None:
        return tuple(shape)
    spec = sharding.logical_to_spec(axes, rules, mesh, shape)
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        out.append(dim // math.prod(mesh.shape[n] for n in names))
    return tuple(out)


def per_device_bytes(tree, mesh: AbstractMesh, rules: sharding.Rules) -> int:
    """Σ over leaves of one device's shard bytes; leaves are nnx.Variables with `axes` metadata
    (sharded by them) or plain ShapeDtypeStructs (replicated)."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if isinstance(leaf, nnx.Variable):
            axes, value = leaf.get_metadata().get("axes"), leaf.get_value()
        else:
            axes, value = None, leaf
        total += math.prod(shard_shape(value.shape, axes, mesh, rules)) * jnp.dtype(value.dtype).itemsize
    return total


def abstract_params(cfg: model_config.ModelConfig):
    """nnx.State of the decoder's params as ShapeDtypeStructs, with their `axes` metadata."""
    return nnx.state(abstract_decoder(cfg), nnx.Param)


def abstract_opt_state(params):
    """The optimiser state `update.Updater` creates, as shapes. optax's zeros_like moments carry
    the params' axes, so they shard like the params; step counts are replicated scalars."""
    from igpo_jax.training.update import UpdateConfig, make_optimizer

    return jax.eval_shape(make_optimizer(UpdateConfig()).init, params)


def kv_cache_bytes(cfg: model_config.ModelConfig, batch: int, size: int, mesh: AbstractMesh,
                   rules: sharding.Rules, dtype=None) -> int:
    """Per-device bytes of `KVCache.init(cfg, batch, size, dtype, mesh, rules)`."""
    dtype = jnp.dtype(dtype or cfg.jnp_dtype)
    kv = (batch, cfg.num_kv_heads, size, cfg.head_dim)
    total = 2 * cfg.num_layers * math.prod(shard_shape(kv, KV_AXES, mesh, rules)) * dtype.itemsize
    total += math.prod(shard_shape((batch, size), ("batch", "cache_length"), mesh, rules))  # valid (bool)
    total += math.prod(shard_shape((batch,), ("batch",), mesh, rules)) * 4  # next_pos (int32)
    return total + 4  # length (int32 scalar, replicated)


def activation_bytes(cfg: model_config.ModelConfig, micro_batch: int, seq_len: int, mesh: AbstractMesh,
                     rules: sharding.Rules, logprob_chunk: int = 128) -> int:
    """The update's activation estimate per device (module docstring)."""
    b = cfg.jnp_dtype.itemsize
    u = max(1, shard_shape((micro_batch,), ("batch",), mesh, rules)[0])
    tp = lambda n, axis: shard_shape((n,), (axis,), mesh, rules)[0]
    d, t = cfg.hidden_size, seq_len
    n, k, h, f, v = tp(cfg.num_heads, "heads"), tp(cfg.num_kv_heads, "kv_heads"), cfg.head_dim, \
        tp(cfg.intermediate_size, "mlp"), tp(cfg.vocab_size, "vocab")
    saved = cfg.num_layers * u * t * d * b
    layer = u * t * (4 * d + (2 * n + 2 * k) * h + 3 * f) * b
    attention = u * n * t * t // 2 * (4 + b)
    vocab = 3 * u * min(logprob_chunk, t) * v * 4
    return saved + layer + attention + vocab


@dataclasses.dataclass(frozen=True)
class Plan:
    params: int
    opt_state: int
    reference: int
    kv_cache: int
    grads: int
    activations: int  # the update program's temporaries (`plan_settings`: the largest of `update_phases`)
    rollout_copy: int = 0  # the sampling copy of the policy (rollout.dtype), resident
    decode: int = 0  # a decode step's temporaries (logits of the decoding rows)
    scoring: int = 0  # the scoring program's temporaries (the largest of `scoring_phases`)
    update_batch: int = 0  # the step's padded update rows (tokens, masks, advantages, log-probs)
    # decode: every weight but the embedding table all-gathered over fsdp, in rollout.dtype; the
    # gathers are loop-invariant, so XLA hoists them out of the decode loop and all of them stay
    # live while it runs (0 without fsdp sharding)
    gathered_rollout: int = 0
    # the temporaries of each phase of the scoring and update programs (name → bytes): a program's
    # temporaries are those of its largest phase (`scoring_phases`, `update_phases`)
    scoring_phases: Mapping[str, int] = dataclasses.field(default_factory=dict)
    update_phases: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def always(self) -> int:
        return self.params + self.opt_state + self.reference + self.rollout_copy

    @property
    def rollout_phase(self) -> int:
        return self.kv_cache + self.decode + self.gathered_rollout

    @property
    def update_phase(self) -> int:
        return self.update_batch + self.grads + self.activations

    @property
    def peak(self) -> int:
        return self.always + max(self.rollout_phase, self.scoring, self.update_phase)


def plan(cfg: model_config.ModelConfig, mesh_shape: Mapping[str, int], rules: sharding.Rules = sharding.DEFAULT_RULES,
         rollout_batch: int = 512, context: int = 32768, micro_batch: int = 0, update_len: int = 0,
         with_reference: bool = True) -> Plan:
    """Per-device bytes of everything a training step holds (module docstring)."""
    mesh = abstract_mesh(mesh_shape)
    params = abstract_params(cfg)
    p = per_device_bytes(params, mesh, rules)
    micro = micro_batch or mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    return Plan(params=p, opt_state=per_device_bytes(abstract_opt_state(params), mesh, rules),
                reference=p if with_reference else 0,
                kv_cache=kv_cache_bytes(cfg, rollout_batch, context, mesh, rules),
                grads=2 * p, activations=activation_bytes(cfg, micro, update_len or context, mesh, rules))


# ------------------------------------------------------------------ planning an experiment config

UPDATE_BYTES_PER_TOKEN = 4 + 1 + 4 * 4  # UpdateBatch: int32 tokens, bool valid, 4 float32 columns
PSEUDO_TURN_TOKENS = 64  # a pseudo answer turn (template + answer), as scoring rounds it up


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one training step of a config asks for (each field names the config key it reads)."""
    rollout_rows: int  # data.train_batch_size × rollout.n
    concurrent_rows: int  # rollout.max_concurrent_rows (0 or absent: all rollout rows at once)
    context: int  # rollout.context_length: KV-cache slots per row and the longest update row
    micro_rows: int  # actor.micro_batch_size (0: the mini-batch), the padded path's rows per micro-batch
    micro_tokens: int  # actor.max_tokens_per_micro_batch per device (0: padded micro-batches)
    scoring_rows: int  # algorithm.scoring_batch_size
    scoring_len: int  # context + rollout.max_turns pseudo turns
    with_reference: bool  # actor.use_kl_loss
    rollout_dtype: str | None  # rollout.dtype


def load_config(path: str):
    """`get_config()` of a config file (configs/*.py), as `--config=` loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_plan_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def model_from_config(c) -> model_config.ModelConfig:
    """The config's model: its HF config.json when model.path is a directory holding one, else
    the preset named by the path's last component (e.g. /ckpt/Qwen2.5-7B-Instruct), the embedded
    SmolLM2 for an empty path; with the config's dtypes, remat and attention kernel."""
    import os

    m = c.model
    overrides = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, attention=m.attention,
                     attention_block=m.attention_block, gpu_fused_attention=m.gpu_fused_attention)
    if m.path and os.path.isfile(os.path.join(m.path, "config.json")):
        return model_config.from_hf_dir(m.path, **overrides)
    name = os.path.basename(m.path.rstrip("/")) or "SmolLM2-135M-Instruct"
    name = name.removesuffix(".gguf")
    if name not in model_config.PRESETS:
        raise ValueError(f"model.path={m.path!r}: no config.json there and {name!r} is not a preset "
                         f"({', '.join(sorted(model_config.PRESETS))})")
    return model_config.preset(name, **overrides)


def mesh_from_config(c, devices: int) -> dict[str, int]:
    """config.mesh.shape with its -1 axis taking the rest of `devices`."""
    shape = dict(c.mesh.shape)
    known = math.prod(v for v in shape.values() if v != -1)
    if devices % known:
        raise ValueError(f"mesh {shape} does not divide {devices} devices")
    return {k: (devices // known if v == -1 else v) for k, v in shape.items()}


def settings_from_config(c) -> Settings:
    rows = c.data.train_batch_size * c.rollout.n
    # keys of features that may not be in every checkout yet: absent reads as off
    concurrent = c.rollout.max_concurrent_rows if "max_concurrent_rows" in c.rollout else 0
    budget = c.actor.max_tokens_per_micro_batch if "max_tokens_per_micro_batch" in c.actor else 0
    mini = c.actor.ppo_mini_batch_size or rows
    return Settings(rollout_rows=rows, concurrent_rows=min(concurrent or rows, rows), context=c.rollout.context_length,
                    micro_rows=c.actor.micro_batch_size or mini, micro_tokens=budget,
                    scoring_rows=c.algorithm.scoring_batch_size,
                    scoring_len=c.rollout.context_length + c.rollout.max_turns * PSEUDO_TURN_TOKENS,
                    with_reference=bool(c.actor.use_kl_loss), rollout_dtype=c.rollout.dtype)


def _dims(cfg, mesh, rules):
    tp = lambda n, axis: shard_shape((n,), (axis,), mesh, rules)[0]
    return (tp(cfg.num_heads, "heads"), tp(cfg.num_kv_heads, "kv_heads"), cfg.head_dim,
            tp(cfg.intermediate_size, "mlp"), tp(cfg.vocab_size, "vocab"))


def _batch_shards(mesh, rules) -> int:
    """Devices the batch axis is split over (data × fsdp with the default rules)."""
    n = math.prod(mesh.shape.values())  # divisible by any product of mesh axes
    return n // shard_shape((n,), ("batch",), mesh, rules)[0]


def _attention_bytes(cfg, rows: int, t: int, s: int, n: int, k: int, backward: bool) -> int:
    """Attention temporaries of `rows` rows of t queries over s keys (per device, n/k local heads).
    dense: fp32 scores and probabilities of the causal half ([T, S] per head). blockwise: one
    [block, block] score block (scores, probabilities; and their gradient in the backward) and the
    float32 output accumulator, plus float32 dq/dk/dv accumulators in the backward."""
    b = cfg.jnp_dtype.itemsize
    if cfg.attention != "blockwise":
        return rows * n * t * s // 2 * (4 + b)
    tq, tk = min(cfg.attention_block, t), min(cfg.attention_block, s)
    blocks = rows * n * tq * tk * 4 * (3 if backward else 2)
    acc = rows * t * n * cfg.head_dim * 4
    return blocks + acc + (rows * (t * n + 2 * s * k) * cfg.head_dim * 4 if backward else 0)


# Live values per token of one layer at its peak (forward, or the remat'd backward): two [D]
# norms/residuals, q and k/v, the attention output, gate and up. Fitted to XLA's memory-first CPU
# schedule (memory_analysis of the compiled programs, tests/plan_test.py): not every intermediate
# of the layer is alive at once; the legacy `activation_bytes` keeps its older, larger count.
def _LIVE_PER_TOKEN(d: int, n: int, k: int, h: int, f: int) -> int:
    return 2 * d + (n + 2 * k) * h + 2 * f


# What XLA's CPU backend (the one `plan --compile` checks against) does with these programs, read
# from their buffer assignments (module docstring):
# bf16 collectives run in float32: XLA:CPU converts a bf16 all-gather's or all-reduce's operand to
# float32, runs the collective and converts back, so the collective's buffers take 4 bytes an element.
CPU_COLLECTIVE_ITEMSIZE = 4
# XLA:CPU's all-reduce combiner merges independent all-reduces into one of at most 256 operands;
# all their operands and results are live at once.
CPU_COMBINED_ALL_REDUCE_OPERANDS = 256


def _layer_params(cfg, mesh_shape: Mapping[str, int], rules) -> tuple[int, int]:
    """(elements of one decoder layer's params on a device once all-gathered over fsdp, how many
    arrays they are)."""
    unsharded = abstract_mesh({k: (1 if k == "fsdp" else v) for k, v in mesh_shape.items()})
    layer = abstract_params(cfg.replace(num_layers=1, param_dtype="float32"))["layers"][0]
    arrays = jax.tree.leaves(layer, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return per_device_bytes(layer, unsharded, rules) // 4, len(arrays)


def _stacked_layers(cfg, mesh_shape: Mapping[str, int], rules) -> int:
    """Per-device bytes of the layer weights stacked for `model.scan_layers` (qwen.scan_layers: a
    copy in the param dtype, sharded as the params; 0 without the scan)."""
    if not cfg.scan_layers:
        return 0
    layer = abstract_params(cfg.replace(num_layers=1))["layers"][0]
    return cfg.num_layers * per_device_bytes(layer, abstract_mesh(mesh_shape), rules)


def _shapes(cfg, mesh_shape: Mapping[str, int], rules):
    """(compute itemsize, hidden size, per-device (heads, kv heads, head dim, mlp, vocab), whether
    fsdp splits the weights, `_layer_params`): what the phase estimates are made of."""
    dims = _dims(cfg, abstract_mesh(mesh_shape), rules)
    return (cfg.jnp_dtype.itemsize, cfg.hidden_size, dims, mesh_shape.get("fsdp", 1) > 1,
            _layer_params(cfg, mesh_shape, rules))


def update_phases(cfg, rows: int, t: int, global_rows: int, mesh_shape: Mapping[str, int], rules) -> dict[str, int]:
    """The update program's temporaries per device in each of its phases, for `rows` rows of t
    tokens a device (a packed micro-batch: one row of its token budget) of `global_rows` rows in
    all; the program needs the largest (module docstring)."""
    b, d, (n, k, h, f, _), fsdp, (layer_elements, layer_arrays) = _shapes(cfg, mesh_shape, rules)
    # remat keeps each layer's input for the backward; XLA:CPU drops the remat's optimisation
    # barriers before its last CSE pass, which then shares rms_norm's float32 upcast of the input
    # between the forward and the recompute: the upcast lives until the backward too
    # (scanned layers keep only that float32 upcast: the scan's stacked residual)
    saved = cfg.num_layers * rows * t * d * (4 if cfg.scan_layers else b + (4 if b < 4 else 0))
    # one layer's backward: its recomputed activations and their gradients; under fsdp its weights
    # all-gathered (in float32 on CPU, then cast to the compute dtype) and its float32 weight
    # gradient in full, before the all-reduce that reduces it over the fsdp shards
    weights = layer_elements * (CPU_COLLECTIVE_ITEMSIZE + b + 4) if fsdp else 0
    layer = rows * t * _LIVE_PER_TOKEN(d, n, k, h, f) * b + _attention_bytes(cfg, rows, t, t, n, k, True) + weights
    # token_logprobs gathers the loss positions to the front of the flattened [rows·T] axis (one
    # argsort over it). The axis is split over the batch devices, and XLA's SPMD partitioner does
    # not split that gather: every device selects from all devices' positions (a masked local
    # gather of the global [global_rows·(T-1), D], summed by an all-reduce: two global copies,
    # float32 on CPU), in the forward and again in the backward's scatter, next to the final
    # hidden state in float32. The last layer's recompute needs only its saved input, so XLA:CPU
    # runs it while the log-prob backward's copies are live, up to its MLP: gate, up and their
    # product ([F] a token each), the normed input, residual and o-projection ([D]), q and the
    # attention output ([N·H]), and the norm's float32 upcast
    gather = 2 * global_rows * (t - 1) * d * CPU_COLLECTIVE_ITEMSIZE
    # (scanned, the last layer's recompute is inside the loop, after the log-prob backward)
    recompute = 0 if cfg.scan_layers else rows * t * ((3 * f + 3 * d + 2 * n * h) * b + (4 * d if b < 4 else 0))
    logprob = gather + rows * t * d * 4 + recompute
    # the fsdp weight gradients are all-reduced in full (XLA:CPU has no reduce-scatter) and then
    # sliced; the combiner merges the layers' all-reduces, up to 256 arrays each, so the float32
    # gradients of that many layers are live at once, as operands and as results
    # (scanned layers reduce one layer's gradients an iteration: nothing to combine across layers)
    group = 1 if cfg.scan_layers else min(cfg.num_layers, max(1, CPU_COMBINED_ALL_REDUCE_OPERANDS // layer_arrays))
    all_reduce = 2 * group * layer_elements * 4 if fsdp else 0
    # scanned: the stacked weights and the loop's stacked weight gradients (as many bytes) live
    # through the whole program
    stacked = 2 * _stacked_layers(cfg, mesh_shape, rules)
    return {"layer backward": stacked + saved + layer, "log-prob gather": stacked + saved + logprob,
            "gradient all-reduce": stacked + all_reduce}


def scoring_phases(cfg, rows: int, s: int, context: int, global_rows: int, mesh_shape: Mapping[str, int],
                   rules) -> dict[str, int]:
    """The one-pass scoring forward's temporaries per device in each phase (no gradient), for
    `rows` rows of s tokens a device (`context` of them the rollout's) of `global_rows` in all.
    layers: the residual stream in and out, one layer's intermediates, attention (the dense [S, S]
    mask unless blockwise, which computes its blocks from a MaskSpec), the layer's weights
    all-gathered under fsdp (used where gathered: no loop keeps them). log-prob gather: the context
    tokens' log-probs select their positions over the whole batch as the update does
    (`update_phases`), next to the final hidden state in float32. (The vocab projection runs
    after, over chunks of the selected positions: smaller than either.)"""
    b, d, (n, k, h, f, _), fsdp, (layer_elements, _) = _shapes(cfg, mesh_shape, rules)
    stream = 2 * rows * s * d * b
    layer = rows * s * _LIVE_PER_TOKEN(d, n, k, h, f) * b
    mask = 0 if cfg.attention == "blockwise" else rows * s * s
    attention = (_attention_bytes(cfg, rows, s, s, n, k, False) if cfg.attention == "blockwise"
                 else rows * n * min(cfg.attention_chunk or s, s) * s * (4 + b))
    weights = layer_elements * (CPU_COLLECTIVE_ITEMSIZE + b) if fsdp else 0
    gather = 2 * global_rows * (context - 1) * d * CPU_COLLECTIVE_ITEMSIZE
    logprob = gather + rows * s * d * 4
    stacked = _stacked_layers(cfg, mesh_shape, rules)
    return {"layers": stacked + stream + layer + mask + attention + weights, "log-prob gather": logprob}


def decode_bytes(cfg, rows: int, span: int, mesh, rules) -> int:
    """A decode step's temporaries per device: fp32 logits, log-softmax and sampling weights of
    the decoding rows, and one layer's fp32 scores over the cache window."""
    n, _, _, _, v = _dims(cfg, mesh, rules)
    return rows * v * 4 * 3 + rows * n * span * 4 * 2


def plan_settings(cfg: model_config.ModelConfig, mesh_shape: Mapping[str, int], st: Settings,
                  rules: sharding.Rules = sharding.DEFAULT_RULES) -> Plan:
    """Per-device bytes of a training step of a config (its `Settings`)."""
    mesh = abstract_mesh(mesh_shape)
    params = abstract_params(cfg)
    p = per_device_bytes(params, mesh, rules)
    count_bytes = lambda dtype: per_device_bytes(abstract_params(cfg.replace(param_dtype=dtype)), mesh, rules)
    # the frozen reference is stored in the compute dtype (components.frozen_copy), the sampling
    # copy in rollout.dtype (components.in_dtype: none when the policy is already in it)
    reference = count_bytes(cfg.dtype) if st.with_reference else 0
    same = st.rollout_dtype is None or cfg.param_dtype == cfg.dtype == st.rollout_dtype
    rollout_copy = 0 if same else count_bytes(st.rollout_dtype)
    shards = _batch_shards(mesh, rules)
    per_device = lambda rows: max(1, shard_shape((rows,), ("batch",), mesh, rules)[0])
    padded = lambda rows: max(shards, -(-rows // shards) * shards)  # rows rounded up to the batch devices
    fsdp = mesh_shape.get("fsdp", 1) > 1
    rollout_dtype = st.rollout_dtype or cfg.dtype
    if fsdp:
        unsharded = abstract_mesh({k: (1 if k == "fsdp" else v) for k, v in mesh_shape.items()})
        weights = abstract_params(cfg.replace(param_dtype=rollout_dtype))
        # the embedding table is not gathered: a token's row is read where it lies (a gather on
        # the local shard of D, then an all-to-all); with tied embeddings it is also the vocab
        # projection, which is gathered
        table = 0 if cfg.tie_embeddings else per_device_bytes(weights["embed"], unsharded, rules)
        gathered_rollout = per_device_bytes(weights, unsharded, rules) - table
    else:
        gathered_rollout = 0
    if st.micro_tokens:
        rows, t, update_rows = 1, st.micro_tokens, shards  # one packed row of the budget per device
    else:
        rows, t, update_rows = per_device(st.micro_rows), st.context, padded(st.micro_rows)
    update = update_phases(cfg, rows, t, update_rows, mesh_shape, rules)
    scoring = scoring_phases(cfg, per_device(st.scoring_rows), st.scoring_len, st.context, padded(st.scoring_rows),
                             mesh_shape, rules)
    return Plan(
        params=p, opt_state=per_device_bytes(abstract_opt_state(params), mesh, rules), reference=reference,
        kv_cache=kv_cache_bytes(cfg, st.concurrent_rows, st.context, mesh, rules, rollout_dtype),
        # the float32 accumulator the gradient program returns, sharded like the params (a
        # micro-batch's own gradient is full-size per layer before its all-reduce: `update_phases`)
        grads=count_bytes("float32"),
        activations=max(update.values()),
        rollout_copy=rollout_copy,
        decode=decode_bytes(cfg, per_device(st.concurrent_rows), st.context, mesh, rules),
        scoring=max(scoring.values()),
        update_batch=per_device(st.rollout_rows) * st.context * UPDATE_BYTES_PER_TOKEN,
        gathered_rollout=gathered_rollout, scoring_phases=scoring, update_phases=update)


def fits(p: Plan, device: str, headroom: float = 0.1) -> tuple[bool, int]:
    """(fits, usable bytes): the peak must stay under capacity × (1 - headroom)."""
    usable = int(DEVICES[device] * (1 - headroom))
    return p.peak <= usable, usable


def _gb(n: int) -> str:
    return f"{n / 1e9:9.2f} GB"


def report(p: Plan, cfg: model_config.ModelConfig, mesh_shape: Mapping[str, int], total_params: int,
           device: str | Sequence[str] | None, headroom: float, compiled=None, settings: Settings | None = None) -> str:
    devices = math.prod(mesh_shape.values())
    lines = [
        f"model: {cfg.model_type}, {total_params / 1e9:.2f} B params, param_dtype={cfg.param_dtype}, "
        f"dtype={cfg.dtype}, attention={cfg.attention}; mesh {dict(mesh_shape)} ({devices} devices)",
    ]
    if settings is not None:
        st = settings
        micro = (f"packed micro-batches of {st.micro_tokens} tokens per device" if st.micro_tokens
                 else f"micro-batches of {st.micro_rows} rows × {st.context} tokens")
        lines.append(f"step: {st.rollout_rows} rollouts, {st.concurrent_rows} decoding at once, context "
                     f"{st.context}; scoring {st.scoring_rows} rows × {st.scoring_len}; {micro}; "
                     f"KL {'on' if st.with_reference else 'off'}; rollout dtype {st.rollout_dtype or cfg.dtype}")
    lines += [
        "per device:",
        f"  params            {_gb(p.params)}",
        f"  optimiser state   {_gb(p.opt_state)}  (AdamW: 2 moments in float32 + counts)",
        f"  reference policy  {_gb(p.reference)}" + (f"  (stored in {cfg.dtype})" if p.reference else ""),
    ]
    if p.rollout_copy:
        lines.append(f"  sampling copy     {_gb(p.rollout_copy)}  (rollout.dtype)")
    lines.append(f"  KV cache          {_gb(p.kv_cache)}  (rollout phase)")
    if p.decode:
        lines.append(f"  decode temps      {_gb(p.decode)}  (rollout phase, estimate)")
    if p.gathered_rollout:
        lines.append(f"  gathered weights  {_gb(p.gathered_rollout)}  (rollout phase: the layers' and the vocab projection's "
                     f"fsdp all-gathers, hoisted out of the decode loop)")
    if p.scoring:
        lines.append(f"  scoring forward   {_gb(p.scoring)}  (scoring phase, estimate{_phases(p.scoring_phases)})")
    if p.update_batch:
        lines.append(f"  update rows       {_gb(p.update_batch)}  (update phase: the step's padded rows)")
    lines += [
        f"  gradients         {_gb(p.grads)}  (update phase: float32 accumulator"
        + (")" if p.update_phases else " + micro-batch)"),
        f"  activations       {_gb(p.activations)}  (update phase, estimate, remat per layer{_phases(p.update_phases)})",
        f"  peak              {_gb(p.peak)}  = resident + max(rollout, scoring, update)",
    ]
    peaks = [("estimate", p.peak)]
    if compiled is not None:
        how = f"compiled whole ({compiled.layers_compiled[0]} layers)"
        est = dict(decode=(p.rollout_copy or p.params) + p.rollout_phase, scoring=p.params + p.scoring,
                   update=p.params + p.grads + p.activations + _micro_input_bytes(p, settings, mesh_shape))
        lines.append(f"XLA memory_analysis per device ({how}; {compiled.seconds:.0f} s):")
        for name in ("decode", "scoring", "update"):
            got = getattr(compiled, name)
            lines.append(f"  {name:8s} program  compiled {_gb(got)}  estimate {_gb(est[name])}  "
                         f"(estimate/compiled {est[name] / max(got, 1):.2f})")
        peaks.append(("compiled", compiled.peak(p)))
        lines.append(f"  peak              compiled {_gb(peaks[-1][1])}  estimate {_gb(p.peak)}  "
                     f"(estimate/compiled {p.peak / max(peaks[-1][1], 1):.2f})")
    for d in ([device] if isinstance(device, str) else device or []):
        usable = int(DEVICES[d] * (1 - headroom))
        for label, peak in peaks:
            verdict = "fits" if peak <= usable else "does NOT fit"
            lines.append(f"{d}: {DEVICES[d] / GiB:.0f} GiB, usable {usable / 1e9:.2f} GB with "
                         f"{headroom:.0%} headroom → {verdict} ({label}: peak {peak / usable:.0%} of usable)")
        if any(peak > usable for _, peak in peaks):
            lines.append("  shrink: more fsdp/tensor devices, a smaller rollout batch or context, "
                         "fewer concurrent rollout rows, a smaller micro-batch or token budget, "
                         "or --no_reference (KL loss off)")
        if d.startswith(("A100", "H100", "H200")):
            lines.append("  note: XLA preallocates 75% of GPU memory by default; set "
                         "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 to use the planned amount")
    return "\n".join(lines)


def _phases(phases: Mapping[str, int]) -> str:
    """', the largest of: layers 1.23 GB, log-prob gather 4.56 GB' (empty without phases)."""
    if not phases:
        return ""
    return ", the largest of: " + ", ".join(f"{name} {n / 1e9:.2f} GB" for name, n in phases.items())


def _micro_input_bytes(p: Plan, st: Settings | None, mesh_shape) -> int:
    """One micro-batch's UpdateBatch bytes per device (an input of the update program)."""
    if st is None:
        return 0
    if st.micro_tokens:
        return st.micro_tokens * UPDATE_BYTES_PER_TOKEN
    rows = max(1, shard_shape((st.micro_rows,), ("batch",), abstract_mesh(mesh_shape), sharding.DEFAULT_RULES)[0])
    return rows * st.context * UPDATE_BYTES_PER_TOKEN
