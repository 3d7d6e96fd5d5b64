"""Keep the host's resident memory close to what is live (glibc malloc on Linux; no-op elsewhere).

XLA's CPU runtime allocates every temporary and result with malloc. With glibc's defaults the
memory of freed buffers mostly stays in the process: one arena per thread (up to 8 per core),
and an mmap threshold that adapts upwards after large frees, so buffers of a few MB land in
the heap and leave holes there. For the embedded default, 4 training steps with SmolLM2, that
was ~1 GB of resident memory that nothing used. `configure()` caps the arenas and pins the
mmap threshold; `release()` (between the phases of a step) hands free heap pages back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

# mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD_BYTES = 1 << 20  # buffers from 1 MiB up are mapped on their own and unmapped on free
ARENA_MAX = 2


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


def release() -> None:
    """Returns free heap pages to the OS (malloc_trim); cheap next to a rollout or an update."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
