"""One pass per entry for a switch: θ_base, τ* and the packed mask bit in, the live weight in the base's dtype out.

``mmer.merge.masks.rebuild_weight`` as torch runs it makes about six full-size temporaries per tensor (the mask
unpacked to bool, τ* and θ_base widened to float32, the select, the sum, the cast), so a switch moves several
times the bytes it must: read θ_base, τ* and one bit per entry, write the live weight. This kernel does the same
float32 arithmetic for one entry at a time in registers, compiled by numba with the conventions of
``mmer.merge.one_pass`` (blocks of ``BLOCK`` entries in parallel, half-precision patterns decoded and rounded
with the same branch-free bit arithmetic, compiled once and cached on disk).

It is an accelerator, not a second formula: for every entry it computes
``cast(float32(base) + s·where(bit, float32(τ*), +0.0))`` in the order ``rebuild_weight`` does (the select gives
+0.0, so a masked-out −0.0 base becomes +0.0 exactly as torch's sum makes it; multiplying by s = 1, which
``rebuild_weight`` skips, changes no finite value, so the loop has no branch for it), and
``tests/route/test_switch_kernel.py`` checks it bit for bit against ``rebuild_weight`` on random, tied and
extreme values. It covers CPU tensors with a bf16, float16 or float32 base and τ* in the base's dtype or
float32; anything else, any machine without numba, and ``MMER_FUSED=0`` take the torch path, which stays the
reference. NaN inputs are outside its contract (a checkpoint that rebuilds to a non-finite weight is refused at
load unless it was merged with ``--allow-nonfinite``): a NaN comes out a NaN, not necessarily torch's pattern.

Expansion mode's text weights θ_base + m̄∘τ* (``mmer.route.weights.rebuild_mean_weight``) have a kernel of their
own in the same style, reading every modality's packed mask: a switch to them costs a switch, not a torch
rebuild with a float32 temporary per mask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from mmer.merge.one_pass import BLOCK, njit, prange

CHUNK = 2048  # entries whose mask bits are spread at a time (a multiple of 8 that divides BLOCK)
# byte → its 8 bits as 8 bytes of 0 or 1, little bit order (bit k of the byte is byte k of the word)
_SPREAD = np.array([sum(((b >> k) & 1) << (8 * k) for k in range(8)) for b in range(256)], dtype=np.uint64)
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # how the kernel reads and writes each dtype


def supports(base: torch.Tensor, tau: torch.Tensor, packed: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the kernel computes exactly what ``rebuild_weight`` would for these tensors: all on the CPU, the
    base (and ``out``) bf16, float16 or float32, τ* in the base's dtype or float32, ``out`` contiguous."""
    return (
        base.dtype in _CODES
        and tau.dtype in (base.dtype, torch.float32)
        and out.dtype == base.dtype
        and all(t.device.type == "cpu" for t in (base, tau, packed, out))
        and out.is_contiguous()
        and packed.dtype == torch.uint8
        and base.numel() == tau.numel() == out.numel()
        and packed.numel() == (base.numel() + 7) // 8
        and _kernel() is not None
    )


def rebuild_into(
    out: torch.Tensor, base: torch.Tensor, tau: torch.Tensor, packed: torch.Tensor, scale: float
) -> tuple[float, float]:
    """Write θ_base + s·m∘τ* into ``out`` (contiguous, the base's dtype and shape), the mask given as packed bits
    (``mmer.checkpoint.bits``: entry p is bit p % 8 of byte p // 8). Callers check :func:`supports` first.

    Returns max|θ_base| and max|τ*| over every entry (as ``mmer.merge.overflow.max_abs`` gives them: inf for ±inf,
    NaN for NaN), gathered from the values the pass loads anyway: a router's first switch proves the load's
    rebuilds finite with them instead of reading θ_base and τ* a second time."""
    tops = _kernel()(
        _flat(base),
        _flat(tau),
        packed.numpy(),
        _flat(out),
        _CODES[base.dtype],
        _CODES[tau.dtype],
        np.float32(scale),
    )
    return _magnitude(int(tops[0]), base.dtype), _magnitude(int(tops[1]), tau.dtype)


def rebuild_many(
    jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]],
) -> list[tuple[float, float]]:
    """:func:`rebuild_into` for many tensors, ``(out, base, tau, packed, scale)`` each, in one parallel pass.

    A switch rewrites hundreds of tensors; one call per tensor starts and joins the threads that often, leaves
    them waiting while Python prepares the next call, and cannot share a small tensor's few blocks between
    them. Here the blocks of every tensor form one work list that the threads split, and each tensor's entries
    are computed exactly as :func:`rebuild_into` computes them. Every job must pass :func:`supports` with
    ``base``, ``tau`` and ``packed`` contiguous; the tensors must stay alive during the call (it reads them by
    address). Returns each job's maxima as :func:`rebuild_into` does.
    """
    results: list[tuple[float, float]] = [(0.0, 0.0)] * len(jobs)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, base, tau, _, _) in enumerate(jobs):
        groups.setdefault((_CODES[base.dtype], _CODES[tau.dtype]), []).append(i)
    for (base_code, tau_code), members in groups.items():
        addresses = np.array(
            [
                [jobs[i][1].data_ptr(), jobs[i][2].data_ptr(), jobs[i][3].data_ptr(), jobs[i][0].data_ptr()]
                for i in members
            ],
            dtype=np.int64,
        ).reshape(-1, 4)
        numels = np.array([jobs[i][0].numel() for i in members], dtype=np.int64)
        scales = np.array([jobs[i][4] for i in members], dtype=np.float32)
        first_block = np.zeros(len(members) + 1, dtype=np.int64)
        np.cumsum((numels + BLOCK - 1) // BLOCK, out=first_block[1:])
        tops = _many_kernel()(addresses, numels, scales, first_block, base_code, tau_code)
        for k, i in enumerate(members):
            base, tau = jobs[i][1], jobs[i][2]
            results[i] = (_magnitude(int(tops[0, k]), base.dtype), _magnitude(int(tops[1, k]), tau.dtype))
    return results


def supports_mean(base: torch.Tensor, tau: torch.Tensor, packed: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
    """:func:`supports` for the text weights θ_base + m̄∘τ*: every modality's packed mask fits, at least one."""
    return bool(packed) and all(supports(base, tau, p, out) for p in packed)


def rebuild_mean_into(
    out: torch.Tensor, base: torch.Tensor, tau: torch.Tensor, packed: Sequence[torch.Tensor], scales: Sequence[float]
) -> None:
    """Write θ_base + m̄∘τ* with m̄ = (Σᵢ sᵢ·mᵢ)/n into ``out``: ``mmer.route.weights.rebuild_mean_weight`` bit for
    bit (the same float32 sum of the rescalers in modality order, the division by n, then τ*'s product and the
    base's sum, each rounded once), from the packed masks. Callers check :func:`supports_mean` first."""
    stacked = torch.stack([p.reshape(-1) for p in packed]).numpy()
    _mean_kernel()(
        _flat(base),
        _flat(tau),
        stacked,
        np.asarray(scales, dtype=np.float32),
        _flat(out),
        _CODES[base.dtype],
        _CODES[tau.dtype],
    )


def _magnitude(pattern: int, dtype: torch.dtype) -> float:
    """The float whose bit pattern (sign cleared) is ``pattern``, in ``dtype``."""
    signed = torch.int32 if dtype == torch.float32 else torch.int16
    return float(torch.tensor([pattern], dtype=signed).view(dtype)[0])


def _flat(t: torch.Tensor) -> np.ndarray:
    """The tensor's entries as a flat array the kernel reads: 16-bit patterns for halves, float32 otherwise."""
    flat = t.reshape(-1)
    if t.dtype == torch.float32:
        return flat.numpy()
    return flat.view(torch.int16).numpy().view(np.uint16)


@lru_cache(maxsize=1)
def _kernel():
    """The compiled kernel, or None without numba (or with ``MMER_FUSED=0``): callers then take the torch path."""
    if njit is None or os.environ.get("MMER_FUSED", "1") == "0":
        return None
    return njit(parallel=True, cache=True, nogil=True)(_rebuild_kernel)


@lru_cache(maxsize=1)
def _many_kernel():
    """The compiled many-tensor kernel, or None where :func:`_kernel` is None."""
    if _kernel() is None:
        return None
    return njit(parallel=True, cache=True, nogil=True)(_rebuild_many_kernel)


@lru_cache(maxsize=1)
def _mean_kernel():
    """The compiled text-weight kernel, or None where :func:`_kernel` is None."""
    if _kernel() is None:
        return None
    return njit(parallel=True, cache=True, nogil=True)(_rebuild_mean_kernel)


# Scalar reinterpretations between float32 and its bit pattern (LLVM bitcasts: free, and the loops stay vectorisable).
if njit is not None:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _f32(typingctx, u):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def _u32(typingctx, f):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    def _pointer(element):
        """An intrinsic reading an int64 address as a pointer to ``element`` (for ``numba.carray``)."""

        @intrinsic
        def pointer(typingctx, address):
            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

            return types.CPointer(element)(types.int64), codegen

        return pointer

    _u8_at = _pointer(types.uint8)
    _u16_at = _pointer(types.uint16)
    _f32_at = _pointer(types.float32)
    from numba import carray


def _load(x, code):
    """One stored entry as float32: float32 as is; bf16 is the high half of a float32; float16 widened with c10's
    branch-free ``fp16_ieee_to_fp32_value`` (subnormals included), as ``one_pass._decode`` does per block."""
    if code == 0:
        return np.float32(x)
    w = np.uint32(x) << np.uint32(16)
    if code == 1:
        return _f32(w)
    sign = w & np.uint32(0x80000000)
    two_w = np.uint32(w + w)  # numba widens uint32 sums to 64 bits: wrap as C does
    normalized = _f32(np.uint32((two_w >> np.uint32(4)) + np.uint32(0x70000000))) * np.float32(2.0**-112)
    denormalized = _f32((two_w >> np.uint32(17)) | np.uint32(0x3F000000)) - np.float32(0.5)
    magnitude = _u32(denormalized) if two_w < np.uint32(1 << 27) else _u32(normalized)
    return _f32(sign | magnitude)


def _store(out, p, value, code):
    """Write one float32 result in the base's dtype: bf16 and float16 rounded to nearest even as torch rounds them
    (bf16 by c10's bias trick, float16 by ``fp16_ieee_from_fp32_value``, as ``one_pass._encode_half``)."""
    if code == 0:
        out[p] = value
        return
    w = _u32(value)
    if code == 1:
        out[p] = np.uint16((w + np.uint32(0x7FFF) + ((w >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return
    scaled = (abs(value) * np.float32(2.0**112)) * np.float32(2.0**-110)
    shl1_w = np.uint32(w + w)
    sign = w & np.uint32(0x80000000)
    bias = max(shl1_w & np.uint32(0xFF000000), np.uint32(0x71000000))
    scaled = _f32(np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000))) + scaled
    b = _u32(scaled)
    nonsign = np.uint32(((b >> np.uint32(13)) & np.uint32(0x00007C00)) + (b & np.uint32(0x00000FFF)))
    special = np.uint32(0x7E00) if shl1_w > np.uint32(0xFF000000) else nonsign
    out[p] = np.uint16((sign >> np.uint32(16)) | special)


def _span(base, tau, packed, out, start, stop, base_code, tau_code, scale):
    """Entries ``[start, stop)`` (``start`` a multiple of 8); inlined with constant codes, so each dtype pair
    compiles to its own loop. Each chunk's mask bytes are first spread to one 0/1 byte per entry (a table
    lookup per byte): a loop that reads bit p % 8 of byte p // 8 itself does not vectorise. Returns the largest
    magnitude patterns of θ_base and τ* in the span (:func:`_pattern`)."""
    ones = np.empty(CHUNK, dtype=np.uint8)
    wide = ones.view(np.uint64)
    base_top = _pattern(base[start])
    tau_top = _pattern(tau[start])
    for first in range(start, stop, CHUNK):
        last = min(first + CHUNK, stop)
        byte = first >> 3
        for i in range((last - first + 7) >> 3):
            wide[i] = _SPREAD[packed[byte + i]]
        b = base[first:last]
        t = tau[first:last]
        o = out[first:last]
        for j in range(last - first):
            top = _pattern(b[j])
            base_top = top if top > base_top else base_top
            top = _pattern(t[j])
            tau_top = top if top > tau_top else tau_top
            # all ones where the bit is set, else 0: τ* itself or +0.0 (torch.where's zero, never τ*·0 = −0.0)
            keep = np.uint32(np.uint32(0) - np.uint32(ones[j]))
            delta = _f32(_u32(_load(t[j], tau_code)) & keep) * scale  # x·1.0 is x exactly: no branch for s = 1
            _store(o, j, _load(b[j], base_code) + delta, base_code)
    return base_top, tau_top


def _pattern(x):
    """A stored entry's bit pattern without its sign: magnitudes order as these (NaN's above inf's).

    Typed by the array it comes from (a 16-bit pattern for a half, 32 bits for a float32), so the running
    maxima are 16-bit lanes for halves: a maximum widened to 64 bits (numba's ``max`` of two integers) doubles
    the vector work of the whole loop."""
    if isinstance(x, np.floating):
        return int(np.float32(x).view(np.uint32)) & 0x7FFFFFFF
    return int(x) & 0x7FFF


if njit is not None:
    from numba.extending import overload

    @overload(_pattern, inline="always")
    def _pattern_typed(x):
        if isinstance(x, types.Float):
            return lambda x: _u32(np.float32(x)) & np.uint32(0x7FFFFFFF)
        return lambda x: np.uint16(x & np.uint16(0x7FFF))


def _mean_span(base, tau, packed, scales, out, start, stop, base_code, tau_code):
    """:func:`_span` for the text weights: each entry's Σᵢ sᵢ·bitᵢ in float32 (in modality order; a clear bit
    adds ±0, which changes no sum that starts at +0), divided by n, times τ*, plus θ_base."""
    n = packed.shape[0]
    count = np.float32(n)
    ones = np.empty((n, CHUNK), dtype=np.uint8)
    wide = ones.view(np.uint64)
    weight = np.empty(CHUNK, dtype=np.float32)
    for first in range(start, stop, CHUNK):
        last = min(first + CHUNK, stop)
        byte = first >> 3
        for m in range(n):
            for i in range((last - first + 7) >> 3):
                wide[m, i] = _SPREAD[packed[m, byte + i]]
        for j in range(last - first):
            weight[j] = np.float32(0.0)
        for m in range(n):
            scale = scales[m]
            for j in range(last - first):
                # s where the bit is set, else +0.0: the bitwise select keeps the loop branch-free
                keep = np.uint32(np.uint32(0) - np.uint32(ones[m, j]))
                weight[j] = weight[j] + _f32(_u32(scale) & keep)
        b = base[first:last]
        t = tau[first:last]
        o = out[first:last]
        for j in range(last - first):
            mean = weight[j] / count
            _store(o, j, _load(b[j], base_code) + mean * _load(t[j], tau_code), base_code)


def _rebuild_mean_kernel(base, tau, packed, scales, out, base_code, tau_code):
    numel = out.shape[0]
    blocks = (numel + BLOCK - 1) // BLOCK
    for blk in prange(blocks):
        start = blk * BLOCK
        stop = min(start + BLOCK, numel)
        if base_code == 1 and tau_code == 1:
            _mean_span(base, tau, packed, scales, out, start, stop, 1, 1)
        elif base_code == 1:
            _mean_span(base, tau, packed, scales, out, start, stop, 1, 0)
        elif base_code == 2 and tau_code == 2:
            _mean_span(base, tau, packed, scales, out, start, stop, 2, 2)
        elif base_code == 2:
            _mean_span(base, tau, packed, scales, out, start, stop, 2, 0)
        else:
            _mean_span(base, tau, packed, scales, out, start, stop, 0, 0)


if njit is not None:
    _load = njit(inline="always", cache=True)(_load)
    _store = njit(inline="always", cache=True)(_store)
    _span = njit(inline="always", cache=True)(_span)
    _mean_span = njit(inline="always", cache=True)(_mean_span)


def _rebuild_kernel(base, tau, packed, out, base_code, tau_code, scale):
    numel = out.shape[0]
    blocks = (numel + BLOCK - 1) // BLOCK
    tops = np.zeros((2, blocks), dtype=np.uint32)
    for blk in prange(blocks):
        start = blk * BLOCK
        stop = min(start + BLOCK, numel)
        if base_code == 1 and tau_code == 1:
            top = _span(base, tau, packed, out, start, stop, 1, 1, scale)
        elif base_code == 1:
            top = _span(base, tau, packed, out, start, stop, 1, 0, scale)
        elif base_code == 2 and tau_code == 2:
            top = _span(base, tau, packed, out, start, stop, 2, 2, scale)
        elif base_code == 2:
            top = _span(base, tau, packed, out, start, stop, 2, 0, scale)
        else:
            top = _span(base, tau, packed, out, start, stop, 0, 0, scale)
        tops[0, blk] = top[0]
        tops[1, blk] = top[1]
    result = np.zeros(2, dtype=np.uint32)
    for blk in range(blocks):
        result[0] = max(result[0], tops[0, blk])
        result[1] = max(result[1], tops[1, blk])
    return result


def _rebuild_many_kernel(addresses, numels, scales, first_block, base_code, tau_code):
    """Blocks ``first_block[i]`` to ``first_block[i + 1]`` of the work list are tensor i's (``addresses[i]``: base,
    τ*, packed mask, out); each block is :func:`_span` of its entries, its maxima kept per block and then
    gathered per tensor. The branches pick how the addresses are read for each dtype pair."""
    count = numels.shape[0]
    total = first_block[count]
    block_tops = np.zeros((2, total), dtype=np.uint32)
    for work in prange(total):
        i = np.searchsorted(first_block, work, side="right") - 1
        numel = numels[i]
        start = (work - first_block[i]) * BLOCK
        stop = min(start + BLOCK, numel)
        packed = carray(_u8_at(addresses[i, 2]), (numel + 7) // 8)
        if base_code == 0:
            base32 = carray(_f32_at(addresses[i, 0]), numel)
            tau32 = carray(_f32_at(addresses[i, 1]), numel)
            out32 = carray(_f32_at(addresses[i, 3]), numel)
            top = _span(base32, tau32, packed, out32, start, stop, 0, 0, scales[i])
            block_tops[0, work] = top[0]
            block_tops[1, work] = top[1]
        elif tau_code == 0:
            base16 = carray(_u16_at(addresses[i, 0]), numel)
            tau32 = carray(_f32_at(addresses[i, 1]), numel)
            out16 = carray(_u16_at(addresses[i, 3]), numel)
            if base_code == 1:
                top = _span(base16, tau32, packed, out16, start, stop, 1, 0, scales[i])
            else:
                top = _span(base16, tau32, packed, out16, start, stop, 2, 0, scales[i])
            block_tops[0, work] = top[0]
            block_tops[1, work] = top[1]
        else:
            base16 = carray(_u16_at(addresses[i, 0]), numel)
            tau16 = carray(_u16_at(addresses[i, 1]), numel)
            out16 = carray(_u16_at(addresses[i, 3]), numel)
            if base_code == 1:
                top = _span(base16, tau16, packed, out16, start, stop, 1, 1, scales[i])
            else:
                top = _span(base16, tau16, packed, out16, start, stop, 2, 2, scales[i])
            block_tops[0, work] = top[0]
            block_tops[1, work] = top[1]
    tops = np.zeros((2, count), dtype=np.uint32)
    for i in range(count):
        for work in range(first_block[i], first_block[i + 1]):
            tops[0, i] = max(tops[0, i], block_tops[0, work])
            tops[1, i] = max(tops[1, i], block_tops[1, work])
    return tops
