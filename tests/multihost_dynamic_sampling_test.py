"""Dynamic sampling in a two-process run (2 × 2 CPU devices, gloo on 127.0.0.1): a process whose
share is full keeps reading batches while the other rolls out more, so the data iterators stay in
step and the step's metrics count both processes' groups."""

from __future__ import annotations

import json
import os

import pytest

from tests.multihost_train_test import multihost_config
from tests.process_pair import run_process_pair
from tests.train_test import tiny_model_dir  # noqa: F401  (fixture)

STEPS = 2


def dynamic_sampling_config(model_dir: str, run_dir: str, steps: int):
    c = multihost_config(model_dir, run_dir, steps)
    c.algorithm.filter_groups.enable = True
    c.algorithm.filter_groups.max_num_gen_batches = 4
    c.trainer.test_freq = 0
    return c


@pytest.mark.slow
def test_processes_needing_different_rounds_keep_their_data_iterators_in_step(tiny_model_dir, tmp_path):  # noqa: F811
    run_dir = str(tmp_path / "run")
    run_process_pair("tests.multihost_dynamic_sampling_checks",
                     lambda address, i: [tiny_model_dir, run_dir, str(STEPS), address, str(i)],
                     devices_per_process=2, timeout=540)
    records = [json.load(open(os.path.join(run_dir, f"process_{i}.json"))) for i in (0, 1)]
    batch = dynamic_sampling_config(tiny_model_dir, run_dir, STEPS).data.train_batch_size
    # two rounds a step (process 1 needed them), read by both: positions 2 and 4 batches in
    for r in records:
        assert [s["position"] for s in r["iterator_after_step"]] == [2 * batch, 4 * batch]
    assert records[0]["iterator_after_step"] == records[1]["iterator_after_step"]
    assert [r["rounds_rolled_out"] for r in records] == [STEPS, 2 * STEPS]  # process 0 rolled out once a step
    history = records[0]["history"]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    for h in history:  # one group per process per round rolled out: 1 (process 0) + 2 (process 1)
        assert {k: v for k, v in h.items() if k.startswith("filter_groups/")} == {
            "filter_groups/rounds": 2.0, "filter_groups/generated": 3.0, "filter_groups/informative": 2.0,
            "filter_groups/dropped": 1.0, "filter_groups/kept": 2.0, "filter_groups/filled": 0.0,
            "filter_groups/cap_hit": 0.0}
