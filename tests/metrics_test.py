"""MetricsWriter: JSONL content, the one-step-late fetch, TensorBoard events, console line, Timer."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from igpo_jax.reporting import metrics
from igpo_jax.reporting.metrics import MetricsWriter, Timer, read_jsonl


class RecordingScalar:
    """Stands in for a device array and records when the host reads it (jax.device_get calls
    `__array__`), so the test can see exactly when a value is fetched."""

    shape, dtype = (), np.dtype(np.float32)

    def __init__(self, value: float, fetched: list):
        self.value, self.fetched = value, fetched

    def __array__(self, dtype=None, copy=None):
        self.fetched.append(self.value)
        return np.asarray(self.value, dtype=np.float32)


def tensorboard_events(path):
    """The events of one event file, parsed from the TFRecord framing (u64 length, u32 crc,
    payload, u32 crc) with tensorboardX's own Event proto."""
    from tensorboardX.proto.event_pb2 import Event

    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        yield Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file under `logdir`, as the files hold them."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for event in tensorboard_events(path):
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def tensorboard_scalars_as_shown(logdir) -> dict[str, list[tuple[int, float]]]:
    """Scalars as TensorBoard shows them: event files read in name (creation time) order, and a
    SessionLog.START at step s (SummaryWriter's purge_step, written by a restarted run) discards
    the scalars of steps ≥ s read before it (TensorBoard's purge of orphaned data)."""
    from tensorboardX.proto.event_pb2 import SessionLog

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tensorboard_events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                out = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in out.items()}
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_values_are_fetched_when_the_next_step_is_written(tmp_path):
    fetched = []
    lines = []
    with MetricsWriter(tmp_path, use_tensorboard=False, console_keys=("loss",), print_fn=lines.append) as writer:
        assert writer.write(1, {"loss": RecordingScalar(0.5, fetched)}) is None
        assert fetched == [] and read_jsonl(tmp_path) == []  # nothing read from the device yet
        record = writer.write(2, {"loss": RecordingScalar(0.25, fetched)})
        assert fetched == [0.5]  # step 1 is read only now, while step 2 stays queued
        assert record == {"step": 1, "loss": 0.5}
        assert [r["step"] for r in read_jsonl(tmp_path)] == [1]
        assert lines == ["step 1", "step 2"]  # printed at write time: pending device values are not shown
        assert writer.flush() == {"step": 2, "loss": 0.25}
        assert writer.flush() is None
    assert fetched == [0.5, 0.25]
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2]


def test_console_line_of_a_step_is_printed_when_it_is_written(tmp_path):
    import jax

    lines = []
    computed = jax.jit(lambda x: x * 2)(jnp.float32(0.25))
    computed.block_until_ready()  # finished on the device: copying it waits for nothing
    with MetricsWriter(tmp_path, use_tensorboard=False, console_keys=("reward", "loss", "skipped", "val"),
                       print_fn=lines.append) as writer:
        writer.write(1, {"reward": 0.125, "loss": computed, "skipped": np.bool_(False), "val": None})
        assert lines == ["step 1 | reward 0.125 | loss 0.5 | skipped 0"]
        assert read_jsonl(tmp_path) == []  # the files still get step 1 a step late
        writer.write(2, {"reward": 0.5})
        assert lines[-1] == "step 2 | reward 0.5" and [r["step"] for r in read_jsonl(tmp_path)] == [1]


def test_jsonl_holds_floats_and_nan_as_null(tmp_path):
    with MetricsWriter(tmp_path, use_tensorboard=False, print_fn=None) as writer:
        writer.write(1, {"reward/mean": jnp.float32(0.5), "actor/skipped": jnp.array([1.0]), "count": 3,
                         "flag": np.bool_(True), "bad": float("nan"), "inf": jnp.inf, "val/f1": None})
        last = writer.close()
    assert last["reward/mean"] == 0.5 and last["count"] == 3.0 and math.isnan(last["bad"])
    raw = json.loads(open(tmp_path / "metrics.jsonl").read())
    assert raw == {"step": 1, "reward/mean": 0.5, "actor/skipped": 1.0, "count": 3.0, "flag": 1.0,
                   "bad": None, "inf": None, "val/f1": None}
    assert all(type(v) is float for k, v in raw.items() if k != "step" and v is not None)
    (record,) = read_jsonl(tmp_path)
    assert math.isnan(record["bad"]) and math.isnan(record["val/f1"]) and record["flag"] == 1.0


def test_read_jsonl_keeps_the_last_record_of_a_repeated_step_and_skips_a_torn_line(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 1, "x": 1.0}\n{"step": 2, "x": 2.0}\n{"step": 3, "x": 3.0}\n')
        f.write('{"step": 2, "x": 20.0}\n{"step": 3, "x"')  # resumed after step 1, then killed
    assert read_jsonl(tmp_path) == [{"step": 1, "x": 1.0}, {"step": 2, "x": 20.0}, {"step": 3, "x": 3.0}]
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_jsonl(tmp_path / "missing")


def test_a_writer_that_continues_after_a_checkpoint_records_each_step_once(tmp_path):
    """A run killed after step 4, resumed from its checkpoint of step 2: steps 3 and 4 run again and
    are recorded once, in metrics.jsonl and as TensorBoard shows them."""
    with MetricsWriter(tmp_path, print_fn=None) as writer:
        for step in (1, 2, 3, 4):
            writer.write(step, {"x": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "x"')  # cut short by the kill
    time.sleep(1.1)  # tensorboardX names event files by the second
    with MetricsWriter(tmp_path, print_fn=None, first_step=3) as writer:
        for step in (3, 4):
            writer.write(step, {"x": 10.0 * step})
    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0},
                                                   {"step": 3, "x": 30.0}, {"step": 4, "x": 40.0}]
    assert tensorboard_scalars_as_shown(tmp_path / "tensorboard")["x"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert len(tensorboard_scalars(tmp_path / "tensorboard")["x"]) == 6  # the old file keeps them, hidden
    # a fresh start (no checkpoint: first_step 0) begins the file anew; None appends
    with MetricsWriter(tmp_path, use_tensorboard=False, print_fn=None, first_step=0) as writer:
        writer.write(1, {"x": 7.0})
    assert read_jsonl(tmp_path) == [{"step": 1, "x": 7.0}]
    with MetricsWriter(tmp_path, use_tensorboard=False, print_fn=None) as writer:
        writer.write(2, {"x": 8.0})
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2]


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    with MetricsWriter(tmp_path, print_fn=None) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"reward/mean": jnp.float32(step / 10)})
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["reward/mean"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in scalars["reward/mean"]], [0.1, 0.2, 0.3], rtol=1e-6)


def test_bad_values_fail_when_written(tmp_path):
    with MetricsWriter(tmp_path, use_tensorboard=False, print_fn=None) as writer:
        with pytest.raises(ValueError, match="metric 'per_token' must be a scalar, got an array of shape \\(3,\\)"):
            writer.write(1, {"per_token": jnp.zeros(3)})
        with pytest.raises(TypeError, match="metric 'name' must be a number"):
            writer.write(1, {"name": "igpo"})


def test_console_line_shows_the_chosen_keys_present():
    line = metrics.console_line(5, {"a": 0.123456, "b": 2.0, "c": 1e-7}, ("c", "a", "missing"))
    assert line == "step 5 | c 1e-07 | a 0.1235"


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsWriter(tmp_path, use_tensorboard=False, use_wandb=True)


def test_timer_adds_seconds():
    timings = {}
    with Timer(timings, "rollout"):
        pass
    with Timer(timings, "rollout"):
        pass
    assert set(timings) == {"rollout"} and 0 <= timings["rollout"] < 1
