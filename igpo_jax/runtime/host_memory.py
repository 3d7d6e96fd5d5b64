"""Keep the host's resident memory close to what is live (glibc malloc on Linux; no-op elsewhere).

XLA's CPU runtime allocates every temporary and result with malloc. With glibc's defaults the
memory of freed buffers mostly stays in the process: one arena per thread (up to 8 per core),
and an mmap threshold that adapts upwards after large frees, so buffers of a few MB land in
the heap and leave holes there. For the embedded default, 4 training steps with SmolLM2, that
was ~1 GB of resident memory that nothing used. `configure()` caps the arenas and pins the
mmap threshold; `release()` (between the phases of a step) hands free heap pages back.

The other side of that trade is page faults. A buffer handed back to the OS comes back as fresh
pages that the kernel maps and zeroes on first write: the SmolLM2 train step (8 × 512 tokens)
maps a 4.5 GB temporary per run and, with glibc's defaults, took 1.6 M page faults and 4–7
CPU-seconds in the kernel per 26 s step (3.4 M with `configure()`'s 1 MiB threshold). Within
`retained()` (around a loop that runs the same programs again and again, such as several
optimiser steps) freed buffers stay in the heap for the next run instead: no faults, and the
pages go back when it ends. `igpo_jax.train` does not use it: its update phase runs one
optimiser step by default, and the retained heap would raise the demo's peak memory. glibc
maps large blocks of threads other than the main one outside the heap whatever the settings,
hence one arena: XLA allocates from its worker threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import sys

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

MMAP_THRESHOLD_BYTES = 1 << 20  # buffers from 1 MiB up are mapped on their own and unmapped on free
ARENA_MAX = 1  # every thread's large blocks in the main heap, where `retained()` can keep them
_DEFAULT_MMAP_MAX = 65536  # glibc's defaults, restored when `retained()` ends
_DEFAULT_TRIM_THRESHOLD = 128 << 10
_NEVER_TRIM = ctypes.c_int(-1)  # read by glibc as the largest size_t


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl does not)
        return libc
    except (OSError, AttributeError):
        return None


def configure() -> bool:
    """Caps malloc arenas and fixes the mmap threshold; True when glibc took both settings."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and libc.mallopt(_M_ARENA_MAX, ARENA_MAX) == 1
    if not ok:
        logging.warning("mallopt refused the memory settings; resident memory may run higher")
    return ok


@contextlib.contextmanager
def retained():
    """Within: freed blocks of any size stay in the heap for the next allocation (no mmap, no
    trim); on exit the settings of `configure()` are back and the free pages are released.
    A no-op without glibc. Call `configure()` first (one arena), before JAX starts.

    The price is resident memory: the heap settles after the first two runs, with the holes
    that other allocations leave (the SmolLM2 train step above: 12.6 GB peak against 7.5 GB)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        release()


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB (0 where the OS does not say)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0.0
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def release() -> None:
    """Returns free heap pages to the OS (malloc_trim); cheap next to a rollout or an update."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
