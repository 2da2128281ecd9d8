"""Each model's exact top-K magnitude threshold: over the whole model (global trim) before the merge, or per
tensor (per-tensor trim) just before its slot is merged, so that either trim then merges in flat chunks. Found
while streaming (``mmer.merge.trim`` holds the search); every input is released after each slot, so resident
memory stays one slot deep on every path: the sample, the windowed pass, the two-pass fallback and DARE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mmer.engine.kernels import fused_kernel
from mmer.engine.slots import chunk_views, read_slot, release_inputs, slot_spans
from mmer.merge.slot import Variant, apply_dare
from mmer.merge.trim import (
    SAMPLE_ENTRIES,
    TENSOR_SAMPLE_ENTRIES,
    GlobalThreshold,
    WindowedThreshold,
    rank_to_threshold,
    tensor_threshold,
)
from mmer.plan import MergePlan, Slot
from mmer.progress import ProgressSink

Thresholds = dict[tuple, list[float | None]]
SAMPLE_BLOCK = 1 << 14  # contiguous entries per sampled block: whole pages of every tensor, spread evenly
TENSOR_SAMPLE_BLOCK = 1 << 10


def _sample_blocks(
    numel: int, total: int, target: int = SAMPLE_ENTRIES, block: int = SAMPLE_BLOCK
) -> list[tuple[int, int]]:
    """Evenly spaced contiguous blocks of one tensor, in proportion to its share of the model."""
    if numel == 0:
        return []
    count = max(1, round(target * numel / max(total, 1) / block))
    if count * block >= numel:
        return [(0, numel)]
    step = numel // count
    return [(i * step, i * step + block) for i in range(count)]


def find_thresholds(
    plan: MergePlan, variants: list[Variant], progress: ProgressSink, unverified: list | None = None
) -> Thresholds:
    """Each model's exact global top-K magnitude threshold per distinct trim, in one streaming pass.

    Variants that trim the same task vectors the same way (see ``Variant.threshold_key``) share one search,
    and the task vectors of a slot are read once for all of them. A sample of a few blocks per tensor places a
    narrow window around each threshold, one full pass finds it exactly (``merge.trim.WindowedThreshold``);
    DARE'd task vectors, whose random masks are drawn per whole tensor, and any window that missed take the
    histogram search (``merge.trim.GlobalThreshold``), whose second pass is skipped when the first finds a bin
    holding one magnitude. Exact either way.

    With ``unverified`` (a list the caller passes), a trim whose every window the sample narrowed to one magnitude
    (a threshold of 0, or inside one block of ties) skips the full pass: its values are that magnitude, and
    ``(key, finders)`` is appended for the merge to count and confirm (``engine.merge_pass``).
    """
    keys = sorted({v.threshold_key for v in variants if v.needs_global_threshold})
    if not keys:
        return {}
    device = torch.device(plan.recipe.options.device)
    by_key = {v.threshold_key: v for v in variants if v.needs_global_threshold}
    n_models = len(plan.models)
    windowed = [key for key in keys if key[2] == 0]
    guessed: list[tuple] = []
    # each model ranked at its own K (Variant.k_of): a model's window is placed and counted alone, so the kernel's
    # per-model windows need nothing else
    finders = {
        key: [WindowedThreshold(plan.merged_numel, by_key[key].k_of(i), device, count=key[1]) for i in range(n_models)]
        for key in windowed
    }
    if windowed:
        merged_numel = plan.merged_numel  # a sum over every slot: read it once
        for slot in plan.merged_slots:
            _sample(plan, slot, _sample_blocks(slot.numel, merged_numel), device, [finders[key] for key in windowed])
            release_inputs(plan)
        for key in windowed:
            for finder in finders[key]:
                finder.open_window()
        guessed = [key for key in windowed if unverified is not None and _one_magnitude(finders[key])]
        if unverified is not None:
            unverified.extend((key, finders[key]) for key in guessed)
        counted = [finders[key] for key in windowed if key not in guessed]
        if counted:
            _window_pass(plan, plan.merged_slots, device, counted, progress, "threshold")
    values: Thresholds = {
        key: [f.value if not f.needs_second_pass else None for f in finders[key]]
        for key in windowed
        if key not in guessed
    }
    values.update({key: [_pattern_value(f.window[0]) for f in finders[key]] for key in guessed})
    wanted = {
        (key, i) for key in windowed if key not in guessed for i, f in enumerate(finders[key]) if f.needs_second_pass
    }
    wanted |= {(key, i) for key in keys if key[2] != 0 for i in range(n_models)}
    if not wanted:
        return values
    searches = {
        (key, i): GlobalThreshold(plan.merged_numel, by_key[key].k_of(i), device, count=key[1])
        for key, i in sorted(wanted)
    }
    dare_variants = {key: by_key[key] for key, _ in wanted if key[2] != 0}
    _histogram_passes(plan, plan.merged_slots, device, searches, dare_variants, progress, "threshold pass")
    for key in keys:
        values.setdefault(key, [None] * n_models)
        for i in range(n_models):
            if (key, i) in searches:
                values[key][i] = searches[key, i].value
    return values


def _pattern_value(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def _one_magnitude(finders: list[WindowedThreshold]) -> bool:
    """Whether the sample narrowed every model's window to one magnitude (its guess is then that value)."""
    return all(not f.keeps_all and f.window[0] == f.window[1] for f in finders)


def tensor_thresholds(
    plan: MergePlan, slot: Slot, device: torch.device, k: float | Sequence[float], count: str
) -> list[float | None]:
    """Each model's per-tensor threshold for one slot: exactly ``merge.trim.tensor_threshold`` of its whole τᵢ,
    found in the slot's chunks (a window placed by a sample of the tensor, one counting pass, the histogram
    passes if it missed) so that the slot then merges in chunks too. Inputs are left mapped for the merge.

    ``k`` is one K for every model or each model's own (``Variant.ks``); a model whose K keeps everything gets
    ``None``, as the eager trim does."""
    n_models = len(plan.models)
    ks = [float(k)] * n_models if isinstance(k, (int, float)) else [float(v) for v in k]
    if len(ks) != n_models:
        raise ValueError(f"{len(ks)} values of K for {n_models} models")
    ranks = [rank_to_threshold(slot.numel, k_i, count) for k_i in ks]
    if not any(ranks):
        return [None] * n_models
    spans = slot_spans(slot.numel, device)
    if spans == [None]:  # one chunk: rank the whole τᵢ as the eager engine does
        _, raw = read_slot(plan, slot.name, device)
        return [_as_float(tensor_threshold(tau, k_i, count)) for tau, k_i in zip(raw, ks, strict=True)]
    finders = [WindowedThreshold(slot.numel, k_i, device, count=count) for k_i in ks]
    blocks = _sample_blocks(slot.numel, slot.numel, TENSOR_SAMPLE_ENTRIES, TENSOR_SAMPLE_BLOCK)
    _sample(plan, slot, blocks, device, [finders])
    for finder in finders:
        finder.open_window()
    _window_pass(plan, [slot], device, [finders])
    found: list[float | None] = [None if f.needs_second_pass else f.value for f in finders]
    missed = {
        (None, i): GlobalThreshold(slot.numel, ks[i], device, count=count)
        for i, v in enumerate(found)
        if v is None and ranks[i]
    }
    if missed:
        _histogram_passes(plan, [slot], device, missed, {})
        for (_, i), search in missed.items():
            found[i] = search.value
    return found


def _as_float(threshold: torch.Tensor | None) -> float | None:
    return None if threshold is None else float(threshold)


def _sample(
    plan: MergePlan, slot: Slot, blocks: list[tuple[int, int]], device: torch.device, groups: list[list]
) -> None:
    """Each model's τᵢ at ``blocks`` of one slot into every group's finder for that model."""
    base = plan.base.reader.get(plan.base.llm[slot.name].name, copy=False).reshape(-1)
    for i, m in enumerate(plan.models):
        theta = m.reader.get(m.llm[slot.name].name, copy=False).reshape(-1)
        for start, stop in blocks:
            tau = theta[start:stop].to(device).float() - base[start:stop].to(device).float()
            for finders in groups:
                finders[i].add_sample(tau)
        del theta
    del base


def _window_pass(
    plan: MergePlan,
    slots: Sequence[Slot],
    device: torch.device,
    groups: list[list[WindowedThreshold]],
    progress: ProgressSink | None = None,
    stage: str | None = None,
) -> None:
    """One full pass over ``slots`` counting every group's windows; a pass with a ``stage`` (over the model, not
    one slot about to be merged) reports progress and releases the inputs after each slot."""
    n_models = len(plan.models)
    if progress is not None and stage is not None:
        progress.start(stage, sum(s.nbytes for s in slots) * (1 + n_models))
    for slot in slots:
        kernel = fused_kernel(plan, slot.name, device)
        views = chunk_views(plan, slot.name, (0, slot.numel)) if kernel is not None else None  # once per slot
        for span in slot_spans(slot.numel, device):  # raw task vectors: always elementwise here
            if kernel is not None and _count_fused(views, span or (0, slot.numel), groups):
                continue
            _, raw = read_slot(plan, slot.name, device, span)
            for finders in groups:
                for finder, tau in zip(finders, raw, strict=True):
                    finder.add(tau)
            del raw
        del views  # before the inputs are unmapped
        if progress is not None and stage is not None:
            progress.advance(stage, slot.nbytes * (1 + n_models))
            release_inputs(plan)
    if progress is not None and stage is not None:
        progress.end(stage)


def _count_fused(
    views: tuple[torch.Tensor, list[torch.Tensor]], span: tuple[int, int], groups: list[list[WindowedThreshold]]
) -> bool:
    """One chunk (``span`` of the slot's flat ``views``) counted for every window, without materialising τᵢ; False
    when a τᵢ is not finite (the eager path then refuses it by name, or counts it as the eager engine does)."""
    from mmer.merge import window_pass

    if not window_pass.available():
        return False
    base, thetas = views[0][span[0] : span[1]], [t[span[0] : span[1]] for t in views[1]]
    counts = []
    for finders in groups:
        windows = [f.window for f in finders]
        counted = window_pass.window_chunk(base, thetas, [w[0] for w in windows], [w[1] for w in windows])
        if not all(math.isfinite(v) for v in counted.l1):
            return False
        counts.append(counted)
    for finders, counted in zip(groups, counts, strict=True):
        for finder, piece in zip(finders, counted.pieces, strict=True):
            finder.add_piece(piece)
    return True


def _histogram_passes(
    plan: MergePlan,
    slots: Sequence[Slot],
    device: torch.device,
    searches: dict[tuple, GlobalThreshold],
    dare_variants: dict[tuple, Variant],
    progress: ProgressSink | None = None,
    stage: str | None = None,
) -> None:
    """``GlobalThreshold``'s passes over ``slots`` for each (key, model) search; pass 2 only for the searches
    whose first pass left a bin of several magnitudes. Raw task vectors are read in chunks; DARE'd ones (keys in
    ``dare_variants``) by whole slots, as their masks are drawn. A search with a ``stage`` reports progress and
    releases the inputs after each slot."""
    n_models = len(plan.models)
    for pass_no in (1, 2):
        todo = {key: s for key, s in searches.items() if pass_no == 1 or s.needs_pass2}
        if not todo:
            return
        raw_keys = {key for key in todo if key[0] not in dare_variants}
        dare_keys = {key for key in todo if key[0] in dare_variants}
        name = f"{stage} {pass_no}/2" if stage else None
        if progress is not None and name is not None:
            progress.start(name, sum(s.nbytes for s in slots) * (1 + n_models))
        for slot in slots:
            if raw_keys:
                for span in slot_spans(slot.numel, device):
                    _, raw = read_slot(plan, slot.name, device, span)
                    _feed(todo, raw_keys, raw, pass_no)
                    del raw
            for key in sorted({key[0] for key in dare_keys}):
                _, raw = read_slot(plan, slot.name, device)
                taus = apply_dare(raw, dare_variants[key], slot.name)
                _feed(todo, {k for k in dare_keys if k[0] == key}, taus, pass_no)
                del raw, taus
            if progress is not None and name is not None:
                progress.advance(name, slot.nbytes * (1 + n_models))
                release_inputs(plan)
        if progress is not None and name is not None:
            progress.end(name)


def _feed(searches: dict[tuple, GlobalThreshold], keys: set, taus: Sequence[torch.Tensor], pass_no: int) -> None:
    for key in keys:
        search, tau = searches[key], taus[key[1]]
        search.add_pass1(tau) if pass_no == 1 else search.add_pass2(tau)
