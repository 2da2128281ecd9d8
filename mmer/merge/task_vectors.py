"""Task vectors τᵢ = θᵢ − θ_base for one tensor slot, in float32.

Deltas are always taken in float32 whatever the stored dtype (fp16/bf16 checkpoints), so the subtraction
itself adds no rounding beyond the inputs'; results are cast back only when written.
"""

from __future__ import annotations

import torch

from mmer.errors import NonFiniteError


def task_vector(
    finetuned: torch.Tensor, base: torch.Tensor, rows: int | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """τ = θᵢ − θ_base in float32, over the first ``rows`` rows when a model appended vocabulary rows.

    Pass ``base`` already in float32 when it is shared by several models, so it is converted once; ``out``
    (float32, ``base``'s shape) receives τ, e.g. one row of a stack of every model's task vectors.
    """
    if rows is not None:
        finetuned = finetuned[:rows]
    if base.dtype == torch.float32:
        if out is None:
            return torch.sub(finetuned, base)  # promotes a half-precision θᵢ on the fly: no float32 copy of it
        # Widen θᵢ into ``out`` first, then subtract in place: the same float32 result (widening is exact)
        # at about half the cost of torch's mixed-dtype subtraction.
        return out.copy_(finetuned).sub_(base)
    tau = finetuned.float() - base.float()
    return tau if out is None else out.copy_(tau)


def check_finite(tensor: torch.Tensor, *, file: str, name: str) -> None:
    """Refuse NaN/inf: one bad value would silently poison the merged vector and every mask."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(
            f"{file}: tensor {name!r} holds {bad} NaN/inf value(s)",
            file=file,
            tensor=name,
            hint="fix or re-export the checkpoint, or pass --allow-nonfinite to merge anyway",
        )
