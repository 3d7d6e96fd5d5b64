"""Runs one test module as two cooperating processes (a gloo process group on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_process_pair(module: str, args_of, devices_per_process: int, timeout: float, log_tail: int = 4000):
    """`python -m module *args_of(address, i)` for i = 0, 1, each with `devices_per_process` CPU
    devices; asserts both exit 0 (showing the tails of their logs otherwise)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               JAX_PLATFORMS="cpu")
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", module, *args_of(address, i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:  # a failed peer leaves the other waiting on the coordinator
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(log[-log_tail:] for log in logs)
