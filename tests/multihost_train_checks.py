"""One process of a two-process training run; launched by multihost_train_test.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m tests.multihost_train_checks \
        MODEL_DIR RUN_DIR STEPS 127.0.0.1:PORT PROCESS_ID
"""

from __future__ import annotations

import json
import os
import sys

import jax


def main(model_dir: str, run_dir: str, steps: str, coordinator: str, process_id: str) -> None:
    from igpo_jax.runtime import distributed
    from igpo_jax.train import train
    from tests.multihost_train_test import multihost_config

    assert distributed.initialize(coordinator, 2, int(process_id))
    assert jax.process_count() == 2 and len(jax.local_devices()) == 2, jax.devices()
    history = train(multihost_config(model_dir, run_dir, int(steps)))
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "history.json"), "w") as f:
            json.dump(history, f)
    print(f"process {jax.process_index()}: {len(history)} steps, loss {[h['actor/loss'] for h in history]}")


if __name__ == "__main__":
    main(*sys.argv[1:])
