"""Specifies mmer/merge/window_pass.py: the fused threshold pass counts exactly what ``trim.window_piece`` counts.

``WindowedThreshold`` is the definition; the kernel only decodes, subtracts and counts without materialising τᵢ,
so for every window (wide, one tied magnitude, starting at 0, beyond every value) and every input shape (random,
quantised with ties and zeros, extreme magnitudes) each field of each model's piece must be equal.
"""

from __future__ import annotations

import pytest
import torch
from test_one_pass import inputs

from mmer.merge.trim import window_piece

pytest.importorskip("numba")
from mmer.merge import window_pass  # noqa: E402

INT32_MAX = 2**31 - 1


def _magnitude_bits(base: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return (theta.float() - base.float()).abs().view(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["gaussian", "quantised", "sparse", "extreme"])
@pytest.mark.parametrize("numel", [13, 3 * window_pass.BLOCK + 9], ids=["tiny-ragged", "multi-block"])
def test_every_count_of_the_fused_pass_equals_the_eager_piece(kind, numel, dtype):
    base, thetas = inputs(kind, numel, n=4, seed=5, dtype=dtype)
    mags = [_magnitude_bits(base, t) for t in thetas]
    med = [int(m.median()) for m in mags]
    # a window over many values; one tied magnitude; the magnitude 0 up to the median; nothing inside (beyond all)
    lo = [max(med[0] - 50_000_000, 0), med[1], 0, INT32_MAX - 1]
    hi = [med[0] + 50_000_000, med[1], med[2], INT32_MAX - 1]
    got = window_pass.window_chunk(base, thetas, lo, hi)
    for i, m in enumerate(mags):
        expected = window_piece(m, lo[i], hi[i])
        piece = got.pieces[i]
        for field in ("numel", "below", "zeros", "at_lo", "at_hi", "strict", "under", "under_count", "over"):
            assert getattr(piece, field) == getattr(expected, field), (field, i)
        assert piece.over_count == expected.over_count
        if expected.candidates is None:
            assert piece.candidates is None
        else:
            assert torch.equal(piece.candidates, expected.candidates)
        l1 = float((thetas[i].float() - base.float()).abs().double().sum())
        assert got.l1[i] == pytest.approx(l1, rel=1e-9)


def test_a_chunk_whose_every_entry_is_unchanged_counts_only_zeros():
    base = torch.randn(5000).to(torch.bfloat16)
    got = window_pass.window_chunk(base, [base.clone(), base.clone()], [0, 100], [0, 200])
    at_zero, above_zero = got.pieces
    assert (at_zero.at_lo, at_zero.below, at_zero.over_count) == (5000, 0, 0)
    assert (above_zero.below, above_zero.zeros, above_zero.under, above_zero.under_count) == (5000, 5000, 0, 5000)
