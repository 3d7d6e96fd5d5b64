"""The persistent compilation cache: a second run of a smoke config compiles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from igpo_jax.runtime import compilation_cache
from tests.train_test import tiny_model_dir  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DRIVER = """
import dataclasses, json, sys
from igpo_jax.runtime import compilation_cache
compilation_cache.enable(sys.argv[1])
compilation_cache.counts()  # start counting before anything compiles
from igpo_jax.train import train
from tests.train_test import smoke_config
train(smoke_config(sys.argv[2], sys.argv[3], 1))
print("COUNTS", json.dumps(dataclasses.asdict(compilation_cache.counts())))
"""


def _smoke_run(cache: str, model_dir: str, run_dir: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _DRIVER, cache, model_dir, run_dir], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("COUNTS ")][-1]
    return json.loads(line.split(" ", 1)[1])


def test_second_run_of_a_smoke_config_compiles_nothing(tiny_model_dir, tmp_path):  # noqa: F811
    cache = str(tmp_path / "xla")
    first = _smoke_run(cache, tiny_model_dir, str(tmp_path / "run1"))
    # a fresh run directory: the second run does all the work again (no resume), from the cache
    second = _smoke_run(cache, tiny_model_dir, str(tmp_path / "run2"))
    assert first["programs"] > 10 and first["hits"] == 0, first
    assert first["requests"] == first["programs"], first  # every program went through the cache
    assert second["programs"] == first["programs"], (first, second)
    assert second["hits"] == second["programs"], second  # compiled: 0
    assert os.listdir(cache)


def test_cache_dir_from_the_environment(tmp_path):
    home = os.path.expanduser("~")
    assert compilation_cache.cache_dir({}) == os.path.join(home, ".cache", "igpo_jax", "xla")
    assert compilation_cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == str(tmp_path / "igpo_jax" / "xla")
    assert compilation_cache.cache_dir({compilation_cache.ENV: "off"}) is None
    assert compilation_cache.cache_dir({compilation_cache.ENV: ""}) is None
    assert compilation_cache.cache_dir({compilation_cache.ENV: "/x/y"}) == "/x/y"
    assert compilation_cache.cache_dir({"JAX_COMPILATION_CACHE_DIR": "/j"}) == "/j"
