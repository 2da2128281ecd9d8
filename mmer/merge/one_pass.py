"""One pass per entry for the default variant: widen, subtract, trim, elect, disjoint mean, cast, MMER masks, pack.

The eager engine (``slot.merge_slot``) runs each step as its own torch operation over ``[n, chunk]`` float32
buffers: about sixty passes through memory per entry, which on two cores is memory-bandwidth bound at roughly
4.5x the cost of just reading and writing the models. This kernel does the same arithmetic for one entry at a
time in registers, compiled by numba, so the merge costs little more than its reads and writes.

It is an accelerator, not a second engine: it covers exactly one configuration (TIES with unweighted models,
``aggregate="mean"``, global or no trim, any zero-sign rule, MMER masks or either half of them (Table 5's
ablations) on the trimmed task vectors, bf16 or float16 inputs, τ* stored in their dtype or float32) and must
reproduce the eager engine bit for bit; ``tests/merge/test_one_pass.py`` checks it against
``merge_slot`` on random, tied, zero and extreme values. Everything else, and any machine without numba, takes
the eager path. Every float operation is float32 in the same order as torch's: the per-model sum is
sequential over models, trimmed entries are +0.0, and the bf16 cast rounds to nearest even as torch does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from mmer.merge.methods import SignCensus, tie_sign

try:  # numba compiles the kernel; without it (or with MMER_FUSED=0) every chunk takes the eager path
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised on machines without numba
    njit = None
    prange = range

BLOCK = 1 << 14  # entries per parallel work item: a multiple of 8, so each block packs whole mask bytes
HALF_DTYPES = (torch.bfloat16, torch.float16)  # stored as 16-bit patterns; the kernels decode them exactly
_STORE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass
class FusedResult:
    """What ``merge_slots`` needs from one chunk: τ* as stored, packed masks, kept counts and Σ|τᵢ|."""

    stored: torch.Tensor
    packed: list[torch.Tensor]
    ones: list[int]
    l1: list[float]
    pieces: list | None = None  # each model's ``trim.WindowPiece`` when the merge also counted a window


def reads(input_dtypes: Sequence[torch.dtype], device: torch.device) -> bool:
    """Whether the kernels can read these inputs: one half-precision dtype for every model, on the CPU, numba
    present. The threshold pass needs only this; the merge also needs :func:`supports`."""
    return (
        device.type == "cpu"
        and len(set(input_dtypes)) == 1
        and input_dtypes[0] in HALF_DTYPES
        and _kernel() is not None
    )


# What the kernel implements, declared against the registries: its method and mask rules, and for every option
# that method or a rule takes, which values of a variant it computes exactly. An option the registries add to
# ``ties`` or these rules has no entry here until the kernel implements it, so such variants take the eager path.
KERNEL_METHOD = "ties"
KERNEL_MASKS = {"mmer": 0, "sign_only": 1, "magnitude_only": 2}  # rule → the kernel's code for its test
KERNEL_COVERS = {
    "alpha": lambda v: True,
    "weights": lambda v: v.weights is None,
    "k": lambda v: True,
    "trim_scope": lambda v: not v.uses_trim or v.trim_scope == "global",
    "trim_count": lambda v: True,  # the count rule only moves the global threshold, found before the kernel runs
    "zero_sign": lambda v: v.zero_sign != "majority" or v.census is not None,  # majority: once counted
    "elect_on": lambda v: v.elect_on == "raw" or v.weights is None,  # without weights both elect on Σ τᵢ
    "aggregate": lambda v: v.aggregate == "mean",
    "dare": lambda v: v.dare <= 0,
    "dare_seed": lambda v: True,  # read only by DARE, which the kernel never runs
    "common_space": lambda v: True,  # read only by subspace methods, which the kernel never runs
    "iterations": lambda v: True,
    "rank_fraction": lambda v: True,
    "lambda": lambda v: True,
    "mask_source": lambda v: v.mask_source == "trimmed",
}


def supports(variant, input_dtypes: Sequence[torch.dtype], store_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused kernel computes exactly what ``merge_slot`` would for this variant and these dtypes:
    its method and mask rule, and every option they declare (``accepts``) at a value the kernel covers."""
    if variant.method != KERNEL_METHOD or variant.mask not in KERNEL_MASKS:
        return False
    options = variant.merge_method.accepts | variant.rule.accepts
    return (
        reads(input_dtypes, device)
        and all(option in KERNEL_COVERS and KERNEL_COVERS[option](variant) for option in options)
        and store_dtype in (input_dtypes[0], torch.float32)
    )


def merge_chunk(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    variant,
    thresholds: Sequence[float | None] | None,
    store_dtype: torch.dtype,
    window: Sequence[int] | None = None,
) -> FusedResult:
    """Merge one flat chunk of half-precision entries (``base`` and each θᵢ, same length, a multiple of 8 unless
    it ends the tensor). With ``window`` (one magnitude pattern per model) the same pass also counts each τᵢ
    against it, as ``window_pass.window_chunk`` would with ``lo = hi``: the result's ``pieces``."""
    kernel = _kernel()
    n = len(thetas)
    numel = base.numel()
    base_u = _u16(base)
    theta_u = _models_u16(thetas)
    thr = np.zeros(n, dtype=np.float32)
    trim = variant.uses_trim and thresholds is not None
    if trim:
        thr[:] = [t if t is not None else 0.0 for t in thresholds]
    lams = np.array([lam if lam is not None else 0.0 for lam in variant.lambdas], dtype=np.float32)
    lamhalf = lams * np.float32(0.5)  # as the eager rule: a float32 column of λ, times 0.5, in float32
    stored_f = np.empty(numel, dtype=np.float32)
    stored_u = np.empty(numel, dtype=np.uint16)
    packed = np.zeros((n, (numel + 7) // 8), dtype=np.uint8)
    blocks = (numel + BLOCK - 1) // BLOCK
    l1 = np.zeros((blocks, n), dtype=np.float64)
    window_a = np.asarray(window if window is not None else [], dtype=np.int32)
    counts = np.zeros((7, blocks if window is not None else 0, n), dtype=np.int64)
    edges = np.zeros((2, blocks if window is not None else 0, n), dtype=np.int32)
    kernel(
        base_u,
        theta_u,
        thr,
        bool(trim),
        lamhalf,
        np.float32(variant.alpha),
        variant.alpha != 1.0,
        np.float32(tie_sign(variant.zero_sign, variant.majority)),
        KERNEL_MASKS[variant.mask],
        base.dtype == torch.float16,
        _STORE_CODES[store_dtype],
        stored_f,
        stored_u,
        packed,
        l1,
        window_a,
        counts,
        edges,
    )
    if store_dtype in HALF_DTYPES:
        stored = torch.from_numpy(stored_u.view(np.int16)).view(store_dtype)
    else:
        stored = torch.from_numpy(stored_f)
    ones = [int(_POPCOUNT[row].sum()) for row in packed]
    sums = l1.sum(axis=0)  # per-block partials summed in block order: deterministic whatever the threads did
    pieces = None
    if window is not None:
        from mmer.merge.window_pass import pieces as window_pieces

        pieces = window_pieces(numel, counts, edges, [None] * n)
    return FusedResult(stored, [torch.from_numpy(row) for row in packed], ones, [float(s) for s in sums], pieces)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _u16(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _models_u16(thetas: Sequence[torch.Tensor]) -> tuple[np.ndarray, ...]:
    """Every model's chunk as the kernels read it: a tuple of 16-bit pattern arrays, each a view of the model's
    own (mapped) storage, so nothing is copied before a kernel runs (numba indexes a homogeneous tuple)."""
    return tuple(_u16(theta) for theta in thetas)


def _decode_py(bits16, half):
    """16-bit patterns → float32, exactly: bf16 is the high half of a float32; float16 is widened with the
    branch-free bit arithmetic of c10's ``fp16_ieee_to_fp32_value`` (subnormals included)."""
    w = bits16.astype(np.uint32) << np.uint32(16)
    if not half:
        return w.view(np.float32)
    sign = w & np.uint32(0x80000000)
    two_w = w + w
    normalized = ((two_w >> np.uint32(4)) + np.uint32(0x70000000)).view(np.float32) * np.float32(2.0**-112)
    denormalized = ((two_w >> np.uint32(17)) | np.uint32(0x3F000000)).view(np.float32) - np.float32(0.5)
    magnitude = np.where(two_w < np.uint32(1 << 27), denormalized.view(np.uint32), normalized.view(np.uint32))
    return (sign | magnitude).view(np.float32)


def _encode_half_py(values):
    """float32 → float16 patterns, rounded to nearest even, with c10's ``fp16_ieee_from_fp32_value`` arithmetic
    (finite inputs: the fused path only sees finite task vectors)."""
    scaled = (np.abs(values) * np.float32(2.0**112)) * np.float32(2.0**-110)
    w = values.view(np.uint32)
    shl1_w = w + w
    sign = w & np.uint32(0x80000000)
    bias = np.maximum(shl1_w & np.uint32(0xFF000000), np.uint32(0x71000000))
    scaled = ((bias >> np.uint32(1)) + np.uint32(0x07800000)).view(np.float32) + scaled
    bits = scaled.view(np.uint32)
    nonsign = ((bits >> np.uint32(13)) & np.uint32(0x00007C00)) + (bits & np.uint32(0x00000FFF))
    special = np.where(shl1_w > np.uint32(0xFF000000), np.uint32(0x7E00), nonsign)
    return ((sign >> np.uint32(16)) | special).astype(np.uint16)


def _trimmed_py(t, threshold, trim):
    """τ as the global trim leaves it, the one rule both kernels apply: +0.0 unless |τ| ≥ the model's
    threshold (the eager engine's ``where(|τ| ≥ thr, τ, 0)``; a NaN |τ| is trimmed too)."""
    if trim and not (abs(t) >= threshold):
        return np.float32(0.0)
    return t


_trimmed = _trimmed_py
if njit is not None:
    _decode = njit(cache=True, nogil=True)(_decode_py)
    _encode_half = njit(cache=True, nogil=True)(_encode_half_py)
    _trimmed = njit(inline="always", cache=True)(_trimmed_py)


@lru_cache(maxsize=1)
def _kernel():
    """The compiled kernel, or None without numba (or with ``MMER_FUSED=0``): callers then take the eager path."""
    if njit is None or os.environ.get("MMER_FUSED", "1") == "0":
        return None
    return njit(parallel=True, cache=True, nogil=True)(_merge_kernel)


def _merge_kernel(
    base,
    thetas,
    thr,
    trim,
    lamhalf,
    alpha,
    scale,
    tie,
    rule,
    half,
    store,
    stored_f,
    stored_u,
    packed,
    l1,
    window,
    counts,
    edges,
):
    n = len(thetas)
    numel = base.shape[0]
    blocks = (numel + BLOCK - 1) // BLOCK
    counting = window.shape[0] > 0  # also count each τᵢ against the one-magnitude window ``window[i]``
    mask = np.int32(0x7FFFFFFF)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    # tie: γ where Σ τᵢ = 0 (methods.tie_sign); rule: KERNEL_MASKS' code, 0 = both tests, 1 = sign, 2 = magnitude.
    # Every loop below runs over the block's entries with the models outside, so each is a straight vector loop;
    # per entry the float operations are still the eager engine's, in its order.
    for blk in prange(blocks):
        start = blk * BLOCK
        stop = min(start + BLOCK, numel)
        size = stop - start
        b = _decode(base[start:stop], half)
        tr = np.empty((n, size), dtype=np.float32)
        mags = np.empty(size if counting else 0, dtype=np.int32)
        for i in range(n):
            th = _decode(thetas[i][start:stop], half)
            row = tr[i]
            for j in range(size):
                row[j] = th[j] - b[j]
            l1[blk, i] = _l1(row)
            if counting:
                bits = row.view(np.int32)
                for j in range(size):
                    mags[j] = bits[j] & mask
                _count_window(mags, window[i], window[i], counts, edges, blk, i)
            if trim:
                t_i = thr[i]
                for j in range(size):
                    row[j] = _trimmed(row[j], t_i, True)
        # Branch-free selects (random signs would mispredict every branch): a·x with a ∈ {0, 1} is x or ±0, and
        # adding ±0 to the running sum changes nothing, so the sums equal the eager where-sums.
        s = tr[0].copy()
        for i in range(1, n):
            row = tr[i]
            for j in range(size):
                s[j] = s[j] + row[j]
        gamma = np.empty(size, dtype=np.float32)
        for j in range(size):
            g = np.float32(s[j] > zero) - np.float32(s[j] < zero)
            gamma[j] = g + tie * np.float32(g == zero)
        total = np.zeros(size, dtype=np.float32)
        count = np.zeros(size, dtype=np.float32)
        for i in range(n):
            row = tr[i]
            for j in range(size):
                x = row[j]
                agree = np.float32(x * gamma[j] > zero)
                total[j] = total[j] + agree * x
                count[j] = count[j] + agree
        tau = np.empty(size, dtype=np.float32)
        for j in range(size):
            tau[j] = total[j] / max(count[j], one)
        if scale:
            for j in range(size):
                tau[j] = tau[j] * alpha
        if store == 1:  # bf16, rounded to nearest even as torch does
            bits = tau.view(np.uint32)
            one16 = np.uint32(1)
            rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & one16)) >> np.uint32(16)).astype(
                np.uint16
            )
            stored_u[start:stop] = rounded
            eff = _decode(rounded, False)
        elif store == 2:  # float16
            rounded = _encode_half(tau)
            stored_u[start:stop] = rounded
            eff = _decode(rounded, True)
        else:
            stored_f[start:stop] = tau
            eff = tau
        sign = np.empty(size, dtype=np.float32)
        magnitude = np.empty(size, dtype=np.float32)
        for j in range(size):
            sign[j] = np.float32(eff[j] > zero) - np.float32(eff[j] < zero)
            magnitude[j] = abs(eff[j])
        padded = (size + 7) // 8 * 8
        kept = np.zeros(padded, dtype=np.uint8)
        for i in range(n):
            lam = lamhalf[i]
            row = tr[i]
            if rule == 0:
                for j in range(size):
                    u = row[j] * sign[j]
                    kept[j] = (u > zero) & (u >= lam * magnitude[j])
            elif rule == 1:
                for j in range(size):
                    kept[j] = row[j] * sign[j] > zero
            else:
                for j in range(size):
                    kept[j] = (magnitude[j] > zero) & (abs(row[j]) >= lam * magnitude[j])
            _pack(kept, packed[i, start >> 3 : (start >> 3) + padded // 8])


def _l1_py(values):
    """Σ|v| in float64 over eight running sums (one sequential sum is bound by the adder's latency)."""
    sums = np.zeros(8, dtype=np.float64)
    full = values.shape[0] // 8 * 8
    for j in range(0, full, 8):
        for k in range(8):
            sums[k] += abs(values[j + k])
    for j in range(full, values.shape[0]):
        sums[0] += abs(values[j])
    return ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]))


def _pack_py(kept, out):
    """0/1 bytes → bits, eight at a time, entry k of each group in bit k (``bits.pack``'s little bit order): the
    product with 0x0102040810204080 gathers the eight low bits into the top byte without carries."""
    words = kept.view(np.uint64)
    for w in range(out.shape[0]):
        out[w] = np.uint8((words[w] * np.uint64(0x0102040810204080)) >> np.uint64(56))


def _count_window_py(mags, low, high, counts, edges, blk, i):
    """One model's :class:`~mmer.merge.trim.WindowPiece` counts over magnitude patterns ``mags`` against the window
    ``[low, high]``, stored at block ``blk``, model ``i`` of ``counts`` (below, zeros (0 when ``low`` is 0: they
    are then the entries at ``low``), at each edge, strictly inside, the nearest patterns' ties) and ``edges`` (the
    nearest pattern either side): one layout, written by the threshold pass and by a merge that counts alike.
    Branch-free sums and extremes (magnitudes fall either side at random), each a vector loop; the nearest values'
    ties are counted in a second loop."""
    below = 0
    zeros = 0
    at_lo = 0
    at_hi = 0
    strict = 0
    under = np.int32(-1)
    over = np.int32(0x7FFFFFFF)
    for j in range(mags.shape[0]):
        m = mags[j]
        lt = m < low
        gt = m > high
        below += lt
        zeros += m == 0
        at_lo += m == low
        at_hi += m == high
        strict += (m > low) & (m < high)
        under = max(under, m if lt else np.int32(-1))
        over = min(over, m if gt else np.int32(0x7FFFFFFF))
    under_n = 0
    over_n = 0
    for j in range(mags.shape[0]):
        m = mags[j]
        under_n += (m < low) & (m == under)
        over_n += (m > high) & (m == over)
    counts[0, blk, i] = below
    counts[1, blk, i] = zeros if low > 0 else 0
    counts[2, blk, i] = at_lo
    counts[3, blk, i] = at_hi
    counts[4, blk, i] = strict
    counts[5, blk, i] = under_n
    counts[6, blk, i] = over_n
    edges[0, blk, i] = under
    edges[1, blk, i] = over


_l1 = _l1_py
_pack = _pack_py
_count_window = _count_window_py
if njit is not None:
    _l1 = njit(inline="always", cache=True)(_l1_py)
    _pack = njit(inline="always", cache=True)(_pack_py)
    _count_window = njit(inline="always", cache=True)(_count_window_py)


# ---------------------------------------------------------------------------------------------- sign census
def counts_signs(variant) -> bool:
    """Whether :func:`census_chunk` counts exactly what ``slot.count_signs`` would for this variant: TIES electing
    on Σ τᵢ (unweighted, or on raw sums), over task vectors trimmed at global thresholds or not at all, no DARE."""
    return (
        variant.method == KERNEL_METHOD
        and KERNEL_COVERS["elect_on"](variant)
        and KERNEL_COVERS["trim_scope"](variant)
        and variant.dare <= 0
    )


def census_chunk(
    base: torch.Tensor, thetas: Sequence[torch.Tensor], thresholds: Sequence[float | None] | None
) -> tuple[SignCensus, list[float]]:
    """The elected signs' census of one flat half-precision chunk (γ = sgn(Σ trimmed τᵢ), summed in the merge
    kernel's order), and each model's Σ|τᵢ| so the caller can tell a non-finite τᵢ (then the eager path counts)."""
    kernel = _census_kernel()
    n, numel = len(thetas), base.numel()
    thr = np.zeros(n, dtype=np.float32)
    if thresholds is not None:
        thr[:] = [t if t is not None else 0.0 for t in thresholds]
    blocks = (numel + BLOCK - 1) // BLOCK
    counts = np.zeros((blocks, 2), dtype=np.int64)
    l1 = np.zeros((blocks, n), dtype=np.float64)
    kernel(_u16(base), _models_u16(thetas), thr, thresholds is not None, base.dtype == torch.float16, counts, l1)
    totals = counts.sum(axis=0)
    return SignCensus(int(totals[0]), int(totals[1])), [float(v) for v in l1.sum(axis=0)]


@lru_cache(maxsize=1)
def _census_kernel():
    if njit is None or os.environ.get("MMER_FUSED", "1") == "0":
        return None
    return njit(parallel=True, cache=True, nogil=True)(_sign_count_kernel)


def _sign_count_kernel(base, thetas, thr, trim, half, counts, l1):
    n = len(thetas)
    numel = base.shape[0]
    blocks = (numel + BLOCK - 1) // BLOCK
    zero = np.float32(0.0)
    for blk in prange(blocks):
        start = blk * BLOCK
        stop = min(start + BLOCK, numel)
        size = stop - start
        b = _decode(base[start:stop], half)
        sums = np.empty(size, dtype=np.float32)
        for i in range(n):
            th = _decode(thetas[i][start:stop], half)
            acc = 0.0
            for j in range(size):
                t = th[j] - b[j]
                acc += abs(t)
                t = _trimmed(t, thr[i], trim)
                # model 0 starts the sum as the merge kernel's s = tr[0] does; then sequential over models
                sums[j] = t if i == 0 else sums[j] + t
            l1[blk, i] = acc
        positive = 0
        negative = 0
        for j in range(size):
            positive += sums[j] > zero
            negative += sums[j] < zero
        counts[blk, 0] = positive
        counts[blk, 1] = negative
