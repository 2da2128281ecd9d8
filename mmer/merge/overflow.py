"""Overflow to ±inf from finite inputs: τᵢ, τ* as stored, and the weights rebuilt from them.

NaN/inf in an input are refused where it is read (``check_finite``), but finite inputs can still overflow: two
float32 weights of ±3e38 differ by more than float32 holds, a τ* of 1.2e5 is inf in float16, and
θ_base + s·τ* can leave the base dtype's range (α, merge weights or EMR's rescaler above 1). Each would be
written as inf and every model rebuilt from the checkpoint would carry it, so the merge checks all three, each
in the dtype it is stored in. The rebuilt weights are checked over every entry of τ*, not under one modality's
mask: an entry outside τ*'s support rebuilds to θ_base whatever the mask, so this covers every mask at once.

Most chunks are proved finite from two reductions (the largest magnitude of θ_base and of τ*); only a chunk
whose bound reaches the dtype's limit is rebuilt entry by entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mmer.errors import NonFiniteError
from mmer.merge.masks import rebuild_weight

ALLOW_HINT = "or pass --allow-nonfinite to write it anyway"


# float dtype → (same-width signed integer dtype, unsigned numpy dtype, mask of every bit but the sign)
_BITS = {
    torch.float16: (torch.int16, np.uint16, 0x7FFF),
    torch.bfloat16: (torch.int16, np.uint16, 0x7FFF),
    torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF),
    torch.float64: (torch.int64, np.uint64, 0x7FFFFFFFFFFFFFFF),
}


def max_abs(tensor: torch.Tensor) -> float:
    """The largest magnitude in ``tensor`` as a Python float: inf when it holds ±inf, NaN when it holds NaN.

    On the CPU it is the largest bit pattern without the sign (IEEE magnitudes order as their patterns, and
    NaN's lie above inf's), reduced by numpy on one thread: torch's threaded reductions wait for the fused
    kernel's OpenMP threads to go idle, which costs milliseconds per chunk right after the kernel ran (a numba
    reduction measured slower still: its 16-bit max does not vectorise). A router's load does not come here for
    the tensors its first switch rebuilds: that pass gathers the maxima itself.
    """
    if tensor.numel() == 0:
        return 0.0
    if tensor.device.type == "cpu" and tensor.dtype in _BITS:
        signed, unsigned, mask = _BITS[tensor.dtype]
        bits = tensor.contiguous().view(signed).numpy().view(unsigned)
        top = np.array([np.bitwise_and(bits, unsigned(mask)).max()], dtype=unsigned)
        return float(torch.from_numpy(top.view(np.dtype(f"i{top.itemsize}"))).view(tensor.dtype)[0])
    low, high = torch.aminmax(tensor)
    low_f, high_f = float(low), float(high)
    if math.isnan(low_f) or math.isnan(high_f):
        return math.nan
    return max(-low_f, high_f)


def provably_finite(base_max: float, tau_max: float, scale: float, dtype: torch.dtype) -> bool:
    """Whether every θ_base + s·τ* is finite in ``dtype`` given only the two largest magnitudes.

    |θ + s·τ| ≤ max|θ| + |s|·max|τ| in exact arithmetic; float32 rounding of the product and the sum moves the
    result by a relative 2⁻²³ at most, which the margin covers, and a value within the dtype's largest finite
    number casts to a finite one. NaN or inf in either bound fails the test.
    """
    bound = (base_max + abs(scale) * tau_max) * (1.0 + 2.0**-20)
    return bound <= torch.finfo(dtype).max


def rebuilt_overflow(base: torch.Tensor, stored: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Where θ_base + s·τ* (``rebuild_weight``'s arithmetic, every entry kept) is not finite in the base dtype."""
    return ~torch.isfinite(rebuild_weight(base, stored, None, scale=scale))


def check_task_vector(
    tau: torch.Tensor, theta: torch.Tensor, base: torch.Tensor, *, tensor: str, file: str, label: str
):
    """Refuse a τᵢ = θᵢ − θ_base that overflowed float32 although θᵢ and θ_base are finite."""
    bad = ~torch.isfinite(tau)
    if not bool(bad.any()):
        return
    first = int(bad.reshape(-1).nonzero()[0])
    a, b = float(theta.reshape(-1)[first]), float(base.reshape(-1)[first])
    raise NonFiniteError(
        f"{file}: the task vector of {label} overflows float32 in tensor {tensor!r} at {int(bad.sum())} "
        f"entries (e.g. θ = {a:.4g} and θ_base = {b:.4g}: the difference is beyond ±{torch.finfo().max:.4g})",
        file=file,
        tensor=tensor,
        hint="weights this large are not a fine-tune of this base: check the file and the base, "
        + ALLOW_HINT
        + " as inf",
    )


def check_merged(
    base: torch.Tensor,
    stored: torch.Tensor,
    scales: Sequence[float] | None,
    *,
    tensor: str,
    file: str,
    labels: Sequence[str],
    masks: Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]] | None = None,
    maxima: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """Refuse a τ* that is not finite as stored, or θ_base + sᵢ·τ* that overflows the base dtype for a
    modality's rescaler sᵢ (``scales``, one per label; ``None`` while EMR's are not known yet, then only τ* is
    checked). Returns max|θ_base| and max|τ*| so a later check with the final scales can reuse them.

    ``labels`` name the models (with where they are read from), ``file`` where θ_base is read from.
    ``masks`` (bool, one per label, or a function returning them, called only on failure) only make the
    message name the modalities whose rebuilt weights are hit. ``maxima`` are max|θ_base| and max|τ*| where a
    pass that read every entry already found them (a router's first switch), so neither is read again here.
    """
    base_max, tau_max = (max_abs(base), max_abs(stored)) if maxima is None else maxima
    if not math.isfinite(tau_max):
        bad = ~torch.isfinite(stored)
        raise NonFiniteError(
            f"tensor {tensor!r}: τ* merged from {', '.join(labels)} is ±inf/NaN at {int(bad.sum())} entries as "
            f"stored in {_dtype_name(stored.dtype)} (beyond ±{torch.finfo(stored.dtype).max:.6g})",
            file=file,
            tensor=tensor,
            hint="the models differ from the base by more than τ*'s dtype holds, which no fine-tune does: check "
            "the models; store τ* in float32 (--delta-dtype float32), " + ALLOW_HINT,
        )
    for scale in sorted(set(scales or ())):
        if provably_finite(base_max, tau_max, scale, base.dtype):
            continue
        bad = rebuilt_overflow(base, stored, scale)
        if not bool(bad.any()):
            continue
        each = masks() if callable(masks) else masks
        hit = [
            label
            for label, s, mask in zip(labels, scales, each or [None] * len(labels), strict=True)  # type: ignore[arg-type]
            if s == scale and (mask is None or bool((mask.reshape(-1) & bad.reshape(-1)).any()))
        ]
        first = int(bad.reshape(-1).nonzero()[0])
        b, t = float(base.reshape(-1)[first]), float(stored.reshape(-1)[first])
        whole = each is None and len(hit) == len(labels)  # no masks: the one model merged from them all
        who = f"the model merged from {', '.join(labels)}" if whole or not hit else f"the weights of {', '.join(hit)}"
        scaled = f"{scale:g}·" if scale != 1.0 else ""
        raise NonFiniteError(
            f"tensor {tensor!r} rebuilt as θ_base + {scaled}τ* overflows {_dtype_name(base.dtype)} at "
            f"{int(bad.sum())} entries (e.g. θ_base = {b:.6g} from {file}, τ* = {t:.6g}): {who}",
            file=file,
            tensor=tensor,
            hint="lower alpha or the merge weights, check the models and the base, " + ALLOW_HINT,
        )
    return base_max, tau_max


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
