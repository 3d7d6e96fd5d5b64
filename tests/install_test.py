"""The README's set-up line on a fresh machine: a clean clone, a new virtual environment, nothing
borrowed from the Python that runs the tests (no `wheel`, whatever setuptools the venv ships)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    # a venv inherits nothing through these; PIP_* settings of the machine (indexes) stay
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return env


def _clone(tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    return clone


def _real_python(version: str) -> str | None:
    """An interpreter of `version` itself (pyenv's shims pick a version by their own name, so a
    symlink to a shim named python3 would run the default one)."""
    for candidate in [*Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}"),
                      *(Path(p) for p in [shutil.which(f"python{version}")] if p)]:
        if "shims" not in candidate.parts:
            probe = subprocess.run([str(candidate), "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True)
            if probe.stdout.strip() == str(tuple(int(x) for x in version.split("."))):
                return str(candidate)
    return None


@pytest.mark.slow
def test_install_sh_in_fresh_venv_from_clean_clone(tmp_path):
    clone = _clone(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = _clean_env()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    run = subprocess.run(["bash", "launch/install.sh"], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # imported from outside the clone: the editable install, not the working directory, finds it
    probe = ("import igpo_jax, jax, pathlib; from igpo_jax.model import embedded; "
             "print(pathlib.Path(igpo_jax.__file__).resolve().parent.parent); print(embedded.smollm2_gguf_path())")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    package_root, gguf = out.stdout.split()
    assert Path(package_root) == clone.resolve()
    assert gguf.endswith(".gguf") and Path(gguf).is_file()
    # the model's package sits outside site-packages, so its undeclared dependencies fail no check
    check = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    # the runtime path renders the chat template (jinja2) without torch, which only the test install brings
    probe = ("import importlib.util; assert importlib.util.find_spec('torch') is None, 'torch in a runtime install'; "
             "from igpo_jax.model.embedded import smollm2_gguf_path; from igpo_jax.model.tokenizer import "
             "load_tokenizer, render_chat; print(render_chat(load_tokenizer(smollm2_gguf_path()), "
             "[{'role': 'user', 'content': 'Where was Ada born?'}], add_generation_prompt=True))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Where was Ada born?" in out.stdout and "<|im_start|>assistant" in out.stdout
    # and the README's first command at a smoke size trains a step and writes its metrics
    smoke = subprocess.run(["bash", "launch/smoke.sh", str(tmp_path / "smoke")], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    assert "smoke: ok" in smoke.stdout

def test_install_sh_refuses_old_python_with_a_message(tmp_path):
    """An interpreter older than jax's floor is told so before pip starts resolving."""
    old = _real_python("3.10")
    if old is None:
        pytest.skip("no Python 3.10 on this machine")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").symlink_to(old)
    env = _clean_env()
    env["PATH"] = f"{shim}{os.pathsep}{env['PATH']}"
    run = subprocess.run(["bash", str(REPO / "launch" / "install.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1
    assert "needs Python >= 3.11" in run.stderr and "3.10" in run.stderr
