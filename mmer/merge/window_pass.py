"""The threshold search's full pass, fused: one chunk of half-precision inputs counted against each model's window.

``trim.WindowedThreshold`` is the definition: for every model it needs, per chunk, the counts of a
``trim.WindowPiece`` (entries below the window, zeros, at each edge, strictly inside with their bit patterns, the
nearest magnitudes either side with their ties) and Σ|τᵢ|. The eager path computes τᵢ in float32 and counts
with torch; this kernel decodes θ_base and θᵢ, subtracts and counts in one pass per entry, without materialising
τᵢ, and must give the same counts exactly (``tests/merge/test_window_pass.py``). It reads what the merge
kernel reads (``one_pass.reads``) and shares its exact decoding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from mmer.merge.one_pass import BLOCK, _decode, _stack_u16, _u16, njit, prange
from mmer.merge.trim import NO_VALUE_ABOVE, NO_VALUE_BELOW, WindowPiece


@dataclass
class WindowCounts:
    """One chunk's pieces, one per model, and each model's Σ|τᵢ| (NaN or inf when a τᵢ is not finite)."""

    pieces: list[WindowPiece]
    l1: list[float]


def window_chunk(
    base: torch.Tensor, thetas: Sequence[torch.Tensor], lo: Sequence[int], hi: Sequence[int]
) -> WindowCounts:
    """Count one flat half-precision chunk's task-vector magnitudes against each model's window ``[lo, hi]``
    (bit patterns), exactly as ``trim.window_piece`` counts τᵢ = θᵢ − θ_base in float32."""
    kernel = _count_kernel_compiled()
    n, numel = len(thetas), base.numel()
    theta_u = _stack_u16(thetas)
    base_u = _u16(base)
    half = base.dtype == torch.float16
    lo_a = np.asarray(lo, dtype=np.int32)
    hi_a = np.asarray(hi, dtype=np.int32)
    blocks = (numel + BLOCK - 1) // BLOCK
    counts = np.zeros((7, blocks, n), dtype=np.int64)  # below, zeros, at_lo, at_hi, strict, under_n, over_n
    edges = np.zeros((2, blocks, n), dtype=np.int32)  # under, over
    l1 = np.zeros((blocks, n), dtype=np.float64)
    kernel(base_u, theta_u, half, lo_a, hi_a, counts, edges, l1, np.zeros((0,), np.int32), np.zeros((0, 0), np.int64))
    strict = counts[4]
    totals = strict.sum(axis=0)
    candidates: list[torch.Tensor | None] = [None] * n
    if totals.any():
        offsets = np.zeros((blocks, n), dtype=np.int64)
        offsets[1:] = np.cumsum(strict, axis=0)[:-1]
        starts = np.concatenate([[0], np.cumsum(totals)[:-1]]).astype(np.int64)
        flat = np.empty(int(totals.sum()), dtype=np.int32)
        kernel(base_u, theta_u, half, lo_a, hi_a, counts, edges, l1, flat, offsets + starts)
        candidates = [
            torch.from_numpy(flat[starts[i] : starts[i] + totals[i]]) if totals[i] else None for i in range(n)
        ]
    pieces = []
    for i in range(n):
        sums = counts[:, :, i].sum(axis=1)
        under, under_n = _nearest(edges[0, :, i], counts[5, :, i], max)
        over, over_n = _nearest(edges[1, :, i], counts[6, :, i], min)
        pieces.append(
            WindowPiece(
                numel,
                int(sums[0]),
                int(sums[1]),
                int(sums[2]),
                int(sums[3]),
                int(sums[4]),
                candidates[i],
                under if under_n else NO_VALUE_BELOW,
                under_n,
                over if over_n else NO_VALUE_ABOVE,
                over_n,
            )
        )
    return WindowCounts(pieces, [float(v) for v in l1.sum(axis=0)])


def _nearest(values: np.ndarray, counts: np.ndarray, pick) -> tuple[int, int]:
    """The blocks' nearest edge value (``pick`` of those any entry holds) and how many entries hold it."""
    held = counts > 0
    if not held.any():
        return 0, 0
    value = int(pick(values[held]))
    return value, int(counts[held & (values == value)].sum())


@lru_cache(maxsize=1)
def _count_kernel_compiled():
    if njit is None or os.environ.get("MMER_FUSED", "1") == "0":
        return None
    return njit(parallel=True, cache=True, nogil=True)(_count_kernel)


def available() -> bool:
    """Whether the kernel runs here (numba present, ``MMER_FUSED`` not 0)."""
    return _count_kernel_compiled() is not None


def _count_kernel(base, thetas, half, lo, hi, counts, edges, l1, out, offsets):
    """Counts (``out`` empty) or the strictly-inside patterns into ``out`` at ``offsets`` (second call)."""
    n, numel = thetas.shape
    blocks = (numel + BLOCK - 1) // BLOCK
    mask = np.int32(0x7FFFFFFF)
    fill = out.shape[0] > 0
    for blk in prange(blocks):
        start = blk * BLOCK
        stop = min(start + BLOCK, numel)
        b = _decode(base[start:stop], half)
        tau = np.empty(stop - start, dtype=np.float32)
        for i in range(n):
            th = _decode(thetas[i, start:stop], half)
            for j in range(stop - start):
                tau[j] = th[j] - b[j]
            mags = tau.view(np.int32)
            low, high = lo[i], hi[i]
            if fill:
                if high > low:
                    at = offsets[blk, i]
                    for j in range(stop - start):
                        m = mags[j] & mask
                        if m > low and m < high:
                            out[at] = m
                            at += 1
                continue
            acc = 0.0
            below = 0
            zeros = 0
            at_lo = 0
            at_hi = 0
            strict = 0
            under = np.int32(-1)
            under_n = 0
            over = np.int32(0x7FFFFFFF)
            over_n = 0
            for j in range(stop - start):  # branch-free counts: magnitudes fall either side at random
                acc += abs(tau[j])
                m = mags[j] & mask
                lt = m < low
                gt = m > high
                below += lt
                zeros += m == 0
                at_lo += m == low
                at_hi += m == high
                strict += (m > low) & (m < high)
                below_m = m if lt else np.int32(-1)
                if below_m > under:  # a new largest value below the window: rare after the first few
                    under = below_m
                    under_n = 0
                under_n += lt & (m == under)
                above_m = m if gt else np.int32(0x7FFFFFFF)
                if above_m < over:
                    over = above_m
                    over_n = 0
                over_n += gt & (m == over)
            counts[0, blk, i] = below
            counts[1, blk, i] = zeros if low > 0 else 0
            counts[2, blk, i] = at_lo
            counts[3, blk, i] = at_hi
            counts[4, blk, i] = strict
            counts[5, blk, i] = under_n
            counts[6, blk, i] = over_n
            edges[0, blk, i] = under
            edges[1, blk, i] = over
            l1[blk, i] = acc
