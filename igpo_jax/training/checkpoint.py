"""Run checkpoints with orbax: params, optimiser state, step, data position, PRNG state, metadata.

One checkpoint is one step directory written by `ocp.CheckpointManager`:

    <directory>/<step>/params       the model's nnx.Param state as a pure nested dict of arrays
                       opt_state    the optax state (its nnx.State nodes stored as pure dicts)
                       data_state   BatchIterator.state()                        (JSON)
                       rng_state    the caller's PRNG/seed state, e.g. prng_key_to_json (JSON)
                       metadata     {"step": …, "saved_unix_time": …, **caller's metadata} (JSON)

Params are stored as plain dicts (`nnx.to_pure_dict`), not as NNX Variables, so a checkpoint
does not depend on Variable metadata and restores into any model with the same parameter paths:
a freshly built one, or an abstract one from `nnx.eval_shape`.

Atomicity is orbax's: a step is written under `<step>.orbax-checkpoint-tmp-*` and renamed when
complete, and only finished step directories count as checkpoints. A run killed mid-save leaves
the previous step as the newest checkpoint; the unfinished directory is deleted when the next
`RunCheckpointer` opens the directory. Saving is asynchronous: `save` returns once the arrays
have been copied off the device (so the caller may donate or overwrite them), the write goes on
in the background, and `close()` (or `wait_until_finished()`) must run before the process exits.

Restore reads arrays straight onto the shardings of the target (the live model's and optimiser's
arrays, or the `sharding` of abstract leaves), so a multi-device run restores sharded and a
one-device run restores plainly. Abstract leaves without a sharding land on the first local device.

Secrets: exactly what the caller passes is written. API keys belong in the environment or the
config and must never be passed here; as a guard, JSON items whose keys look like credentials
(api_key, secret, password, token…) are refused.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

PARAMS, OPT_STATE, DATA_STATE, RNG_STATE, METADATA = "params", "opt_state", "data_state", "rng_state", "metadata"
CHECKPOINTS_SUBDIR = "checkpoints"  # where train.py puts them inside a run directory

_SECRET_KEY = re.compile(r"api[_-]?key|secret|passw(or)?d|credential|(auth|access|bearer)[_-]?token", re.I)


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint directory or step that does not exist; the message lists what does."""


class HasOptState(Protocol):  # update.Updater
    opt_state: Any


class HasIteratorState(Protocol):  # examples.BatchIterator
    def state(self) -> dict[str, int]: ...

    def restore(self, state: dict[str, int]) -> None: ...


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `RunCheckpointer.restore` read besides the arrays it put into the model/updater."""

    step: int
    rng_state: dict | None
    metadata: dict


def resolve_directory(path: str | os.PathLike) -> str:
    """The checkpoint directory for `path`: `path` itself, or `path/checkpoints` when `path` is a
    run directory holding one (so users may pass either)."""
    path = os.fspath(path)
    nested = os.path.join(path, CHECKPOINTS_SUBDIR)
    return nested if os.path.isdir(nested) else path


def available_steps(directory: str | os.PathLike) -> list[int]:
    """Finished checkpoint steps, ascending. Raises CheckpointNotFoundError for a missing directory."""
    directory = _existing_directory(directory)
    with _reader(directory) as manager:
        return sorted(manager.all_steps())


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest finished step in `directory` (a checkpoint or run directory), None if it has none."""
    steps = available_steps(directory)
    return steps[-1] if steps else None


def restore_params(directory: str | os.PathLike, model: nnx.Module, step: int | None = None) -> int:
    """Loads the params of `step` (default: the newest) into `model` in place; returns the step.

    For evaluation and export: the optimiser and data state are not read."""
    directory = _existing_directory(directory)
    with _reader(directory) as manager:
        step = _pick_step(manager, directory, step)
        restored = manager.restore(step, args=ocp.args.Composite(
            **{PARAMS: ocp.args.StandardRestore(abstract_like(_pure_params(model)))}))
        _load_params(model, restored[PARAMS])
    return step


class RunCheckpointer:
    """Keeps the newest `max_to_keep` checkpoints of a training run in `directory`.

    `save(step, model, updater, batches, rng_state, metadata)` after a step;
    `restore_latest(model, updater, batches)` at start-up returns the step to continue from.
    Use as a context manager, or call `close()`, so that the last asynchronous save finishes.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, model: nnx.Module, updater: HasOptState | None = None,
             batches: HasIteratorState | None = None, rng_state: dict | None = None,
             metadata: dict | None = None) -> bool:
        """Starts saving `step`; False (and a warning) if that step is already saved."""
        if step in self._manager.all_steps():
            logging.warning("checkpoint step %d already exists in %s; not overwritten", step, self.directory)
            return False
        items = {PARAMS: ocp.args.StandardSave(_pure_params(model)),
                 METADATA: ocp.args.JsonSave(_json_item(
                     METADATA, {"step": int(step), "saved_unix_time": time.time(), **(metadata or {})}))}
        if updater is not None:
            items[OPT_STATE] = ocp.args.StandardSave(_pure_states(updater.opt_state))
        if batches is not None:
            items[DATA_STATE] = ocp.args.JsonSave(_json_item(DATA_STATE, batches.state()))
        if rng_state is not None:
            items[RNG_STATE] = ocp.args.JsonSave(_json_item(RNG_STATE, rng_state))
        return bool(self._manager.save(step, args=ocp.args.Composite(**items)))

    def restore(self, model: nnx.Module, updater: HasOptState | None = None,
                batches: HasIteratorState | None = None, step: int | None = None) -> Restored:
        """Loads `step` (default: the newest) into `model`, `updater.opt_state` and `batches`."""
        self._manager.wait_until_finished()  # a save still in flight is not a checkpoint yet
        step = _pick_step(self._manager, self.directory, step)
        saved = _saved_items(self.directory, step)
        wanted = {PARAMS: ocp.args.StandardRestore(abstract_like(_pure_params(model))),
                  METADATA: ocp.args.JsonRestore()}
        if updater is not None:
            _require_item(saved, OPT_STATE, step, self.directory, "optimiser state")
            wanted[OPT_STATE] = ocp.args.StandardRestore(abstract_like(_pure_states(updater.opt_state)))
        if batches is not None:
            _require_item(saved, DATA_STATE, step, self.directory, "data-iterator state")
            wanted[DATA_STATE] = ocp.args.JsonRestore()
        if RNG_STATE in saved:
            wanted[RNG_STATE] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**wanted))
        _load_params(model, restored[PARAMS])
        if updater is not None:
            updater.opt_state = _states_like(updater.opt_state, restored[OPT_STATE])
        if batches is not None:
            batches.restore(restored[DATA_STATE])
        return Restored(step=step, rng_state=restored[RNG_STATE] if RNG_STATE in wanted else None,
                        metadata=restored[METADATA])

    def restore_latest(self, model: nnx.Module, updater: HasOptState | None = None,
                       batches: HasIteratorState | None = None) -> int:
        """Resumes from the newest checkpoint if there is one; returns the step to continue from
        (0 for a fresh run, whose model, updater and batches are left untouched)."""
        if self.latest_step() is None:
            return 0
        return self.restore(model, updater, batches).step

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save, then releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prng_key_to_json(key: jax.Array) -> dict:
    """A typed PRNG key (`jax.random.key`) as JSON for `rng_state`; `prng_key_from_json` inverts it."""
    return {"impl": str(jax.random.key_impl(key)), "data": np.asarray(jax.random.key_data(key)).tolist()}


def prng_key_from_json(saved: dict) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(saved["data"], dtype=np.uint32), impl=saved["impl"])


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: the restore target for orbax."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(x):
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(abstract, tree)


# ---------------------------------------------------------------------------------------------


def _pure_params(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _load_params(model: nnx.Module, pure: dict) -> None:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def _is_state(x) -> bool:
    return isinstance(x, nnx.State)


def _pure_states(tree: Any) -> Any:
    """`tree` with every nnx.State node (Adam's mu and nu) replaced by its pure dict."""
    return jax.tree.map(lambda x: nnx.to_pure_dict(x) if _is_state(x) else x, tree, is_leaf=_is_state)


def _states_like(template: Any, pure: Any) -> Any:
    """Inverse of `_pure_states`: `pure`'s arrays in `template`'s structure (States rebuilt)."""
    def rebuild(node, value):
        if not _is_state(node):
            return value
        state = jax.tree.map(lambda x: x, node)  # a copy; the template stays as it was
        nnx.replace_by_pure_dict(state, value)
        return state

    return jax.tree.map(rebuild, template, pure, is_leaf=_is_state)


def _json_item(name: str, value: Any) -> Any:
    def check(node, path):
        if isinstance(node, dict):
            for key, child in node.items():
                if _SECRET_KEY.search(str(key)):
                    raise ValueError(f"checkpoint {name}: key '{path}{key}' looks like a credential; checkpoints "
                                     f"never hold secrets (keep API keys in the environment or config)")
                check(child, f"{path}{key}.")
        elif isinstance(node, (list, tuple)):
            for i, child in enumerate(node):
                check(child, f"{path}{i}.")

    check(value, "")
    return value


def _existing_directory(path: str | os.PathLike) -> str:
    directory = resolve_directory(path)
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"checkpoint directory not found: {os.fspath(path)}")
    return os.path.abspath(directory)


def _reader(directory: str) -> ocp.CheckpointManager:
    # read_only: looking must not create directories or delete a concurrent run's unfinished save
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        create=False, read_only=True, save_interval_steps=0, cleanup_tmp_directories=False))


def _pick_step(manager: ocp.CheckpointManager, directory: str, step: int | None) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointNotFoundError(f"no finished checkpoint in {directory}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointNotFoundError(f"checkpoint step {step} not found in {directory}; "
                                      f"available steps: {', '.join(map(str, steps))}")
    return step


def _saved_items(directory: str, step: int) -> set[str]:
    # The items are the step directory's subdirectories (orbax's default step naming); listing
    # them avoids item_metadata, which warns about every item it has no handler for.
    step_dir = os.path.join(directory, str(step))
    return {name for name in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, name))}


def _require_item(saved: set[str], item: str, step: int, directory: str, what: str) -> None:
    if item not in saved:
        raise CheckpointNotFoundError(f"checkpoint step {step} in {directory} has no {what} ('{item}'); "
                                      f"it has: {', '.join(sorted(saved))}")
