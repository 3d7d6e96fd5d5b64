"""host_memory: glibc keeps freed heap pages resident until `release()` hands them back."""

import subprocess
import sys
import textwrap

import pytest

from igpo_jax import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc (Linux)")

# 400 × 256 KiB blocks (below the 1 MiB mmap threshold, so they live in the heap), written so
# they are resident; every other one freed leaves ~50 MB of holes that only a trim returns
_HOLES = textwrap.dedent("""
    import ctypes
    from igpo_jax import host_memory
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
