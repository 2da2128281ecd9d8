"""Host memory for the router's live weights: one allocation, on huge pages where the kernel has them free.

A router's load writes every live weight once, into memory the process has never touched, and on the CPU each
4 KiB page of it costs a fault that allocates and zeroes the page (262 144 faults per GiB), most of a load's
time after the rebuild itself. Linux's transparent huge pages map 2 MiB per fault instead. Where the kernel
gives them only on request (``/sys/kernel/mm/transparent_hugepage/enabled`` set to ``madvise``, a common
default), a request its free lists cannot meet makes the fault compact memory first, which is slower than the
4 KiB faults it replaces. So every CPU live tensor is a view of one allocation aligned to the huge-page size,
and huge pages are asked for only over as many 2 MiB spans as ``/proc/buddyinfo`` shows free blocks of that
size (keeping a quarter of them for everyone else); the rest stays on small pages. With ``enabled`` set to
``always`` the kernel uses them on the aligned allocation by itself; with ``never``, off Linux, or with
``MMER_HUGEPAGES=0``, this is one plain allocation. Either way the tensors hold the same values: this only
decides how their memory is mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

THP = Path("/sys/kernel/mm/transparent_hugepage")
BUDDYINFO = Path("/proc/buddyinfo")
MADV_HUGEPAGE = 14
ALIGN = 64  # bytes between tensors: a cache line, so no two tensors share one and every row starts aligned
KEEP = 4  # leave this fraction (1/KEEP) of the free huge blocks to other allocations


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def thp_mode(enabled: str | None) -> str:
    """The bracketed choice in THP's ``enabled`` file (``always [madvise] never`` → ``madvise``), else ``never``."""
    if enabled is None or "[" not in enabled:
        return "never"
    return enabled.split("[", 1)[1].split("]", 1)[0]


def free_huge_blocks(buddyinfo: str | None, huge_bytes: int, page_bytes: int) -> int:
    """How many free blocks of ``huge_bytes`` the buddy allocator holds, over every zone (a free block of a
    higher order counts as the blocks it splits into)."""
    if buddyinfo is None or huge_bytes < page_bytes:
        return 0
    order = int(math.log2(huge_bytes // page_bytes))
    total = 0
    for line in buddyinfo.splitlines():
        counts = line.split("zone", 1)[-1].split()[1:]  # "Node 0, zone Normal 12 5 ...": per order from 0
        for at, count in enumerate(counts):
            if at >= order and count.isdigit():
                total += int(count) << (at - order)
    return total


def huge_spans(nbytes: int, huge_bytes: int, mode: str, free_blocks: int) -> int:
    """How many leading huge pages of an ``nbytes`` allocation to request: none unless THP is on request, and no
    more than the free blocks spare (a request beyond them would compact memory inside the faults)."""
    if mode != "madvise" or huge_bytes <= 0:
        return 0
    return max(0, min(nbytes // huge_bytes, free_blocks - -(-free_blocks // KEEP)))


@lru_cache(maxsize=1)
def _madvise() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _huge_bytes() -> int:
    text = _read(THP / "hpage_pmd_size")
    return int(text) if text and text.strip().isdigit() else 2 << 20


def allocate(specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Uninitialised CPU tensors of the given shapes and dtypes, every one a view of a single allocation.

    The allocation starts on a huge-page boundary and asks for huge pages where :func:`huge_spans` allows;
    returns the tensors in the order of ``specs``.
    """
    offsets = []
    total = 0
    for shape, dtype in specs:
        offsets.append(total)
        total += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
    linux = sys.platform.startswith("linux") and os.environ.get("MMER_HUGEPAGES", "1") != "0"
    mode = thp_mode(_read(THP / "enabled")) if linux else "never"
    huge = _huge_bytes() if mode in ("always", "madvise") else 0
    buffer = torch.empty(max(total + huge, 1), dtype=torch.uint8)
    start = -buffer.data_ptr() % huge if huge else 0
    page = os.sysconf("SC_PAGE_SIZE") if linux else 4096
    spans = huge_spans(total, huge, mode, free_huge_blocks(_read(BUDDYINFO), huge, page) if huge else 0)
    madvise = _madvise() if spans else None
    if madvise is not None:
        madvise(buffer.data_ptr() + start, spans * huge, MADV_HUGEPAGE)  # type: ignore[operator]
    out = []
    for (shape, dtype), offset in zip(specs, offsets, strict=True):
        numel = math.prod(shape)
        at = start + offset
        out.append(buffer[at : at + numel * dtype.itemsize].view(dtype).view(shape))
    return out


MADV_POPULATE_READ = 22  # Linux 5.14: map a range's pages (here: the page cache's) without a fault per page


def map_in(tensors: Sequence[torch.Tensor], threads: int | None = None) -> None:
    """Have the kernel map the pages of ``tensors`` (views of mapped files) into this process now.

    A load's first switch reads all of θ_base and τ*; left to faults, each fault maps a few pages of the page
    cache, and the traps cost more than the mapping. One ``MADV_POPULATE_READ`` per tensor maps them in bulk (a
    tensor of anonymous memory, or a kernel without the call, is left as it is: the reads fault it in as before).
    Split over ``threads`` (torch's intra-op count by default), as the switch that reads them is.
    """
    madvise = _madvise() if sys.platform.startswith("linux") else None
    if madvise is None or not tensors:
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def one(tensor: torch.Tensor) -> None:
        start = tensor.data_ptr() // page * page
        stop = tensor.data_ptr() + tensor.nbytes
        if stop > start:
            madvise(start, stop - start, MADV_POPULATE_READ)  # type: ignore[operator]

    workers = max(1, threads or torch.get_num_threads())
    if workers == 1:
        for tensor in tensors:
            one(tensor)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, tensors))
