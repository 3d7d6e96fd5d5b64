"""One process of a two-process training run with dynamic sampling whose groups are informative on
process 0 always and on process 1 every second time it asks; launched by
multihost_dynamic_sampling_test.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m tests.multihost_dynamic_sampling_checks \
        MODEL_DIR RUN_DIR STEPS 127.0.0.1:PORT PROCESS_ID

Writes RUN_DIR/process_<id>.json: the data iterator's state after each step's sampling, and how
many rounds this process rolled out.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np


def main(model_dir: str, run_dir: str, steps: str, coordinator: str, process_id: str) -> None:
    from igpo_jax import train as train_lib
    from igpo_jax.runtime import distributed
    from tests.multihost_dynamic_sampling_test import dynamic_sampling_config

    assert distributed.initialize(coordinator, 2, int(process_id))
    assert jax.process_count() == 2 and len(jax.local_devices()) == 2, jax.devices()
    record = {"iterator_after_step": [], "rounds_rolled_out": 0}

    def informative_groups(run, traj, advantage_NL):
        # process 1's questions teach something only on its 2nd, 4th, … round: it needs two rounds a
        # step while process 0 is full after one (and then only reads the batches, not rolling out)
        record["rounds_rolled_out"] += 1
        flag = jax.process_index() == 0 or record["rounds_rolled_out"] % 2 == 0
        return np.full(traj.num_rollouts // run.config.rollout.n, flag)

    sample = train_lib.dynamic_sampling

    def dynamic_sampling(run, batches, *args):
        out = sample(run, batches, *args)
        record["iterator_after_step"].append(batches.state())
        return out

    train_lib.informative_groups, train_lib.dynamic_sampling = informative_groups, dynamic_sampling
    history = train_lib.train(dynamic_sampling_config(model_dir, run_dir, int(steps)))
    with open(os.path.join(run_dir, f"process_{jax.process_index()}.json"), "w") as f:
        json.dump({**record, "history": history}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
