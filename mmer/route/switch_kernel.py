"""One pass per entry for a switch: θ_base, τ* and the packed mask bit in, the live weight in the base's dtype out.

``mmer.merge.masks.rebuild_weight`` as torch runs it makes about six full-size temporaries per tensor (the mask
unpacked to bool, τ* and θ_base widened to float32, the select, the sum, the cast), so a switch moves several
times the bytes it must: read θ_base, τ* and one bit per entry, write the live weight. This kernel does the same
float32 arithmetic for one entry at a time in registers, compiled by numba with the conventions of
``mmer.merge.one_pass`` (blocks of ``BLOCK`` entries in parallel, half-precision patterns decoded and rounded
with the same branch-free bit arithmetic, compiled once and cached on disk).

It is an accelerator, not a second formula: for every entry it computes
``cast(float32(base) + s·where(bit, float32(τ*), +0.0))`` in the order ``rebuild_weight`` does (the select gives
+0.0, so a masked-out −0.0 base becomes +0.0 exactly as torch's sum makes it; s multiplies only when s ≠ 1), and
``tests/route/test_switch_kernel.py`` checks it bit for bit against ``rebuild_weight`` on random, tied and
extreme values. It covers CPU tensors with a bf16, float16 or float32 base and τ* in the base's dtype or
float32; anything else, any machine without numba, and ``MMER_FUSED=0`` take the torch path, which stays the
reference. NaN inputs are outside its contract (a checkpoint that rebuilds to a non-finite weight is refused at
load unless it was merged with ``--allow-nonfinite``): a NaN comes out a NaN, not necessarily torch's pattern.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

from mmer.merge.one_pass import BLOCK, njit, prange

if njit is not None:
    from mmer.merge.one_pass import _decode, _encode_half

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


def rebuild_into(out: torch.Tensor, base: torch.Tensor, tau: torch.Tensor, packed: torch.Tensor, scale: float) -> None:
    """Write θ_base + s·m∘τ* into ``out`` (contiguous, the base's dtype and shape), the mask given as packed bits
    (``mmer.checkpoint.bits``: entry p is bit p % 8 of byte p // 8). Callers check :func:`supports` first."""
    _kernel()(
        _flat(base),
        _flat(tau),
        packed.numpy(),
        _flat(out),
        _CODES[base.dtype],
        _CODES[tau.dtype],
        np.float32(scale),
        scale != 1.0,
    )


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


def _widen(src, code):
    """A block of entries as float32: a float32 block copied, a half block decoded exactly."""
    if code == 0:
        out = np.empty(src.shape[0], dtype=np.float32)
        for j in range(src.shape[0]):
            out[j] = src[j]
        return out
    return _decode(src, code == 2)


if njit is not None:
    _widen = njit(cache=True, nogil=True)(_widen)


def _rebuild_kernel(base, tau, packed, out, base_code, tau_code, scale, scaled):
    numel = out.shape[0]
    blocks = (numel + BLOCK - 1) // BLOCK
    zero = np.float32(0.0)
    for blk in prange(blocks):
        start = blk * BLOCK  # a multiple of 8: each block starts on a whole mask byte
        stop = min(start + BLOCK, numel)
        size = stop - start
        b = _widen(base[start:stop], base_code)
        t = _widen(tau[start:stop], tau_code)
        r = np.empty(size, dtype=np.float32)
        for j in range(size):
            p = start + j
            d = t[j] if (packed[p >> 3] >> (p & 7)) & 1 else zero  # torch.where's +0.0, never τ*·0 (−0.0)
            if scaled:
                d = d * scale
            r[j] = b[j] + d
        if base_code == 0:
            for j in range(size):
                out[start + j] = r[j]
        elif base_code == 1:  # bf16, rounded to nearest even as torch does
            bits = r.view(np.uint32)
            for j in range(size):
                w = bits[j]
                out[start + j] = np.uint16((w + np.uint32(0x7FFF) + ((w >> np.uint32(16)) & np.uint32(1))) >> 16)
        else:  # float16
            rounded = _encode_half(r)
            for j in range(size):
                out[start + j] = rounded[j]
