"""The update's programs for the other group sizes, built ahead on a background thread.

With identical rows computed once and a shared-prefix layout, a mini-batch computes G_u rows of
each group (row_selection.py: a power of two ≤ G), and each G_u is a program of its own, for the
gradient and for π_ref's forward. A step meets a new G_u when its groups repeat more or less than
before, and then compiled it on the spot: on world_igpo's 2-core run the update spent 51 s
compiling in steps 1–6 (bench/results/dedup.md). Here, once a step has its shapes (tokens per row,
prefix and suffix lengths), the programs for the other G_u at those shapes are lowered and compiled
on one background thread while the run goes on; a step that needs one waits for its build (never
longer than compiling it itself) and jit's own cache then hands it over, so the call is the same
call, with the same program, as without this.

Single-device runs only: the build's inputs are shapes without a sharding, which is what makes
jit's cache key match a call with arrays on the one device (a sharding in the shapes did not).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading

import jax
from absl import logging

ENABLED = True  # False: every program is compiled when a step first needs it


def shapes_of(tree, rows: int | None = None):
    """`tree` with every array replaced by its shape and dtype (no sharding, see the module
    docstring); with `rows`, leading dimensions resized to `rows` (a selection of another G_u)."""
    def spec(x):
        if not isinstance(x, jax.Array) and not hasattr(x, "shape"):
            return x
        shape = x.shape if rows is None or not x.shape else (rows, *x.shape[1:])
        return jax.ShapeDtypeStruct(shape, x.dtype)
    return jax.tree.map(spec, tree)


def signature(name: str, static, tree) -> tuple:
    """A build's key: its program's name, static arguments, and its arrays' shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    return (name, static, treedef, tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") else x
                                         for x in leaves))


class Builds:
    """Background builds by key: `submit` once per key, `wait` before the call that needs it."""

    def __init__(self):
        self._futures: dict = {}
        self._lock = threading.Lock()
        self._executor = None

    @staticmethod
    def available() -> bool:
        return ENABLED and jax.device_count() == 1

    def submit(self, key, jitted, *args) -> None:
        """Lowers and compiles `jitted(*args)` (arrays given as `shapes_of`) in the background."""
        with self._lock:
            if key in self._futures:
                return
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ahead")
            # in the caller's context: sharding.activate's mesh (a context variable) shapes the trace
            build = lambda: jitted.lower(*args).compile()
            self._futures[key] = self._executor.submit(contextvars.copy_context().run, build)

    def wait(self, key) -> None:
        """Returns once a submitted build of `key` is done (at once when none was submitted: the
        call about to run builds it, so it is never submitted later); a failed build is logged and
        the call compiles its program itself."""
        with self._lock:
            future = self._futures.setdefault(key, _DONE)
        if future is not None and future.exception() is not None:
            logging.warning("building %s ahead failed (compiled when needed instead): %r", key[0], future.exception())
            with self._lock:
                self._futures[key] = _DONE

    def submitted(self) -> int:
        """Builds submitted, and calls that built their own program (for tests)."""
        return len(self._futures)


_DONE = concurrent.futures.Future()
_DONE.set_result(None)


def group_sizes(g: int) -> list[int]:
    """The G_u a selection of groups of `g` rows can have: the powers of two ≤ g, and g."""
    sizes = {g}
    k = 1
    while k < g:
        sizes.add(k)
        k *= 2
    return sorted(sizes)
