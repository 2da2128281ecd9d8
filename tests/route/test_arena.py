"""The host arena the router's live weights live in: one allocation, huge pages only where the kernel has them free."""

from __future__ import annotations

import torch

from mmer.route import arena

BUDDYINFO = """Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3
Node 0, zone    DMA32      5      4      3      2      1      1      1      1      1      2      1
Node 0, zone   Normal     10      9      8      7      6      5      4      3      2      1      4
"""


def test_the_free_huge_blocks_are_counted_over_every_zone_with_larger_blocks_split():
    # order 9 is a 2 MiB block of 4 KiB pages; an order-10 block is two of them
    dma = 1 + 2 * 3
    dma32 = 2 + 2 * 1
    normal = 1 + 2 * 4
    assert arena.free_huge_blocks(BUDDYINFO, 2 << 20, 4096) == dma + dma32 + normal
    assert arena.free_huge_blocks(BUDDYINFO, 4 << 20, 4096) == 3 + 1 + 4  # order 10 only
    assert arena.free_huge_blocks(None, 2 << 20, 4096) == 0


def test_huge_pages_are_requested_only_on_request_mode_and_never_beyond_three_quarters_of_the_free_blocks():
    mib = 1 << 20
    assert arena.huge_spans(100 * mib, 2 * mib, "madvise", free_blocks=1000) == 50
    assert arena.huge_spans(100 * mib, 2 * mib, "madvise", free_blocks=40) == 30  # a quarter left to others
    assert arena.huge_spans(100 * mib, 2 * mib, "madvise", free_blocks=0) == 0
    assert arena.huge_spans(100 * mib, 2 * mib, "always", free_blocks=1000) == 0  # the kernel does it alone
    assert arena.huge_spans(100 * mib, 2 * mib, "never", free_blocks=1000) == 0
    assert arena.thp_mode("always [madvise] never\n") == "madvise"
    assert arena.thp_mode(None) == "never"


def test_the_tensors_are_disjoint_aligned_views_of_one_allocation_in_the_order_asked(monkeypatch):
    specs = [((3, 5), torch.bfloat16), ((), torch.float32), ((7,), torch.float16), ((2, 2, 2), torch.float32)]
    for hugepages in ("1", "0"):
        monkeypatch.setenv("MMER_HUGEPAGES", hugepages)
        tensors = arena.allocate(specs)
        assert [(tuple(t.shape), t.dtype) for t in tensors] == [(s, d) for s, d in specs]
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
        spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert all(t.data_ptr() % arena.ALIGN == 0 and t.is_contiguous() for t in tensors)
        for i, t in enumerate(tensors):  # each is writable on its own
            t.fill_(i)
        assert [float(t.reshape(-1)[0]) for t in tensors] == [0.0, 1.0, 2.0, 3.0]
