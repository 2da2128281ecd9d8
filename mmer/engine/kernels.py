"""Which chunks the fused kernels (``mmer.merge.one_pass``) take, and running them: the eager engine stays the
definition, a kernel is used only where it computes the same bytes, and a chunk it cannot take exactly (a τᵢ
that is not finite) goes back to the eager path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from mmer.checkpoint import bits
from mmer.engine.slots import chunk_views, model_sources
from mmer.merge.overflow import check_merged
from mmer.plan import MergePlan

if TYPE_CHECKING:
    from mmer.merge.methods import SignCensus
    from mmer.merge.one_pass import FusedResult
    from mmer.merge.slot import Variant


def fused_kernel(
    plan: MergePlan,
    slot_name: str,
    device: torch.device,
    store_dtype: torch.dtype | None = None,
    variant: Variant | None = None,
) -> Any:
    """``merge.one_pass`` when its kernels compute exactly what the eager engine would for this slot, else None:
    the threshold pass (no ``store_dtype``) needs only inputs it reads, the merge also the variant (the plan's
    unless given) and τ*'s dtype."""
    variant = variant or plan.variant
    if store_dtype is not None and (variant.rule.single_model_output or not variant.elementwise):
        return None
    from mmer.merge import one_pass  # imported on first use: it loads numba

    dtypes = [plan.base.llm[slot_name].dtype] + [m.llm[slot_name].dtype for m in plan.models]
    if store_dtype is None:
        return one_pass if one_pass.reads(dtypes, device) else None
    return one_pass if one_pass.supports(variant, dtypes, store_dtype, device) else None


def census_fused(
    plan: MergePlan,
    slot_name: str,
    span: tuple[int, int],
    variant: Variant,
    thresholds: list[float | None] | None,
    device: torch.device,
) -> SignCensus | None:
    """One chunk's elected-sign census through the kernel, or None where it cannot count exactly what the eager
    engine would (a variant or inputs it does not take, or a τᵢ that is not finite): the eager path then counts."""
    if fused_kernel(plan, slot_name, device) is None:
        return None
    from mmer.merge import one_pass

    if not one_pass.counts_signs(variant) or one_pass._census_kernel() is None:
        return None
    base, thetas = chunk_views(plan, slot_name, span)
    census, l1 = one_pass.census_chunk(base, thetas, thresholds if variant.uses_trim else None)
    return census if all(math.isfinite(v) for v in l1) else None


def merge_fused(
    plan: MergePlan,
    slot_name: str,
    span: tuple[int, int],
    thresholds: list[float | None] | None,
    store_dtype: torch.dtype,
    variant: Variant | None = None,
    window: list[int] | None = None,
    views: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
) -> FusedResult | None:
    """One chunk through the fused kernel (the plan's variant unless given), its merged weights checked; None
    (nothing to write) when a τᵢ is not finite: the eager path then runs the chunk, and refuses it naming the
    tensor or merges it with NaN/inf as the eager engine defines. ``window``: also count each τᵢ against it
    (``one_pass.merge_chunk``). ``views``: the slot's whole flat θ_base and θᵢ (``chunk_views`` over the slot),
    taken once per slot instead of once per chunk."""
    from mmer.merge import one_pass

    if views is None:
        base, thetas = chunk_views(plan, slot_name, span)
    else:
        base, thetas = views[0][span[0] : span[1]], [t[span[0] : span[1]] for t in views[1]]
    result = one_pass.merge_chunk(base, thetas, variant or plan.variant, thresholds, store_dtype, window)
    if not all(math.isfinite(v) for v in result.l1):
        return None
    if not plan.recipe.options.allow_nonfinite:  # the fused variant's mask (mmer) has no rescaler: sᵢ = 1
        check_merged(
            base,
            result.stored,
            [1.0] * len(plan.models),
            tensor=slot_name,
            file=str(plan.base.llm[slot_name].file),
            labels=model_sources(plan),
            masks=lambda: [bits.unpack(packed, (base.numel(),)) for packed in result.packed],
        )
    return result
