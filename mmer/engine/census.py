"""The sign census: how many merged entries of the whole model elect γ = +1 and γ = −1, counted before any slot is
merged, for ``zero_sign="majority"`` (the TIES authors' ``resolve_zero_signs(..., "majority")``, which the code
MMER builds on and FusionBench call): an entry whose Σᵢ τᵢ is exactly 0 takes the sign most entries elected.

The count needs every model's trimmed task vectors, so it runs after the trim thresholds are known, as one more
streaming pass; it cannot ride on the threshold pass, where the trim that decides each sum is not known yet. Only
variants that ask for the majority pay for it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mmer.engine.kernels import census_fused
from mmer.engine.slots import read_slot, release_inputs, slot_spans
from mmer.engine.thresholds import Thresholds
from mmer.merge.methods import SignCensus
from mmer.merge.slot import Variant, count_signs
from mmer.plan import MergePlan
from mmer.progress import ProgressSink


def count_majority(
    plan: MergePlan, variants: list[Variant], thresholds: Thresholds, progress: ProgressSink
) -> list[Variant]:
    """``variants`` with each one that gives zero sums the majority sign carrying its model-wide census (shared by
    variants that elect the same signs, ``Variant.census_key``); the others as they are. One pass, none needed."""
    counted = {v.census_key: v for v in variants if v.needs_census}
    if not counted:
        return list(variants)
    device = torch.device(plan.recipe.options.device)
    # DARE draws its masks per whole tensor and a per-tensor trim ranks the whole tensor: those count whole slots
    elementwise = all(v.dare <= 0 and not (v.uses_trim and v.trim_scope != "global") for v in counted.values())
    census = dict.fromkeys(counted, SignCensus())
    stage = "sign census"
    progress.start(stage, sum(s.nbytes for s in plan.merged_slots) * (1 + len(plan.models)))
    try:
        for slot in plan.merged_slots:
            for span in slot_spans(slot.numel, device, elementwise):
                chunk = span or (0, slot.numel)
                raw = None
                for key, variant in counted.items():
                    trim_at = thresholds.get(variant.threshold_key) if variant.needs_global_threshold else None
                    counted_here = census_fused(plan, slot.name, chunk, variant, trim_at, device)
                    if counted_here is None:
                        if raw is None:
                            _, raw = read_slot(plan, slot.name, device, span)
                        counted_here = count_signs(raw, variant, slot.name, trim_at)
                    census[key] = census[key] + counted_here
                del raw
                progress.advance(stage, (chunk[1] - chunk[0]) * slot.dtype.itemsize * (1 + len(plan.models)))
            release_inputs(plan)
    finally:
        progress.end(stage)
    return [replace(v, census=census[v.census_key]) if v.needs_census else v for v in variants]
