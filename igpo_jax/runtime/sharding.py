"""Logical axis names → device-mesh axes. The only module that knows mesh axis names.

Model code names the axes of every parameter (`nnx.Param(..., axes=('embed', 'mlp'))`) and of its
main activations (`constrain(x, ('batch', 'length', 'embed'))`). A rules table — part of the
experiment config — maps each logical name to a mesh axis (or several, or None = replicated).
Outside an `activate(mesh, rules)` block, `constrain` is a no-op, so the same model code runs
unsharded on a laptop.

Sequence parallelism: with a `sequence` mesh axis (rule 'length' → 'sequence'), activations are
split along the length of a row; everything but attention is per token, and attention runs under
`shard_map` on the local queries against keys and values all-gathered along the axis
(`sequence_parallel_attention`), so a 32k-token row's activations are spread over the devices.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = tuple[str | None, ...]
Rules = Mapping[str, str | tuple[str, ...] | None]

# Sensible default for data + fully-sharded data + tensor parallelism.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    # sequence parallelism: a row's tokens split over the `sequence` axis (absent or size 1: none);
    # attention all-gathers keys and values along it (`sequence_parallel_attention`)
    "length": "sequence",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "cache_length": None,
}

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("igpo_sharding", default=None)


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes`; a mesh axis is used at most once (first come wins).

    With `mesh` and `shape`, a mesh axis that does not divide its dimension is left out (that
    dimension is then replicated over it): e.g. SmolLM2's 3 kv heads on a tensor axis of 2.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:  # absent and size-1 axes add nothing; dropping them keeps specs readable
            targets = tuple(t for t in targets if mesh.shape.get(t, 1) > 1)
        targets = tuple(t for t in targets if t not in used)
        if mesh is not None and shape is not None:
            kept, size = [], 1
            for t in targets:
                if shape[i] % (size * mesh.shape[t]) == 0:
                    kept.append(t)
                    size *= mesh.shape[t]
            targets = tuple(kept)
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
    """Mesh with named axes from {'data': -1, 'fsdp': 4, 'tensor': 2}; one -1 takes the rest.

    Device order comes from `jax.make_mesh`, which lays axes out along the physical topology.
    """
    devices = list(devices if devices is not None else jax.devices())
    names = tuple(shape)
    sizes = [int(v) for v in shape.values()]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {dict(shape)}: at most one axis may be -1")
    known = 1
    for v in sizes:
        if v != -1:
            if v < 1:
                raise ValueError(f"mesh shape {dict(shape)}: axis sizes must be ≥ 1 or -1")
            known *= v
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh shape {dict(shape)} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    total = 1
    for v in sizes:
        total *= v
    if total != len(devices):
        raise ValueError(f"mesh shape {dict(zip(names, sizes))} needs {total} devices, {len(devices)} available")
    # Auto axes: XLA's sharding propagation fills in everything the rules do not pin down.
    return jax.make_mesh(tuple(sizes), names, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def named_sharding(mesh: Mesh, rules: Rules, axes: LogicalAxes, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def shard_module(module, mesh: Mesh, rules: Rules):
    """Place every variable of an NNX module (that names its axes) on `mesh`, in place."""
    from flax import nnx

    state = nnx.state(module)

    def place(var):
        axes = var.get_metadata().get("axes")
        if axes is None:
            return var
        return var.replace(value=jax.device_put(var[...], named_sharding(mesh, rules, axes, var.shape)))

    nnx.update(module, jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return module


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this block, `constrain` places activations on `mesh` according to `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Sharding constraint by logical axis names; a no-op when no mesh is active. A mesh axis that
    does not divide its dimension is left out (as for params): an uneven constraint (e.g. 3 prompt
    groups over fsdp=4) gave NaN gradients on XLA's CPU backend."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)))


def sequence_parallel_attention(attend, q_BTKGH, k_BSKH, v_BSKH, mask, split_attend=None):
    """`attend(q, k, v, mask)` with the queries split along the mesh axis (or axes) that 'length'
    maps to and keys, values and the mask's key side all-gathered along it; `attend` itself when
    no mesh is active or the length is not split. `mask` is a bool [B, T, S] or a MaskSpec (its
    query vectors split like the queries, its key vectors gathered like the keys). Keys are all
    the row's tokens (no cache), so T = S. A shard runs `split_attend` (default `attend`): its
    queries do not start at key 0, which a kernel with a top-left causal flag cannot express."""
    from igpo_jax.model.attention_mask import MaskSpec

    active = _ACTIVE.get()
    if active is None:
        return attend(q_BTKGH, k_BSKH, v_BSKH, mask)
    mesh, rules = active
    q_spec = logical_to_spec(("batch", "length", "kv_heads", None, "head_dim"), rules, mesh, q_BTKGH.shape)
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules, mesh, k_BSKH.shape)
    seq = q_spec[1]
    if seq is None or kv_spec[1] != seq or q_spec[0] != kv_spec[0] or q_spec[2] != kv_spec[2]:
        return attend(q_BTKGH, k_BSKH, v_BSKH, mask)
    row_spec = PartitionSpec(q_spec[0], seq)
    if isinstance(mask, MaskSpec):
        mask_spec = MaskSpec(row_spec, row_spec, row_spec, row_spec, row_spec, mask.form)
    else:
        mask_spec = PartitionSpec(q_spec[0], seq, None)

    def local(q, k, v, mask):
        gather = lambda x: jax.lax.all_gather(x, seq, axis=1, tiled=True)
        if isinstance(mask, MaskSpec):  # the keys' side is the whole row; the queries are a shard of it
            mask = MaskSpec(mask.q_slot_BT, mask.q_seg_BT, mask.q_limit_BT, gather(mask.key_seg_BS),
                            gather(mask.key_valid_BS), "general")
        return (split_attend or attend)(q, gather(k), gather(v), mask)

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_spec), out_specs=q_spec,
                         check_vma=False)(q_BTKGH, k_BSKH, v_BSKH, mask)
