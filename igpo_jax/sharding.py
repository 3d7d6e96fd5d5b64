"""Logical axis names → device-mesh axes. The only module that knows mesh axis names.

Model code names the axes of every parameter (`nnx.Param(..., axes=('embed', 'mlp'))`) and of its
main activations (`constrain(x, ('batch', 'length', 'embed'))`). A rules table — part of the
experiment config — maps each logical name to a mesh axis (or several, or None = replicated).
Outside an `activate(mesh, rules)` block, `constrain` is a no-op, so the same model code runs
unsharded on a laptop.
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
    "length": None,
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


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes`; a mesh axis is used at most once (first come wins)."""
    used: set[str] = set()
    spec = []
    for name in axes:
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:  # size-1 axes add nothing; dropping them keeps specs readable
            targets = tuple(t for t in targets if mesh.shape[t] > 1)
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this block, `constrain` places activations on `mesh` according to `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Sharding constraint by logical axis names; a no-op when no mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh)))
