"""Process-level tuning the streaming merge relies on for speed (never for correctness).

glibc returns every freed block above its mmap threshold to the kernel, so each new tensor of a few MB costs
fresh zeroed pages: on 2 cores that made elementwise kernels about 5x slower than the arithmetic itself. The
merge works in ~4 MB chunks (``CPU_CHUNK`` below); raising the thresholds keeps those buffers in the heap
for reuse. The only cost is that up to ``TRIM_BYTES`` of freed memory stays mapped to this process.
Set ``MMER_MALLOPT=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit
TRIM_BYTES = 1 << 30

# Flat entries per chunk when a slot is merged piecewise on the CPU (see ``merge.slot.Variant.elementwise``):
# about 1 M float32 entries (4 MB) per buffer, below the raised mmap threshold so every operation reuses freed
# heap memory. Measured on 2 cores: elementwise kernels 5-8x faster than on whole 46 MB tensors.
CPU_CHUNK = 1 << 20

_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; returns whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MMER_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt: nothing to tune
        return _applied
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
    return _applied


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes, as reports give it (the OS reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
