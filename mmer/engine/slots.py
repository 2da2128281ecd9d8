"""Reading a slot: which chunks it is processed in, and θ_base with every model's τᵢ for one chunk.

Shared by every pass (thresholds, merge, compare, tune), so each reads, converts and checks inputs the same way.
"""

from __future__ import annotations

import math

import torch

import mmer.runtime as runtime
from mmer.merge.overflow import check_task_vector
from mmer.merge.task_vectors import check_finite, task_vector
from mmer.plan import MergePlan


def release_inputs(plan: MergePlan) -> None:
    """Unmap every input after a slot, so resident memory does not grow with the models read (see reader)."""
    for model in [plan.base, *plan.models]:
        model.reader.release()


def slot_spans(numel: int, device: torch.device, elementwise: bool = True) -> list[tuple[int, int] | None]:
    """The flat ranges a slot is processed in: ``[None]`` for the whole slot at once.

    Chunks are multiples of 8 entries, so each chunk's packed mask starts on a byte. On a GPU whole slots are
    cheaper (kernel launches, not page faults, dominate there).
    """
    chunk = runtime.CPU_CHUNK
    if device.type != "cpu" or not elementwise or numel <= chunk:
        return [None]
    return [(start, min(start + chunk, numel)) for start in range(0, numel, chunk)]


def read_slot(
    plan: MergePlan,
    slot_name: str,
    device: torch.device,
    span: tuple[int, int] | None = None,
    l1: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """θ_base and every model's τᵢ (float32, on ``device``, stacked as ``[n, ...]``) for one slot, checked for NaN/inf.

    ``span`` restricts both to flat entries ``[start, stop)`` of the shared rows (a model's appended rows
    come after them, so the shared part is a flat prefix). The base is converted to float32 once; NaN/inf are
    caught from each τᵢ's ℓ1 norm (one reduction, no temporary), which ``l1`` receives when given, and only
    then located exactly, so the check costs little on clean models: in θ_base or θᵢ as stored, else in τᵢ
    itself (finite weights whose difference overflows float32).
    """
    base_info = plan.base.llm[slot_name]
    base = plan.base.reader.get(base_info.name, copy=False)
    rows = base.shape[0] if base.dim() else None
    if span is not None:
        base = base.reshape(-1)[span[0] : span[1]]
    base_f = base.to(device).float()
    # Every model's τᵢ goes straight into one stack: the methods and masks then run once over [n, ...]
    # instead of once per model, and nothing is copied to stack them.
    taus = torch.empty((len(plan.models), *base_f.shape), dtype=torch.float32, device=device)
    for i, m in enumerate(plan.models):
        theta = m.reader.get(m.llm[slot_name].name, copy=False)
        if span is not None:
            task_vector(theta.reshape(-1)[span[0] : span[1]].to(device), base_f, out=taus[i])
        else:
            task_vector(theta.to(device), base_f, rows if theta.dim() and theta.shape[0] != rows else None, taus[i])
    check = not plan.recipe.options.allow_nonfinite
    if check or l1 is not None:
        norms = torch.linalg.vector_norm(taus.reshape(len(plan.models), -1), 1, dim=1).tolist()
        for i, (m, norm) in enumerate(zip(plan.models, norms, strict=True)):
            if check and not math.isfinite(norm):
                full_base = plan.base.reader.get(base_info.name, copy=False)
                check_finite(full_base, file=str(base_info.file), name=base_info.name)
                info = m.llm[slot_name]
                theta = m.reader.get(info.name, copy=False)
                check_finite(theta, file=str(info.file), name=info.name)
                if span is not None:
                    theta = theta.reshape(-1)[span[0] : span[1]]
                elif theta.dim():
                    theta = theta[:rows]
                check_task_vector(taus[i], theta, base, tensor=info.name, file=str(info.file), label=m.label)
        if l1 is not None:
            l1.extend(norms)
    return base, taus


def chunk_views(plan: MergePlan, slot_name: str, span: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stored (unconverted) flat entries ``span`` of θ_base and of every model's θᵢ: views of the mapped files."""
    start, stop = span
    base = plan.base.reader.get(plan.base.llm[slot_name].name, copy=False).reshape(-1)[start:stop]
    return base, [m.reader.get(m.llm[slot_name].name, copy=False).reshape(-1)[start:stop] for m in plan.models]


def tau_dtype(plan: MergePlan, slot_dtype: torch.dtype) -> torch.dtype:
    """The dtype τ* is stored in: the slot's own, or float32 when ``delta_dtype`` asks for exact deltas."""
    return torch.float32 if plan.recipe.options.delta_dtype == "float32" else slot_dtype


def model_sources(plan: MergePlan) -> list[str]:
    """Each model as error messages name it: its modality and where it was read from."""
    return [f"{m.label} ({m.path})" for m in plan.models]
