"""host_memory: glibc keeps freed heap pages resident until `release()` hands them back."""

import subprocess
import sys
import textwrap

import pytest

from igpo_jax.runtime import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc (Linux)")

# 400 × 256 KiB blocks (below the 1 MiB mmap threshold, so they live in the heap), written so
# they are resident; every other one freed leaves ~50 MB of holes that only a trim returns
_HOLES = textwrap.dedent("""
    import ctypes
    from igpo_jax.runtime import host_memory
    assert host_memory.configure()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mb():
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
    blocks = []
    for _ in range(400):
        p = libc.malloc(256 << 10)
        ctypes.memset(p, 1, 256 << 10)
        blocks.append(p)
    for p in blocks[::2]:
        libc.free(p)
    before = rss_mb()
    host_memory.release()
    print(before - rss_mb())
""")


def test_release_returns_freed_heap_holes_to_the_os():
    out = subprocess.run([sys.executable, "-c", _HOLES], capture_output=True, text=True, check=True)
    returned_mb = float(out.stdout.strip())
    assert returned_mb > 40, returned_mb  # 50 MB of holes; without the trim this stays ~0


def test_configure_and_release_are_safe_to_repeat():
    assert host_memory.configure() and host_memory.configure()
    host_memory.release()
    host_memory.release()


# a 64 MiB block written, freed and allocated again, from a thread other than the main one (XLA
# allocates from its workers): the page faults of writing it the second time, then the resident
# memory handed back when `retained()` ends
_REUSE = textwrap.dedent("""
    import contextlib, ctypes, resource, sys, threading
    from igpo_jax.runtime import host_memory
    assert host_memory.configure()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    def rss_mb():
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
    def faults_of_second_write(out):
        libc.free(ctypes.memset(libc.malloc(size), 1, size))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 2, size)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(p)
    retain = sys.argv[1] == "retained"
    out = []
    with host_memory.retained() if retain else contextlib.nullcontext():
        worker = threading.Thread(target=faults_of_second_write, args=(out,))
        worker.start()
        worker.join()
        rss_inside = rss_mb()
    print(out[0], rss_inside - rss_mb())
""")


def _reuse(mode: str) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", _REUSE, mode], capture_output=True, text=True, check=True)
    faults, returned_mb = out.stdout.split()
    return int(faults), float(returned_mb)


def test_retained_reuses_freed_blocks_without_page_faults_and_returns_them_after():
    faults, returned_mb = _reuse("retained")
    assert faults < 200, faults  # the block's 16384 pages are still mapped
    assert returned_mb > 50, returned_mb  # ... until the end of `retained()`


def test_outside_retained_a_large_block_comes_back_as_fresh_pages():
    faults, _ = _reuse("plain")
    assert faults > 8000, faults  # mapped anew and faulted in page by page
