"""The main pass: per slot, τᵢ → (DARE, trim) → merge → τ* → masks, and every LLM-side file of the output
written as it goes (base copy, τ*, one mask file per modality, private rows; or the single merged model).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmer.checkpoint import bits
from mmer.checkpoint.decoupled import BASE_DIR, COMPONENTS_DIR, MASKS_DIR, PRIVATE_FILE, TAU_STAR_DIR, mask_metadata
from mmer.checkpoint.manifest import MAX_SCALE
from mmer.engine.kernels import fused_kernel, merge_fused
from mmer.engine.slots import chunk_views, model_sources, read_slot, release_inputs, slot_spans, tau_dtype
from mmer.engine.thresholds import Thresholds, tensor_thresholds
from mmer.errors import NonFiniteError
from mmer.io.reader import CheckpointReader
from mmer.io.writer import PlannedTensor, ShardedWriter, pass_through
from mmer.merge.masks import rebuild_weight
from mmer.merge.overflow import check_merged, provably_finite
from mmer.merge.slot import merge_slot
from mmer.merge.trim import count_true, trims_each_tensor_first
from mmer.plan import MergePlan
from mmer.progress import ProgressSink
from mmer.version import __version__

if TYPE_CHECKING:
    from mmer.merge.one_pass import FusedResult  # the kernels load numba: imported on first use, not here
    from mmer.merge.trim import WindowedThreshold


@dataclass
class SlotStats:
    kept: dict[str, int]
    delta_l1: dict[str, float]
    kept_per_tensor: dict[str, dict[str, int]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)


def verifies_guesses(plan: MergePlan) -> bool:
    """Whether :func:`merge_slots` can confirm guessed global thresholds while it merges: a global trim without
    DARE or a census pass, every merged slot through the fused kernel (a chunk it leaves to the eager engine is
    counted there)."""
    variant, device = plan.variant, torch.device(plan.recipe.options.device)
    if not variant.needs_global_threshold or variant.dare > 0 or variant.needs_census:
        return False
    return all(
        fused_kernel(plan, s.name, device, tau_dtype(plan, s.dtype), variant) is not None for s in plan.merged_slots
    )


def merge_slots(
    plan: MergePlan,
    staging: Path,
    thresholds: Thresholds,
    progress: ProgressSink,
    unverified: list | None = None,
) -> SlotStats:
    """The main pass: per slot, τᵢ → (DARE, trim) → merge → τ* → masks; writes every LLM-side file.

    Decoupled output (a mask rule): base copy, τ*, one mask file per modality, private rows. Single merged
    model (``mask: none``): θ_base + τ* at the output's root as a plain Hugging Face checkpoint, private rows.

    ``unverified`` holds the ``(key, finders)`` whose thresholds ``find_thresholds`` guessed (the sample narrowed
    each model's window to one magnitude) instead of counting them in a pass of their own: the merge counts every
    τᵢ against that magnitude as it goes, so the search's one full pass is the merge's. When the counts confirm
    the guess, the merge stands; otherwise (rare: the sample misjudged the model) its files are discarded,
    ``thresholds`` is corrected to the exact values, and the merge runs again, so the output is exact either way.
    """
    key = plan.variant.threshold_key
    finders = dict(unverified or []).get(key)
    if finders is None:
        return _merge_pass(plan, staging, thresholds, progress)
    stats = _merge_pass(plan, staging, thresholds, progress, finders)
    if all(not f.needs_second_pass for f in finders):
        exact = [f.value for f in finders]
        if exact == thresholds[key]:
            return stats
        thresholds[key] = exact
    else:
        from mmer.engine.thresholds import find_thresholds

        thresholds.update(find_thresholds(plan, [plan.variant], progress))
    for name in (BASE_DIR, TAU_STAR_DIR, MASKS_DIR, COMPONENTS_DIR):
        shutil.rmtree(staging / name, ignore_errors=True)
    return _merge_pass(plan, staging, thresholds, progress)


def _merge_pass(
    plan: MergePlan,
    staging: Path,
    thresholds: Thresholds,
    progress: ProgressSink,
    guesses: list[WindowedThreshold] | None = None,
) -> SlotStats:
    """One merge of every slot; with ``guesses``, each τᵢ is also counted against its finder's window."""
    options = plan.recipe.options
    variant = plan.variant
    device = torch.device(options.device)
    model_thresholds = thresholds.get(variant.threshold_key) if variant.needs_global_threshold else None
    # A per-tensor trim whose thresholds are found just before each slot merges like a global one, in chunks and
    # through the fused kernel (exactly: a tensor's threshold compares as the global ones do).
    per_tensor = trims_each_tensor_first(variant, options.allow_nonfinite)
    chunk_variant = replace(variant, trim_scope="global") if per_tensor else variant
    window = [f.window[0] for f in guesses] if guesses is not None else None
    merged = plan.merged_slots
    shard = options.shard_size
    single_model = variant.rule.single_model_output

    writers: list[ShardedWriter] = []
    base_writer = tau_writer = merged_writer = None
    mask_writers: dict[str, ShardedWriter] = {}
    if single_model:
        merged_writer = ShardedWriter(staging, [PlannedTensor(s.name, s.dtype, s.shape) for s in plan.slots], shard)
        writers.append(merged_writer)
    else:
        if options.base_storage == "copy":
            (staging / BASE_DIR).mkdir()
            base_writer = ShardedWriter(
                staging / BASE_DIR, [PlannedTensor(s.name, s.dtype, s.shape) for s in plan.slots], shard
            )
            writers.append(base_writer)
        (staging / TAU_STAR_DIR).mkdir()
        tau_writer = ShardedWriter(
            staging / TAU_STAR_DIR,
            [PlannedTensor(s.name, tau_dtype(plan, s.dtype), s.shape) for s in merged],
            shard,
            metadata={"format": "mmer-tau-star/1", "mmer_version": __version__},
        )
        writers.append(tau_writer)
        (staging / MASKS_DIR).mkdir()
        shapes = {s.name: list(s.shape) for s in merged}
        mask_writers = {
            m.label: ShardedWriter(
                staging / MASKS_DIR,
                [PlannedTensor(s.name, torch.uint8, (bits.packed_size(s.numel),)) for s in merged],
                max_shard_bytes=1 << 62,
                prefix=m.label,
                metadata=mask_metadata(shapes),
            )
            for m in plan.models
        }
        writers.extend(mask_writers.values())
    private_writers = _private_writers(plan, staging)
    writers.extend(private_writers.values())

    labels = [m.label for m in plan.models]
    writers_by_role = (tau_writer, mask_writers)
    check = not options.allow_nonfinite
    rescaled = variant.rule.rescaled
    maxima: dict[str, tuple[float, float]] = {}  # max |θ_base|, |τ*| per slot, for the rescaled weights' check
    stats = SlotStats(kept=dict.fromkeys(labels, 0), delta_l1=dict.fromkeys(labels, 0.0))
    stats.kept_per_tensor = {label: {} for label in labels}
    scale_num, scale_den = dict.fromkeys(labels, 0.0), dict.fromkeys(labels, 0.0)
    stage = "merge"
    progress.start(stage, sum(s.nbytes for s in plan.slots) * (1 + len(plan.models)))
    try:
        for slot in plan.slots:
            if not slot.merged:
                for writer in (base_writer, merged_writer):
                    if writer is not None:
                        pass_through(writer, slot.name, plan.base.reader, plan.base.llm[slot.name])
                _write_private(plan, slot.name, private_writers)
                progress.advance(stage, slot.nbytes * (1 + len(plan.models)))
                continue
            if base_writer is not None:
                pass_through(base_writer, slot.name, plan.base.reader, plan.base.llm[slot.name])
            _write_private(plan, slot.name, private_writers)
            store_dtype = tau_dtype(plan, slot.dtype)
            ones = [0] * len(labels)
            slot_thresholds = model_thresholds
            if per_tensor:
                slot_thresholds = tensor_thresholds(plan, slot, device, variant.ks(len(labels)), variant.trim_count)
            kernel = fused_kernel(plan, slot.name, device, store_dtype, chunk_variant)
            views = chunk_views(plan, slot.name, (0, slot.numel)) if kernel else None  # once per slot, not chunk
            for span in slot_spans(slot.numel, device, chunk_variant.elementwise):
                start, stop = span or (0, slot.numel)
                chunk = (
                    merge_fused(
                        plan, slot.name, (start, stop), slot_thresholds, store_dtype, chunk_variant, window, views
                    )
                    if kernel
                    else None
                )
                if chunk is not None:
                    _write_fused(chunk, plan, slot.name, start, writers_by_role, stats, ones)
                    for finder, piece in zip(guesses or [], chunk.pieces or [], strict=True):
                        finder.add_piece(piece)
                else:
                    l1: list[float] = []
                    base, raw = read_slot(plan, slot.name, device, span, l1=l1)
                    for finder, tau in zip(guesses or [], raw if guesses else [], strict=True):
                        finder.add(tau)
                    result = merge_slot(raw, chunk_variant, slot.name, store_dtype, slot_thresholds)
                    for label, norm in zip(labels, l1, strict=True):
                        stats.delta_l1[label] += norm
                    base = base.to(device)
                    if check:
                        # EMR's rescalers are known only after the last slot: τ* now, θ_base + sᵢ·τ* then.
                        bounds = check_merged(
                            base,
                            result.stored,
                            None if rescaled else [1.0] * len(labels),
                            tensor=slot.name,
                            file=str(plan.base.llm[slot.name].file),
                            labels=model_sources(plan),
                            masks=result.masks,
                        )
                        before = maxima.get(slot.name, (0.0, 0.0))
                        maxima[slot.name] = (max(before[0], bounds[0]), max(before[1], bounds[1]))
                    if merged_writer is not None:
                        merged = rebuild_weight(base, result.stored, None)
                        merged_writer.write_range(slot.name, merged.reshape(-1), start)
                    if tau_writer is not None:
                        tau_writer.write_range(slot.name, result.stored.reshape(-1), start)
                    for i, label in enumerate(labels):
                        if result.masks is None:
                            continue
                        mask = result.masks[i]
                        ones[i] += count_true(mask)
                        mask_writers[label].write_range(slot.name, bits.pack(mask.cpu()), start // 8)
                        if result.scale_num:
                            scale_num[label] += result.scale_num[i]
                            scale_den[label] += result.scale_den[i]
                    del base, raw, result
                progress.advance(stage, (stop - start) * slot.dtype.itemsize * (1 + len(labels)))
            del views
            if not variant.rule.single_model_output:
                for label, count in zip(labels, ones, strict=True):
                    stats.kept_per_tensor[label][slot.name] = count
                    stats.kept[label] += count
            release_inputs(plan)
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        progress.end(stage)
    if rescaled:
        stats.scales = {label: scale_num[label] / scale_den[label] if scale_den[label] else 1.0 for label in labels}
        _check_rescaled(plan, staging, stats.scales, maxima if check else None)
    return stats


def _check_rescaled(
    plan: MergePlan, staging: Path, scales: dict[str, float], maxima: dict[str, tuple[float, float]] | None
) -> None:
    """EMR's rescalers are finite numbers, and θ_base + sᵢ·τ* stays finite in the base dtype for each of them.

    A rescaler is refused even with ``allow_nonfinite``: it is a number in the manifest, which JSON cannot hold
    as NaN or inf. The weights are proved finite from each slot's largest magnitudes, and only a slot near the
    limit is rebuilt from the τ* just written.
    """
    for m in plan.models:
        if not 0 < scales[m.label] <= MAX_SCALE:  # the range readers accept (FORMAT.md); NaN fails it too
            raise NonFiniteError(
                f"{m.path}: EMR's rescaler for {m.label} is {scales[m.label]}, outside (0, {MAX_SCALE:g}] (its task "
                "vector's mean magnitude overflows, is not a number, or the mask keeps almost nothing of it)",
                file=str(m.path),
                key=m.label,
                hint="check the model for NaN/inf or huge weights; a mask rule without a rescaler (mmer, tall) "
                "stores no such number",
            )
    if maxima is None:
        return
    values = [scales[m.label] for m in plan.models]
    tau_reader = None
    try:
        for slot in plan.merged_slots:
            base_max, tau_max = maxima[slot.name]
            if all(provably_finite(base_max, tau_max, s, slot.dtype) for s in values):
                continue
            tau_reader = tau_reader or CheckpointReader(staging / TAU_STAR_DIR)
            base_info = plan.base.llm[slot.name]
            base = plan.base.reader.get(base_info.name, copy=False)
            tau = tau_reader.get(slot.name, copy=False)
            check_merged(base, tau, values, tensor=slot.name, file=str(base_info.file), labels=model_sources(plan))
    finally:
        if tau_reader is not None:
            tau_reader.close()


def _write_fused(
    result: FusedResult,
    plan: MergePlan,
    slot_name: str,
    start: int,
    writers: tuple[ShardedWriter | None, dict[str, ShardedWriter]],
    stats: SlotStats,
    ones: list[int],
) -> None:
    """A fused chunk's τ* and packed masks, written where the eager path writes them."""
    tau_writer, mask_writers = writers
    if tau_writer is not None:
        tau_writer.write_range(slot_name, result.stored, start)
    for i, m in enumerate(plan.models):
        mask_writers[m.label].write_range(slot_name, result.packed[i], start // 8)
        ones[i] += result.ones[i]
        stats.delta_l1[m.label] += result.l1[i]


def _private_writers(plan: MergePlan, staging: Path) -> dict[str, ShardedWriter]:
    writers = {}
    for m in plan.models:
        records = plan.private[m.label]
        if not records:
            continue
        directory = staging / COMPONENTS_DIR / m.label
        directory.mkdir(parents=True, exist_ok=True)
        entries = [PlannedTensor(r.name, m.llm[r.name].dtype, tuple(r.shape)) for r in records]
        writers[m.label] = ShardedWriter(directory, entries, 1 << 62, prefix=PRIVATE_FILE.removesuffix(".safetensors"))
    return writers


def _write_private(plan: MergePlan, slot_name: str, writers: dict[str, ShardedWriter]) -> None:
    for m in plan.models:
        for record in plan.private[m.label]:
            if record.name == slot_name:
                tensor = m.reader.get(m.llm[slot_name].name, copy=False)
                writers[m.label].write(slot_name, tensor[record.row_start :])
