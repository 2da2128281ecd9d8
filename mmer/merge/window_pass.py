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

from mmer.merge.one_pass import BLOCK, _count_window, _decode, _l1, _models_u16, _u16, njit, prange
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
    theta_u = _models_u16(thetas)
    base_u = _u16(base)
    half = base.dtype == torch.float16
    lo_a = np.asarray(lo, dtype=np.int32)
    hi_a = np.asarray(hi, dtype=np.int32)
    blocks = (numel + BLOCK - 1) // BLOCK
    counts = np.zeros((7, blocks, n), dtype=np.int64)  # below, zeros, at_lo, at_hi, strict, under_n, over_n
    edges = np.zeros((2, blocks, n), dtype=np.int32)  # under, over
    l1 = np.zeros((blocks, n), dtype=np.float64)
    # Each block writes the patterns strictly inside a window at its own offset in ``inside`` (one pass; a block
    # holds at most its own entries), then they are packed in block order.
    wide = bool((hi_a > lo_a).any())
    inside = np.empty((n, numel) if wide else (n, 0), dtype=np.int32)
    kernel(base_u, theta_u, half, lo_a, hi_a, counts, edges, l1, inside)
    strict = counts[4]
    totals = strict.sum(axis=0)
    candidates: list[torch.Tensor | None] = [None] * n
    for i in range(n):
        if totals[i]:
            flat = np.empty(int(totals[i]), dtype=np.int32)
            _gather(inside[i], strict[:, i], flat)
            candidates[i] = torch.from_numpy(flat)
    return WindowCounts(pieces(numel, counts, edges, candidates), [float(v) for v in l1.sum(axis=0)])


def pieces(
    numel: int, counts: np.ndarray, edges: np.ndarray, candidates: Sequence[torch.Tensor | None]
) -> list[WindowPiece]:
    """Each model's piece from its per-block counts (``[7, blocks, n]``: below, zeros, at_lo, at_hi, strict,
    under_n, over_n), nearest patterns (``[2, blocks, n]``: under, over) and candidates."""
    out = []
    for i in range(counts.shape[2]):
        sums = counts[:, :, i].sum(axis=1)
        under, under_n = _nearest(edges[0, :, i], counts[5, :, i], max)
        over, over_n = _nearest(edges[1, :, i], counts[6, :, i], min)
        out.append(
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
    return out


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


def _gather_py(inside, per_block, out):
    """Each block's leading ``per_block`` patterns of ``inside``, concatenated in block order into ``out``."""
    at = 0
    for blk in range(per_block.shape[0]):
        count = per_block[blk]
        out[at : at + count] = inside[blk * BLOCK : blk * BLOCK + count]
        at += count


_gather = _gather_py if njit is None else njit(cache=True, nogil=True)(_gather_py)


def available() -> bool:
    """Whether the kernel runs here (numba present, ``MMER_FUSED`` not 0)."""
    return _count_kernel_compiled() is not None


def _count_kernel(base, thetas, half, lo, hi, counts, edges, l1, inside):
    """Each model's counts per block, and the patterns strictly inside a window into ``inside`` at the block's
    own offset (empty when no window has an inside)."""
    n = len(thetas)
    numel = base.shape[0]
    blocks = (numel + BLOCK - 1) // BLOCK
    mask = np.int32(0x7FFFFFFF)
    for blk in prange(blocks):
        start = blk * BLOCK
        stop = min(start + BLOCK, numel)
        size = stop - start
        b = _decode(base[start:stop], half)
        tau = np.empty(size, dtype=np.float32)
        mags = np.empty(size, dtype=np.int32)
        for i in range(n):
            th = _decode(thetas[i][start:stop], half)
            for j in range(size):
                tau[j] = th[j] - b[j]
            bits = tau.view(np.int32)
            for j in range(size):
                mags[j] = bits[j] & mask
            low, high = lo[i], hi[i]
            if high > low:  # branch-free compaction: every entry is written, the kept ones advance
                row = inside[i, start:stop]
                at = 0
                for j in range(size):
                    m = mags[j]
                    row[at] = m
                    at += (m > low) & (m < high)
            _count_window(mags, low, high, counts, edges, blk, i)
            l1[blk, i] = _l1(tau)
