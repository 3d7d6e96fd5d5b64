"""An optimiser step applied one parameter leaf at a time, through a jitted function per leaf.

Inside the update's program each leaf's step is a call of one jitted `leaf_step`, whose trace JAX
caches per argument shapes: SmolLM2's 272 parameter leaves take 11 distinct shapes, so AdamW with
clipping is traced 11 times instead of once per leaf. Tracing is paid at every start of a run,
even when every compiled program comes from the persistent cache: traced whole (optax over the
tree, ~9,700 operations, each jnp ufunc a nested jit of its own), the optimiser step was the
largest single trace of a warm start (4.4-4.6 s on this machine, beside a learning run; 0.9 s
now). The arithmetic per leaf is the whole-tree update's, so the results are the same bit for bit
(tests/update_test.py).

The optimiser state is split the same way: each part shaped like the parameters (Adam's moments)
is cut into its leaves; the rest (step counters) is handed to every leaf whole, and since every
leaf advances it alike, the first leaf's copy is kept.
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def update(leaf_step: Callable, grads, state, params, *extra) -> tuple[Any, Any]:
    """(new params, new state): `leaf_step(grad, leaf_state, param, *extra)` → (new param, new
    leaf state) for every parameter leaf, where a leaf state is `state` with each params-shaped
    part replaced by that part's leaf."""
    param_leaves, params_def = jax.tree.flatten(params)
    grad_leaves = params_def.flatten_up_to(grads)
    shaped_like_params = lambda x: params_def.num_leaves > 1 and jax.tree.structure(x) == params_def
    parts, parts_def = jax.tree.flatten(state, is_leaf=shaped_like_params)
    split = [params_def.flatten_up_to(p) if shaped_like_params(p) else None for p in parts]
    new_params, new_states = [], []
    for i, (grad, param) in enumerate(zip(grad_leaves, param_leaves)):
        leaf_state = parts_def.unflatten([p if s is None else s[i] for p, s in zip(parts, split)])
        param, leaf_state = leaf_step(grad, leaf_state, param, *extra)
        new_params.append(param)
        new_states.append(parts_def.flatten_up_to(leaf_state))
    new_parts = [new_states[0][j] if s is None else params_def.unflatten([leaf[j] for leaf in new_states])
                 for j, s in enumerate(split)]
    return params_def.unflatten(new_params), parts_def.unflatten(new_parts)
