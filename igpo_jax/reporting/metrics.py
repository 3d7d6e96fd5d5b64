"""Per-step training metrics to the console, `metrics.jsonl`, TensorBoard and (optionally) W&B.

Fetched a step late: `MetricsWriter.write(step, metrics)` takes device arrays as they come out
of a jitted step and only keeps them; they are converted to floats (and written to the files) when
the NEXT step is written, or at `flush()` / `close()`. Converting right away would block the
host until the device finished step s, leaving the device idle while the host prepares step
s + 1; a step later the values are long computed and the copy costs nothing. `write` returns the
record of step s - 1.

The console line of step s is printed by `write(s, …)` itself, so a person at the terminal sees
each step when it ends: it shows the host-side numbers and the device values that are already
computed (`jax.Array.is_ready()`: copying those blocks nothing); a value still in flight is left
to the files.

`metrics.jsonl` holds one JSON object per step: {"step": s, "<key>": float, …}. Values are
floats only; a non-finite value (NaN, ±inf) is stored as null (JSON has no NaN) and reads back
as NaN. A run that continues from a checkpoint of step S (`first_step=S + 1`) runs the steps
after S again, so the writer first drops their records from `metrics.jsonl` (they were written
before the run stopped) and has TensorBoard purge them (`purge_step`: TensorBoard hides the
events of those steps written earlier); every step is then recorded once. `read_jsonl` still
keeps the last record of a step written twice (a file from before this rule).

W&B is imported only when asked for; it reads its API key from its own environment/login, and
nothing here ever sees or logs it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"

# What one console line shows when present (the rest goes to the files): the learning signal,
# the update's health, the agent's behaviour, validation and speed.
DEFAULT_CONSOLE_KEYS = (
    "reward/mean", "reward/f1", "ig/mean", "actor/pg_loss", "actor/kl_loss", "actor/grad_norm",
    "actor/skipped", "rollout/searches_per_episode", "response_length/mean", "diag/collapse_frac", "val/f1",
    "val/no_format_f1", "val/no_format_f1_se", "val/format_error", "time/rollout_s", "time/update_s",
)


class MetricsWriter:
    """Writes one record per training step; see the module docstring for the one-step delay."""

    def __init__(self, run_dir: str | os.PathLike, use_tensorboard: bool = True, use_wandb: bool = False,
                 console_keys: Sequence[str] = DEFAULT_CONSOLE_KEYS, print_fn: Callable[[str], Any] | None = print,
                 wandb_project: str = "igpo_jax", wandb_run_name: str | None = None,
                 wandb_config: Mapping[str, Any] | None = None, first_step: int | None = None):
        """`print_fn=None` silences the console line; `wandb_config` is what the W&B run shows as
        its config (pass only hyper-parameters, never credentials). `first_step`: the first step
        this writer will write; the records of it and later steps already in the run directory
        are dropped (metrics.jsonl) or purged (TensorBoard). None: append to what is there."""
        wandb = None
        if use_wandb:  # before any file is opened, so a missing package leaves nothing behind
            try:
                import wandb
            except ImportError as e:
                raise ImportError("use_wandb=True needs the wandb package: pip install wandb "
                                  "(or set trainer.use_wandb=False)") from e
        self.run_dir = os.fspath(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.console_keys = tuple(console_keys)
        self._print = print_fn
        self._pending: tuple[int, dict[str, Any]] | None = None
        self._closed = False
        # One writer per run: in a multi-host run the other processes only fetch (keeping pace).
        self._primary = jax.process_index() == 0
        path = os.path.join(self.run_dir, METRICS_FILE)
        if first_step is not None and self._primary:
            dropped = drop_records_from(path, first_step)
            if dropped:
                logging.info("%s: dropped %d records of steps ≥ %d, which this run writes again", path, dropped,
                             first_step)
        self._jsonl = open(path, "a", encoding="utf-8") if self._primary else None
        self._tensorboard = None
        if use_tensorboard and self._primary:
            from tensorboardX import SummaryWriter  # no TensorFlow needed

            # a new event file starting with a SessionLog.START at first_step: TensorBoard's reader
            # then discards the earlier files' events of steps ≥ first_step (tensorboard's purge of
            # orphaned data); event files are append-only, so this is how a step is written once
            self._tensorboard = SummaryWriter(logdir=os.path.join(self.run_dir, TENSORBOARD_SUBDIR),
                                              purge_step=first_step)
        self._wandb = None
        if wandb is not None and self._primary:
            self._wandb = wandb.init(project=wandb_project, name=wandb_run_name, dir=self.run_dir,
                                     config=dict(wandb_config or {}), resume="allow")

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float] | None:
        """Queues `step`'s metrics (scalars: Python numbers, numpy or device arrays of one element,
        None for missing) and writes the previously queued step; returns that step's record
        ({"step": s, key: float}), or None on the first call."""
        if self._closed:
            raise RuntimeError("MetricsWriter.write after close()")
        _check_scalars(metrics)
        written = self.flush()
        self._pending = (int(step), dict(metrics))
        if self._print is not None and self._primary:
            self._print(console_line(int(step), _available_now(metrics), self.console_keys))
        return written

    def flush(self) -> dict[str, float] | None:
        """Writes the queued step now (blocking on its device values); returns its record."""
        if self._pending is None:
            return None
        step, metrics = self._pending
        self._pending = None
        host = jax.device_get(metrics)  # one transfer for the whole dict
        record = {key: _to_float(value) for key, value in host.items()}
        self._emit(step, record)
        return {"step": step, **record}

    def close(self) -> dict[str, float] | None:
        """Writes the last queued step and closes every sink; returns that step's record.
        Closing again does nothing."""
        if self._closed:
            return None
        written = self.flush()
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        return written

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emit(self, step: int, record: dict[str, float]) -> None:
        if not self._primary:
            return
        line = {"step": step, **{k: v if math.isfinite(v) else None for k, v in record.items()}}
        self._jsonl.write(json.dumps(line, allow_nan=False) + "\n")
        self._jsonl.flush()  # a crash loses at most the step still queued
        if self._tensorboard is not None:
            for key, value in record.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=step)


def console_line(step: int, record: Mapping[str, float], keys: Sequence[str]) -> str:
    """'step 12 | reward/mean 0.312 | actor/grad_norm 1.07': the chosen keys that are present."""
    parts = [f"step {step}"] + [f"{key} {record[key]:.4g}" for key in keys if key in record]
    return " | ".join(parts)


def drop_records_from(path: str | os.PathLike, first_step: int) -> int:
    """Removes the records of steps ≥ `first_step` from the metrics file `path` (and a last line cut
    short by a crash), keeping the others in order; returns how many were removed. Rewritten
    through a temporary file and a rename, so a crash leaves the old file or the new one."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    records = _parsed_lines(path)
    kept = [line + "\n" for line, raw in records if int(raw["step"]) < first_step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return len(records) - len(kept)


def read_jsonl(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The records of `run_dir/metrics.jsonl` (or of that file itself), one per step in step
    order; null reads as NaN; for a step written twice (a resumed run) the later record wins.
    A last line cut short by a crash is ignored."""
    path = os.fspath(run_dir)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics file: {path}")
    by_step: dict[int, dict[str, float]] = {}
    for _, raw in _parsed_lines(path):
        step = int(raw.pop("step"))
        by_step[step] = {"step": step, **{k: math.nan if v is None else float(v) for k, v in raw.items()}}
    return [by_step[s] for s in sorted(by_step)]


def _parsed_lines(path: str) -> list[tuple[str, dict]]:
    """(line, its JSON object) of each non-empty line of a metrics file; the unterminated final
    line of an interrupted write is left out, any other line that is not a record is an error."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict) or "step" not in raw:
                raise ValueError
        except ValueError:  # JSONDecodeError included
            if number == len(lines):
                continue
            raise ValueError(f"{path}, line {number}: not a JSON object: {line[:80]!r}") from None
        out.append((line, raw))
    return out


class Timer:
    """`with Timer(timings, "rollout"): …` adds the block's wall-clock seconds to timings["rollout"]."""

    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self._start


def _check_scalars(metrics: Mapping[str, Any]) -> None:
    # Checked when queued (shapes are known without waiting for the device), so a bad value
    # fails at the line that produced it rather than a step later.
    for key, value in metrics.items():
        if value is None or isinstance(value, (numbers.Real, np.bool_)):
            continue
        shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
        # jnp.issubdtype also knows bfloat16, which numpy's does not
        numeric = dtype is not None and (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))
        if shape is None or not numeric:
            raise TypeError(f"metric '{key}' must be a number or a numeric array, got {type(value).__name__}")
        if math.prod(shape) != 1:
            raise ValueError(f"metric '{key}' must be a scalar, got an array of shape {tuple(shape)}")


def _available_now(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The values that can be read without waiting: host numbers, and device arrays whose
    computation has finished (fetched together, one transfer)."""
    host = {k: v for k, v in metrics.items() if isinstance(v, (numbers.Real, np.bool_, np.ndarray))}
    ready = {k: v for k, v in metrics.items() if isinstance(v, jax.Array) and v.is_ready()}
    return {k: _to_float(v) for k, v in {**host, **jax.device_get(ready)}.items()}


def _to_float(value: Any) -> float:
    return math.nan if value is None else float(np.asarray(value).reshape(()))
