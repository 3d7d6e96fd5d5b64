"""An optimiser step applied one parameter leaf at a time, each leaf a call of a small program.

Why not one program for the whole tree: its size is paid at every start of a run, even when every
compiled program comes from the persistent cache. Traced whole (optax over SmolLM2's 272 leaves,
~9,700 operations) the optimiser step was the largest trace of a warm start (4.4-4.6 s); with each
leaf a nested jit in one outer program the trace fell to 0.9 s, but that program's executable, a
few kernels per leaf, still took the longest of all to load from the cache (7.9 of the 10.7 s of
cache reads of bench.step's warm start, beside a learning run). Here each leaf's step is its own
jitted call, dispatched from Python: the 272 leaves take a handful of distinct shapes (7 in the
demo's layout), so a start traces, compiles or loads that many small programs (and as many for the
squared sums of the global norm), and a step
pays ~270 dispatches (milliseconds against a step of seconds). The parameter leaf and its
optimiser state are donated, so a step holds one leaf's old and new copies at a time, not two
trees. The arithmetic per leaf is the whole-tree update's, so the results are the same bit for
bit (tests/update_test.py).

`update_traced` is the same arithmetic for tracing inside one outer program (update.py's
whole-tree program): that one runs the step in half the time (no ~550 dispatches; SmolLM2 0.17
against 0.33 s, bench/results/train_step.md) but is slower to build and load, so a run starts
leaf by leaf and moves to it once `Prebuilt` has built it on a background thread.

The optimiser state is split the same way: each part shaped like the parameters (Adam's moments)
is cut into its leaves; the rest (step counters) is handed to every leaf whole, and since every
leaf advances it alike, the first leaf's copy is kept.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import operator
import threading
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp


@jax.jit
def _squared_sum(x):
    return jnp.sum(jnp.square(x))  # optax.tree.norm's per-leaf term


@jax.jit
def _norm_of(squared_sums):
    return jnp.sqrt(functools.reduce(operator.add, squared_sums, 0))  # optax.tree.norm's order


def global_norm(tree) -> jax.Array:
    """optax.tree.norm(tree), leaf by leaf: one small program per leaf shape and one for the sum."""
    return _norm_of([_squared_sum(x) for x in jax.tree.leaves(tree)])


def _split(parts, own_mask):
    """(the parts shaped like the parameters, the others), in order."""
    return [p for p, mine in zip(parts, own_mask) if mine], [p for p, mine in zip(parts, own_mask) if not mine]


def _join(own, shared, own_mask):
    """`_split`'s inverse: the parts in their original order."""
    own, shared = iter(own), iter(shared)
    return [next(own) if mine else next(shared) for mine in own_mask]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5, 7))
def _leaf_call(leaf_step, parts_def, own_mask, static, grad, own, shared, param, *extra):
    leaf_state = parts_def.unflatten(_join(own, shared, own_mask))
    param, leaf_state = leaf_step(grad, leaf_state, param, *extra, static)
    return (param, *_split(parts_def.flatten_up_to(leaf_state), own_mask))


def update(leaf_step: Callable, grads, state, params, *extra, static: Hashable = None) -> tuple[Any, Any]:
    """(new params, new state): `leaf_step(grad, leaf_state, param, *extra, static)` → (new param,
    new leaf state) for every parameter leaf, where a leaf state is `state` with each params-shaped
    part replaced by that part's leaf. `leaf_step` is traced (once per leaf shape), `static` is
    hashable and fixed; `params` and the params-shaped parts of `state` are donated."""
    return _leaf_by_leaf(_leaf_call, leaf_step, grads, state, params, *extra, static=static)


def _leaf_by_leaf(call: Callable, leaf_step: Callable, grads, state, params, *extra, static: Hashable = None):
    """`update`'s walk over the leaves, each leaf's step run by `call` (`_leaf_call` or `_leaf_traced`)."""
    param_leaves, params_def = jax.tree.flatten(params)
    grad_leaves = params_def.flatten_up_to(grads)
    shaped_like_params = lambda x: params_def.num_leaves > 1 and jax.tree.structure(x) == params_def
    parts, parts_def = jax.tree.flatten(state, is_leaf=shaped_like_params)
    own_mask = tuple(shaped_like_params(p) for p in parts)
    own, shared = _split(parts, own_mask)
    split = [params_def.flatten_up_to(p) for p in own]
    new_params, new_own, new_shared = [], [], None
    for i, (grad, param) in enumerate(zip(grad_leaves, param_leaves)):
        param, leaf_own, leaf_shared = call(leaf_step, parts_def, own_mask, static, grad, [s[i] for s in split],
                                            shared, param, *extra)
        new_params.append(param)
        new_own.append(leaf_own)
        new_shared = leaf_shared if new_shared is None else new_shared
    own_parts = [params_def.unflatten([leaf[j] for leaf in new_own]) for j in range(len(split))]
    return params_def.unflatten(new_params), parts_def.unflatten(_join(own_parts, new_shared or [], own_mask))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _leaf_traced(leaf_step, parts_def, own_mask, static, grad, own, shared, param, *extra):
    """`_leaf_call` without donation, for use inside an outer jit (one trace per leaf shape)."""
    leaf_state = parts_def.unflatten(_join(own, shared, own_mask))
    param, leaf_state = leaf_step(grad, leaf_state, param, *extra, static)
    return (param, *_split(parts_def.flatten_up_to(leaf_state), own_mask))


def update_traced(leaf_step: Callable, grads, state, params, *extra, static: Hashable = None) -> tuple[Any, Any]:
    """`update`'s arithmetic, to be traced inside one outer jitted program (donation is the outer
    program's): every leaf's step a nested call of one jitted function per leaf shape."""
    return _leaf_by_leaf(_leaf_traced, leaf_step, grads, state, params, *extra, static=static)


class Prebuilt:
    """A jitted function's executable for each signature of its arguments, built (traced, lowered,
    compiled or loaded from the persistent cache) on a background thread once a signature has
    been seen `build_on_sighting` times; `get` returns it when it is ready, else None (the caller
    then takes another path that computes the same result). So a program that is slow to build
    costs a start-up nothing on the main thread, and a signature seen once (a one-step run, a
    test) never builds it. In a multi-process run the switch waits for the build, at the same
    call in every process. A failed build is logged once and that signature stays on the other
    path. Holds the newest `keep` signatures' executables (tests build many)."""

    def __init__(self, jitted, static_argnums: tuple[int, ...] = (), build_on_sighting: int = 2, keep: int = 4):
        self._jitted, self._static = jitted, frozenset(static_argnums)
        self._build_on, self._keep = build_on_sighting, keep
        self._entries: collections.OrderedDict = collections.OrderedDict()  # key → [sightings, future]
        self._lock = threading.Lock()
        self._executor = None
        self.used = 0  # calls `get` answered with an executable (for benchmarks)

    def _key(self, args):
        dynamic = [a for i, a in enumerate(args) if i not in self._static]
        leaves, treedef = jax.tree.flatten(dynamic)
        if not all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) for x in leaves):
            return None, None
        avals = tuple((x.shape, x.dtype, x.weak_type, x.sharding) for x in leaves)
        static = tuple(args[i] for i in sorted(self._static))
        return (treedef, avals, static), (leaves, treedef)

    def _abstract(self, args, leaves, treedef):
        """`args` with every array replaced by its shape, dtype and sharding (no buffer is held)."""
        abstract = iter(treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                                                weak_type=x.weak_type) for x in leaves]))
        return [a if i in self._static else next(abstract) for i, a in enumerate(args)]

    def _build(self, spec):
        return self._jitted.lower(*spec).compile()

    def get(self, *args):
        """The executable for `args` (call it with the arguments that are not static), or None."""
        key, flat = self._key(args)
        if key is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [0, None]
                while len(self._entries) > self._keep:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(key)
            entry[0] += 1
            if entry[1] is None:
                if entry[0] < self._build_on:
                    return None
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prebuilt")
                entry[1] = self._executor.submit(self._build, self._abstract(args, *flat))
                entry[1].add_done_callback(_log_failure)
            future, sightings = entry[1], entry[0]
        if sightings > self._build_on and jax.process_count() > 1:
            # every process of a multi-process run must run the same programs in the same order
            # (their collectives pair up): there the call after the one that started the build
            # waits for it, so all of them switch at the same call
            concurrent.futures.wait([future])
        if not future.done() or future.exception() is not None:
            return None
        self.used += 1
        return future.result()

    def wait(self) -> None:
        """Until every build started so far has finished (tests, benchmarks)."""
        with self._lock:
            futures = [e[1] for e in self._entries.values() if e[1] is not None]
        concurrent.futures.wait(futures)


def _log_failure(future) -> None:
    if future.exception() is not None:
        logging.getLogger(__name__).warning("a background build failed; its calls stay on the other path: %r",
                                            future.exception())
