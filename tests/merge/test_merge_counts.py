"""Specifies the merge kernel's window counts: merging a chunk at guessed thresholds can count each τᵢ against a
one-magnitude window in the same pass, so a guess the counts confirm needs no pass of its own.

The counts must be exactly the threshold pass's (``window_pass.window_chunk`` with ``lo = hi``), and counting must
not change a byte of what the merge writes.
"""

from __future__ import annotations

import pytest
import torch
from test_one_pass import global_thresholds, inputs, variant

pytest.importorskip("numba")
from mmer.merge import one_pass, window_pass  # noqa: E402

INT32_MAX = 2**31 - 1


def _pattern(value: float | None) -> int:
    return 0 if value is None else int(torch.tensor([value], dtype=torch.float32).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["gaussian", "quantised", "sparse", "extreme"])
@pytest.mark.parametrize("numel", [13, 3 * one_pass.BLOCK + 9], ids=["tiny-ragged", "multi-block"])
def test_a_merge_that_counts_a_window_counts_what_the_threshold_pass_counts_and_writes_the_same_bytes(
    kind, numel, dtype
):
    base, thetas = inputs(kind, numel, n=3, seed=11, dtype=dtype)
    v = variant(k=0.6)
    thresholds = global_thresholds(base, thetas, v.k)
    # each model's own threshold, the magnitude 0, and a pattern beyond every value
    window = [_pattern(thresholds[0]), 0, INT32_MAX - 1]
    plain = one_pass.merge_chunk(base, thetas, v, thresholds, dtype)
    counted = one_pass.merge_chunk(base, thetas, v, thresholds, dtype, window=window)
    assert plain.pieces is None
    assert torch.equal(counted.stored.view(torch.int16), plain.stored.view(torch.int16))
    assert all(torch.equal(a, b) for a, b in zip(counted.packed, plain.packed, strict=True))
    assert counted.ones == plain.ones and counted.l1 == plain.l1
    expected = window_pass.window_chunk(base, thetas, window, window).pieces
    for got, want in zip(counted.pieces, expected, strict=True):
        assert got == want
