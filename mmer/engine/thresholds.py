"""Each model's exact global top-K magnitude threshold: the trim that keeps the K largest entries of τᵢ over the
whole model, not per tensor, found while streaming one slot at a time (``mmer.merge.trim`` holds the search).
"""

from __future__ import annotations

import torch

from mmer.engine.kernels import count_fused, fused_kernel
from mmer.engine.slots import read_slot, release_inputs, slot_spans
from mmer.merge.slot import Variant, apply_dare
from mmer.merge.trim import GlobalThreshold, WindowedThreshold
from mmer.plan import MergePlan
from mmer.progress import ProgressSink

Thresholds = dict[tuple, list[float | None]]
SAMPLE_TARGET = 1 << 20  # sampled entries per model to place the threshold window (about 1 M)
SAMPLE_BLOCK = 1 << 14  # contiguous entries per sampled block: whole pages of every tensor, spread evenly


def _sample_blocks(numel: int, total: int) -> list[tuple[int, int]]:
    """Evenly spaced contiguous blocks of one tensor, in proportion to its share of the model."""
    if numel == 0:
        return []
    count = max(1, round(SAMPLE_TARGET * numel / max(total, 1) / SAMPLE_BLOCK))
    if count * SAMPLE_BLOCK >= numel:
        return [(0, numel)]
    step = numel // count
    return [(i * step, i * step + SAMPLE_BLOCK) for i in range(count)]


def find_thresholds(plan: MergePlan, variants: list[Variant], progress: ProgressSink) -> Thresholds:
    """Each model's exact global top-K magnitude threshold per distinct trim, in one streaming pass.

    Variants that trim the same task vectors the same way (see ``Variant.threshold_key``) share one search,
    and the task vectors of a slot are read once for all of them. A sample of a few blocks per tensor places a
    narrow window around each threshold, one full pass finds it exactly (``merge.trim.WindowedThreshold``);
    DARE'd task vectors, whose random masks are drawn per whole tensor, and any window that missed take the
    two-pass search instead. Exact either way.
    """
    keys = sorted({v.threshold_key for v in variants if v.needs_global_threshold})
    if not keys:
        return {}
    device = torch.device(plan.recipe.options.device)
    by_key = {v.threshold_key: v for v in variants if v.needs_global_threshold}
    slots = plan.merged_slots
    n_models = len(plan.models)
    total_bytes = sum(s.nbytes for s in slots) * (1 + n_models)
    windowed = [key for key in keys if key[2] == 0]
    finders = {
        key: [WindowedThreshold(plan.merged_numel, key[0], device, count=key[1]) for _ in plan.models]
        for key in windowed
    }
    if windowed:
        merged_numel = plan.merged_numel  # a sum over every slot: read it once
        for slot in slots:
            base = plan.base.reader.get(plan.base.llm[slot.name].name, copy=False).reshape(-1)
            shared = slot.numel
            for i, m in enumerate(plan.models):
                theta = m.reader.get(m.llm[slot.name].name, copy=False).reshape(-1)
                for start, stop in _sample_blocks(shared, merged_numel):
                    tau = theta[start:stop].to(device).float() - base[start:stop].to(device).float()
                    for key in windowed:
                        finders[key][i].add_sample(tau)
        for key in windowed:
            for finder in finders[key]:
                finder.open_window()
        stage = "threshold"
        progress.start(stage, total_bytes)
        for slot in slots:
            kernel = fused_kernel(plan, slot.name, device)
            for span in slot_spans(slot.numel, device):  # raw task vectors: always elementwise here
                if kernel is not None and count_fused(plan, slot.name, span or (0, slot.numel), windowed, finders):
                    continue
                _, raw = read_slot(plan, slot.name, device, span)
                for key in windowed:
                    for finder, tau in zip(finders[key], raw, strict=True):
                        finder.add(tau)
                del raw
            progress.advance(stage, slot.nbytes * (1 + n_models))
            release_inputs(plan)
        progress.end(stage)
    values: Thresholds = {
        key: [f.value if not f.needs_second_pass else None for f in finders[key]] for key in windowed
    }
    missed = {(key, i) for key in windowed for i, f in enumerate(finders[key]) if f.needs_second_pass}
    two_pass = [key for key in keys if key[2] != 0] + sorted({key for key, _ in missed})
    if not two_pass:
        return values
    searches = {
        key: [GlobalThreshold(plan.merged_numel, key[0], device, count=key[1]) for _ in plan.models]
        for key in two_pass
    }
    for pass_no, stage in ((1, "threshold pass 1/2"), (2, "threshold pass 2/2")):
        progress.start(stage, total_bytes)
        for slot in slots:
            _, raw = read_slot(plan, slot.name, device)
            for key in two_pass:
                for search, tau in zip(searches[key], apply_dare(raw, by_key[key], slot.name), strict=True):
                    search.add_pass1(tau) if pass_no == 1 else search.add_pass2(tau)
            progress.advance(stage, slot.nbytes * (1 + n_models))
        progress.end(stage)
    for key in two_pass:
        found = [s.value for s in searches[key]]
        if key in values:
            values[key] = [found[i] if (key, i) in missed else values[key][i] for i in range(n_models)]
        else:
            values[key] = found
    return values
