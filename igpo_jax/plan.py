"""Memory plan per device, from shapes alone (no weights, no devices, no allocation).

    python -m igpo_jax.plan --preset=Qwen2.5-7B-Instruct --mesh=fsdp=8,tensor=1 --param_dtype=bfloat16 \
        --rollout_batch=512 --context=32768 --device=H100-80G
    python -m igpo_jax.plan --model_path=/ckpt/Qwen2.5-7B-Instruct --mesh=fsdp=4,tensor=2

Each array's bytes on one device follow from its shape, its logical axes (the `axes` metadata of
the model's params; the KV cache's axes as in `KVCache.init`), the sharding rules and the mesh
axis sizes: `sharding.logical_to_spec` picks the mesh axes of each dimension and the dimension is
divided by their product. The mesh is an `AbstractMesh`, so any mesh size plans on a laptop.

What is resident, and when (per device):
  always   params + optimiser state (as `update.make_optimizer` builds it: AdamW moments in the
           params' dtype, step counts) + the frozen reference policy (a second copy of params)
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
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from igpo_jax import sharding
from igpo_jax.model import config as model_config
from igpo_jax.model.kv_cache import KV_AXES
from igpo_jax.model.qwen import Decoder

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
    return nnx.state(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))), nnx.Param)


def abstract_opt_state(params):
    """The optimiser state `update.Updater` creates, as shapes. optax's zeros_like moments carry
    the params' axes, so they shard like the params; step counts are replicated scalars."""
    from igpo_jax.update import UpdateConfig, make_optimizer

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
    activations: int

    @property
    def always(self) -> int:
        return self.params + self.opt_state + self.reference

    @property
    def peak(self) -> int:
        return self.always + max(self.kv_cache, self.grads + self.activations)


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


def fits(p: Plan, device: str, headroom: float = 0.1) -> tuple[bool, int]:
    """(fits, usable bytes): the peak must stay under capacity × (1 - headroom)."""
    usable = int(DEVICES[device] * (1 - headroom))
    return p.peak <= usable, usable


def _gb(n: int) -> str:
    return f"{n / 1e9:9.2f} GB"


def report(p: Plan, cfg: model_config.ModelConfig, mesh_shape: Mapping[str, int], total_params: int,
           device: str | None, headroom: float) -> str:
    devices = math.prod(mesh_shape.values())
    lines = [
        f"model: {cfg.model_type}, {total_params / 1e9:.2f} B params, param_dtype={cfg.param_dtype}, "
        f"dtype={cfg.dtype}; mesh {dict(mesh_shape)} ({devices} devices)",
        "per device:",
        f"  params            {_gb(p.params)}",
        f"  optimiser state   {_gb(p.opt_state)}  (AdamW: 2 moments in {cfg.param_dtype} + counts)",
        f"  reference policy  {_gb(p.reference)}",
        f"  KV cache          {_gb(p.kv_cache)}  (rollout phase)",
        f"  gradients         {_gb(p.grads)}  (update phase: accumulator + micro-batch)",
        f"  activations       {_gb(p.activations)}  (update phase, estimate, remat per layer)",
        f"  peak              {_gb(p.peak)}  = params + optimiser + reference + max(rollout, update)",
    ]
    if device:
        ok, usable = fits(p, device, headroom)
        verdict = "fits" if ok else "does NOT fit"
        lines.append(f"{device}: {DEVICES[device] / GiB:.0f} GiB, usable {usable / 1e9:.2f} GB with "
                     f"{headroom:.0%} headroom → {verdict} (peak {p.peak / usable:.0%} of usable)")
        if not ok:
            lines.append("  shrink: more fsdp/tensor devices, a smaller rollout batch or context, "
                         "a smaller micro-batch, or --no_reference (KL loss off)")
        if device.startswith(("A100", "H100", "H200")):
            lines.append("  note: XLA preallocates 75% of GPU memory by default; set "
                         "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 to use the planned amount")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Per-device memory plan from shapes alone.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(model_config.PRESETS))
    src.add_argument("--model_path", help="HF model directory (reads its config.json only)")
    parser.add_argument("--mesh", required=True, help="e.g. fsdp=8,tensor=1 or data=2,fsdp=4,tensor=2")
    parser.add_argument("--param_dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--dtype", default=None, help="compute (and KV cache) dtype; default param_dtype")
    parser.add_argument("--rollout_batch", type=int, default=512, help="rows decoded at once")
    parser.add_argument("--context", type=int, default=32768, help="KV-cache slots per row")
    parser.add_argument("--micro_batch", type=int, default=0, help="update rows per micro-batch "
                        "(default: one per data×fsdp shard)")
    parser.add_argument("--update_len", type=int, default=0, help="update sequence length (default: context)")
    parser.add_argument("--no_reference", action="store_true", help="no reference policy (KL loss off)")
    parser.add_argument("--device", choices=sorted(DEVICES))
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction of memory kept free")
    args = parser.parse_args(argv)
    overrides = dict(param_dtype=args.param_dtype, dtype=args.dtype or args.param_dtype, remat=True)
    cfg = (model_config.preset(args.preset, **overrides) if args.preset
           else model_config.from_hf_dir(args.model_path, **overrides))
    mesh_shape = parse_mesh(args.mesh)
    p = plan(cfg, mesh_shape, rollout_batch=args.rollout_batch, context=args.context,
             micro_batch=args.micro_batch, update_len=args.update_len, with_reference=not args.no_reference)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))
    text = report(p, cfg, mesh_shape, total, args.device, args.headroom)
    print(text)
    return text


if __name__ == "__main__":
    main()
