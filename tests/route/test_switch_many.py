"""switch_kernel.rebuild_many: a whole switch in one parallel pass, tensor for tensor what rebuild_into writes."""

from __future__ import annotations

import pytest
import torch

from mmer.checkpoint import bits
from mmer.route import switch_kernel

pytestmark = pytest.mark.skipif(switch_kernel._kernel() is None, reason="numba unavailable or MMER_FUSED=0")

PAIRS = [
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.float32, torch.float32),
]
# around the kernel's block size, empty, and not whole mask bytes
SIZES = [0, 1, 7, 9, switch_kernel.BLOCK - 1, switch_kernel.BLOCK, switch_kernel.BLOCK + 1, 50_000, 123_457]


def test_many_tensors_of_every_dtype_pair_rebuild_bit_for_bit_as_one_at_a_time_with_the_same_maxima():
    torch.manual_seed(0)
    jobs, expected = [], []
    for k in range(45):
        base_dtype, tau_dtype = PAIRS[k % len(PAIRS)]
        n = SIZES[k % len(SIZES)]
        base = (torch.randn(n) * 3).to(base_dtype)
        tau = torch.randn(n).to(tau_dtype)
        if n > 2:
            base[n // 2] = -torch.finfo(base_dtype).max  # a large magnitude somewhere inside, negative
        packed = bits.pack(torch.rand(n) < 0.3)
        scale = 1.0 if k % 3 else 0.7
        one = torch.empty_like(base)
        expected.append((one, switch_kernel.rebuild_into(one, base, tau, packed, scale)))
        jobs.append((torch.full_like(base, 5.0), base, tau, packed, scale))
    maxima = switch_kernel.rebuild_many(jobs)
    for (out, *_), (one, tops), got in zip(jobs, expected, maxima, strict=True):
        assert torch.equal(out.view(torch.uint8), one.view(torch.uint8))
        assert got == tops


def test_no_jobs_is_nothing_to_do():
    assert switch_kernel.rebuild_many([]) == []
