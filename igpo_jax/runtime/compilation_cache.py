"""Compile once: JAX's persistent compilation cache, on by default, and a counter of what it saved.

    IGPO_JAX_COMPILATION_CACHE=/path   the cache directory (default: $XDG_CACHE_HOME/igpo_jax/xla,
                                       i.e. ~/.cache/igpo_jax/xla); 'off' (or '') turns it off

A second run of a config, a resumed run and every member of a sweep then load their programs
from disk instead of compiling them (the demo's first step spends over a minute compiling).
Every program is cached, however quick its compile or small its executable: JAX's defaults (1 s,
and a filesystem-dependent size floor) leave out most CPU programs, and many small ones add up.
A JAX_COMPILATION_CACHE_DIR the user set already wins over the default.

The cache is trusted code (JAX's warning): a directory others can write to lets them run code in
this process, hence a per-user default.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import jax

ENV = "IGPO_JAX_COMPILATION_CACHE"

# jax.monitoring events (jax/_src/compiler.py, dispatch.py): one request per program compiled with
# the cache on, one hit per program loaded from it, one backend-compile duration per program either
# way; the lowering of each program to MLIR before it (tracing is left out: a jit traced inside
# another's trace reports its own duration too, which would count its seconds twice)
_REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
_HITS = "/jax/compilation_cache/cache_hits"
_COMPILE = "/jax/core/compile/backend_compile_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"


def user_cache_root(environ=None) -> str:
    """$XDG_CACHE_HOME/igpo_jax (~/.cache/igpo_jax): this cache's default home, and the weights cache's."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "igpo_jax")


def default_dir(environ=None) -> str:
    return os.path.join(user_cache_root(environ), "xla")


def cache_dir(environ=None) -> str | None:
    """The directory the cache should use, or None when it is turned off."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV)
    if value is None:
        return environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir(environ)
    return None if value.strip().lower() in ("", "off", "0", "false", "none") else value


def enable(path: str | None = None) -> str | None:
    """Turns the persistent cache on at `path` (default: `cache_dir()`); call before the first
    compilation. Returns the directory used, or None when the cache is off."""
    path = cache_dir() if path is None else path
    if not path:
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


@dataclasses.dataclass
class CompileCounts:
    """Programs this process built, and how many of them came from the persistent cache."""

    programs: int = 0  # every program built (compiled, or loaded from the cache)
    requests: int = 0  # programs for which the cache was consulted
    hits: int = 0  # programs loaded from the cache
    # seconds spent lowering (to MLIR) and compiling (or loading) programs, on any thread: a program
    # compiled in the background (leafwise.py's whole-tree optimiser step) counts while it compiles
    seconds: float = 0.0

    @property
    def compiled(self) -> int:
        """Programs XLA actually compiled in this process."""
        return self.programs - self.hits


_counts = CompileCounts()
_lock = threading.Lock()
_registered = False


def _on_event(event: str, **kwargs) -> None:
    with _lock:
        if event == _REQUESTS:
            _counts.requests += 1
        elif event == _HITS:
            _counts.hits += 1


def _on_duration(event: str, duration_secs: float, **kwargs) -> None:
    if event in (_COMPILE, _LOWER):
        with _lock:
            _counts.programs += event == _COMPILE
            _counts.seconds += duration_secs


def counts() -> CompileCounts:
    """A snapshot of this process's counts since the first call (which starts the counting)."""
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_listener(_on_event)
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _registered = True
        return dataclasses.replace(_counts)
