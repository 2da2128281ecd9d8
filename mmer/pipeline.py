"""The one place that wires io, merge and checkpoint together: plan → thresholds → merge → components → manifest.

Reads one tensor slot (the base's tensor and every model's counterpart) at a time, so peak memory is set by
the largest tensor, not by the model's depth. Output goes to a staging directory renamed only when complete.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mmer.runtime as runtime
from mmer.checkpoint import bits
from mmer.checkpoint.card import write_card
from mmer.checkpoint.decoupled import (
    BASE_DIR,
    COMPONENTS_DIR,
    MASKS_DIR,
    PRIVATE_FILE,
    RECIPE_NAME,
    TAU_STAR_DIR,
    mask_metadata,
)
from mmer.checkpoint.manifest import (
    MANIFEST_NAME,
    MANIFEST_SHA_NAME,
    MAX_SCALE,
    Manifest,
    ModalityRecord,
    SlotRecord,
)
from mmer.config import ModelSpec, Recipe
from mmer.errors import NonFiniteError
from mmer.io.hashing import hash_files, hash_tree
from mmer.io.reader import DTYPE_NAMES, CheckpointReader, TensorInfo, copy_side_files
from mmer.io.writer import PlannedTensor, ShardedWriter, StagedOutput
from mmer.merge.masks import reconstruct
from mmer.merge.overflow import check_merged, check_task_vector, provably_finite
from mmer.merge.slot import Variant, merge_slot, prepare
from mmer.merge.task_vectors import check_finite, task_vector
from mmer.merge.trim import GlobalThreshold, WindowedThreshold, count_true
from mmer.plan import MergePlan, SourceModel, build_plan
from mmer.progress import NULL_PROGRESS, ProgressSink
from mmer.runtime import peak_rss_bytes, reuse_freed_memory
from mmer.version import __version__


@dataclass
class ModalityReport:
    name: str
    model: str
    lambda_: float
    kept: int
    total: int
    threshold: float | None
    delta_l1: float
    scale: float = 1.0

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "modality": self.name,
            "model": self.model,
            "lambda": self.lambda_,
            "kept": self.kept,
            "total": self.total,
            "density": self.density,
            "trim_threshold": self.threshold,
            "mean_abs_delta": self.delta_l1 / self.total if self.total else 0.0,
            "scale": self.scale,
        }


@dataclass
class MergeReport:
    """What a merge did: returned to Python callers, rendered by the CLI, printed as ``--json``."""

    output: str | None
    dry_run: bool
    plan: dict[str, Any]
    modalities: list[ModalityReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "dry_run": self.dry_run,
            "plan": self.plan,
            "modalities": [m.to_dict() for m in self.modalities],
            "seconds": self.seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "warnings": self.warnings,
        }


def run_merge(
    recipe: Recipe | MergePlan,
    output: str | Path | None,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: ProgressSink | None = None,
) -> MergeReport:
    """Merge ``recipe`` into a decoupled checkpoint at ``output`` (or only plan it, with ``dry_run``).

    ``recipe`` may be a plan already built from one (``build_plan``): a caller that shows the plan first (the
    CLI prints its memory estimate) then opens and checks the models once. A plan passed in stays open for its
    caller to close; one built here is closed here.
    """
    progress = progress or NULL_PROGRESS
    started = time.perf_counter()
    if isinstance(recipe, MergePlan):
        return _merge(recipe, output, overwrite, dry_run, progress, started)
    with build_plan(recipe) as plan:
        return _merge(plan, output, overwrite, dry_run, progress, started)


def _merge(
    plan: MergePlan,
    output: str | Path | None,
    overwrite: bool,
    dry_run: bool,
    progress: ProgressSink,
    started: float,
) -> MergeReport:
    report = MergeReport(output=None if output is None else str(output), dry_run=dry_run, plan=plan.to_dict())
    report.warnings = list(plan.warnings)
    report.seconds["plan"] = time.perf_counter() - started
    if dry_run:
        return report
    if output is None:
        raise ValueError("an output directory is required unless dry_run is set")
    inputs = [m.path for m in [plan.base, *plan.models]]
    staged = StagedOutput(output, overwrite=overwrite, kind="decoupled-checkpoint", protect=inputs)
    with staged as staging, ThreadPoolExecutor(max_workers=1) as hasher:
        report.warnings += staged.warnings
        hashes = {
            m.label: hash_files(m.reader.weight_files(), hasher, plan.recipe.options.hash_inputs)
            for m in [plan.base, *plan.models]
        }
        manifest = execute_plan(plan, staging, hashes, report, progress)
        (staging / RECIPE_NAME).write_text(resolved_recipe(plan).to_yaml(), encoding="utf-8")
        write_card(staging, manifest, report)
        t = time.perf_counter()
        manifest.files = hash_tree(staging, exclude={MANIFEST_NAME, MANIFEST_SHA_NAME})
        manifest.write(staging)
        report.seconds["hash_outputs"] = time.perf_counter() - t
    report.seconds["total"] = time.perf_counter() - started
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def execute_plan(
    plan: MergePlan,
    staging: Path,
    hashes: dict[str, dict[str, Future]],
    report: MergeReport,
    progress: ProgressSink,
) -> Manifest:
    """The steps every writer of a decoupled checkpoint shares: thresholds, the merge pass, components and
    side files, then the manifest (without file hashes) and the per-modality report.

    ``run_merge`` and ``add`` call it on their plans and then add what is theirs (recipe, card, history).
    """
    reuse_freed_memory()
    t = time.perf_counter()
    thresholds = find_global_thresholds(plan, [plan.variant], progress)
    report.seconds["thresholds"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = merge_slots(plan, staging, thresholds, progress)
    report.seconds["merge"] = time.perf_counter() - t
    t = time.perf_counter()
    component_files = {m.label: write_component(m, plan, staging, progress) for m in plan.models}
    if plan.variant.rule.single_model_output:
        copy_side_files(plan.base.path, staging)  # the merged model is loadable from the root
    elif plan.recipe.options.base_storage == "copy":
        copy_side_files(plan.base.path, staging / BASE_DIR)
    report.seconds["components"] = time.perf_counter() - t
    resolved_hashes = {label: {k: f.result() for k, f in files.items()} for label, files in hashes.items()}
    manifest = build_manifest(plan, stats, component_files, resolved_hashes)
    model_thresholds = thresholds.get(plan.variant.threshold_key, [None] * len(plan.models))
    for i, m in enumerate(plan.models):
        report.modalities.append(
            ModalityReport(
                m.label,
                m.spec.model,
                plan.lambda_for(m.label),
                stats.kept[m.label] if not plan.variant.rule.single_model_output else plan.merged_numel,
                plan.merged_numel,
                model_thresholds[i],
                stats.delta_l1[m.label],
                stats.scales.get(m.label, 1.0),
            )
        )
        if stats.delta_l1[m.label] == 0.0:
            report.warnings.append(
                f"{m.label}: its LLM equals the base (all-zero task vector): nothing of it was merged; "
                "frozen-LLM models (BLIP-2, Video-LLaMA) need no merge"
            )
        elif model_thresholds[i] == 0.0:
            # Seen on real full fine-tunes: the rows of a large vocabulary that no training text used stay
            # exactly unchanged, so more than 1 − K of τᵢ is 0 and a global top-K keeps every moved entry.
            report.warnings.append(
                f"{m.label}: the global trim threshold is 0: more than {1 - plan.variant.k:.0%} of its task "
                "vector is exactly zero (e.g. untouched embedding rows), so trimming removed nothing; "
                "--trim-scope per-tensor trims each tensor by K instead"
            )
    return manifest


# ------------------------------------------------------------------------------------------------- thresholds
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


def slot_deltas(
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


def find_global_thresholds(plan: MergePlan, variants: list[Variant], progress: ProgressSink) -> Thresholds:
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
            kernel = _fused_for(plan, slot.name, device)
            for span in slot_spans(slot.numel, device):  # raw task vectors: always elementwise here
                if kernel is not None and _count_fused(plan, slot.name, span or (0, slot.numel), windowed, finders):
                    continue
                _, raw = slot_deltas(plan, slot.name, device, span)
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
            _, raw = slot_deltas(plan, slot.name, device)
            for key in two_pass:
                for search, tau in zip(searches[key], prepare(raw, by_key[key], slot.name), strict=True):
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


# ---------------------------------------------------------------------------------------------------- merging
@dataclass
class SlotStats:
    kept: dict[str, int]
    delta_l1: dict[str, float]
    kept_per_tensor: dict[str, dict[str, int]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)


def tau_dtype(plan: MergePlan, slot_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if plan.recipe.options.delta_dtype == "float32" else slot_dtype


def merge_slots(plan: MergePlan, staging: Path, thresholds: Thresholds, progress: ProgressSink) -> SlotStats:
    """The main pass: per slot, τᵢ → (DARE, trim) → merge → τ* → masks; writes every LLM-side file.

    Decoupled output (a mask rule): base copy, τ*, one mask file per modality, private rows. Single merged
    model (``mask: none``): θ_base + τ* at the output's root as a plain Hugging Face checkpoint, private rows.
    """
    options = plan.recipe.options
    variant = plan.variant
    device = torch.device(options.device)
    model_thresholds = thresholds.get(variant.threshold_key) if variant.needs_global_threshold else None
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
            kernel = _fused_for(plan, slot.name, device, store_dtype)
            for span in slot_spans(slot.numel, device, variant.elementwise):
                start, stop = span or (0, slot.numel)
                if kernel is None or not _merge_fused(
                    plan, slot.name, (start, stop), model_thresholds, store_dtype, writers_by_role, stats, ones
                ):
                    l1: list[float] = []
                    base, raw = slot_deltas(plan, slot.name, device, span, l1=l1)
                    result = merge_slot(raw, variant, slot.name, store_dtype, model_thresholds)
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
                            labels=_sources(plan),
                            masks=result.masks,
                        )
                        before = maxima.get(slot.name, (0.0, 0.0))
                        maxima[slot.name] = (max(before[0], bounds[0]), max(before[1], bounds[1]))
                    if merged_writer is not None:
                        merged = reconstruct(base, result.stored, None)
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


def _sources(plan: MergePlan) -> list[str]:
    """Each model as error messages name it: its modality and where it was read from."""
    return [f"{m.label} ({m.path})" for m in plan.models]


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
            check_merged(base, tau, values, tensor=slot.name, file=str(base_info.file), labels=_sources(plan))
    finally:
        if tau_reader is not None:
            tau_reader.close()


def _fused_for(plan: MergePlan, slot_name: str, device: torch.device, store_dtype: torch.dtype | None = None):
    """``merge.fused`` when its kernels compute exactly what the eager engine would for this slot, else None:
    the threshold pass (no ``store_dtype``) needs only inputs it reads, the merge also the variant and τ*'s dtype."""
    if store_dtype is not None and (plan.variant.rule.single_model_output or not plan.variant.elementwise):
        return None
    from mmer.merge import fused  # imported on first use: it loads numba

    dtypes = [plan.base.llm[slot_name].dtype] + [m.llm[slot_name].dtype for m in plan.models]
    if store_dtype is None:
        return fused if fused.reads(dtypes, device) else None
    return fused if fused.supports(plan.variant, dtypes, store_dtype, device) else None


def _chunk_views(plan: MergePlan, slot_name: str, span: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stored (unconverted) flat entries ``span`` of θ_base and of every model's θᵢ: views of the mapped files."""
    start, stop = span
    base = plan.base.reader.get(plan.base.llm[slot_name].name, copy=False).reshape(-1)[start:stop]
    return base, [m.reader.get(m.llm[slot_name].name, copy=False).reshape(-1)[start:stop] for m in plan.models]


def _count_fused(plan: MergePlan, slot_name: str, span: tuple[int, int], keys: list, finders: dict) -> bool:
    """One chunk's counts for every window, without materialising τᵢ; False when a τᵢ is not finite (the eager
    path then refuses it by name, or counts it as the eager engine does)."""
    from mmer.merge import fused

    base, thetas = _chunk_views(plan, slot_name, span)
    counts = []
    for key in keys:
        windows = [f.window for f in finders[key]]
        counted = fused.window_chunk(base, thetas, [w[0] for w in windows], [w[1] for w in windows])
        if not all(math.isfinite(v) for v in counted.l1):
            return False
        counts.append(counted)
    for key, counted in zip(keys, counts, strict=True):
        for i, finder in enumerate(finders[key]):
            finder.add_counted(counted.numel, counted.below[i], counted.inside[i], counted.candidates[i])
    return True


def _merge_fused(
    plan: MergePlan,
    slot_name: str,
    span: tuple[int, int],
    thresholds: list[float | None] | None,
    store_dtype: torch.dtype,
    writers: tuple[ShardedWriter | None, dict[str, ShardedWriter]],
    stats: SlotStats,
    ones: list[int],
) -> bool:
    """One chunk through the fused kernel; False (nothing written) when a τᵢ is not finite: the eager path then
    runs the chunk, and refuses it naming the tensor or merges it with NaN/inf as the eager engine defines."""
    from mmer.merge import fused

    base, thetas = _chunk_views(plan, slot_name, span)
    result = fused.merge_chunk(base, thetas, plan.variant, thresholds, store_dtype)
    if not all(math.isfinite(v) for v in result.l1):
        return False
    if not plan.recipe.options.allow_nonfinite:  # the fused variant's mask (mmer) has no rescaler: sᵢ = 1
        check_merged(
            base,
            result.stored,
            [1.0] * len(plan.models),
            tensor=slot_name,
            file=str(plan.base.llm[slot_name].file),
            labels=_sources(plan),
            masks=lambda: [bits.unpack(packed, (base.numel(),)) for packed in result.packed],
        )
    tau_writer, mask_writers = writers
    if tau_writer is not None:
        tau_writer.write_range(slot_name, result.stored, span[0])
    for i, m in enumerate(plan.models):
        mask_writers[m.label].write_range(slot_name, result.packed[i], span[0] // 8)
        ones[i] += result.ones[i]
        stats.delta_l1[m.label] += result.l1[i]
    return True


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


def pass_through(writer: ShardedWriter, name: str, reader: CheckpointReader, info: TensorInfo) -> None:
    """Write a stored tensor unchanged as ``name``: file to file in the kernel when it sits in a safetensors
    file (the base copy is a third of the output; routing it through memory cost seconds of page faults)."""
    if info.byte_range is not None:
        writer.copy_from_file(name, info.file, info.byte_range[0], info.dtype, info.shape)
    else:
        writer.write(name, reader.get(info.name, copy=False))


def _write_private(plan: MergePlan, slot_name: str, writers: dict[str, ShardedWriter]) -> None:
    for m in plan.models:
        for record in plan.private[m.label]:
            if record.name == slot_name:
                tensor = m.reader.get(m.llm[slot_name].name, copy=False)
                writers[m.label].write(slot_name, tensor[record.row_start :])


# ------------------------------------------------------------------------------------------------- components
def write_component(model: SourceModel, plan: MergePlan, staging: Path, progress: ProgressSink) -> list[str]:
    """Copy a model's non-LLM tensors (towers, projectors) untouched, plus its config and tokenizer files."""
    directory = staging / COMPONENTS_DIR / model.label
    directory.mkdir(parents=True, exist_ok=True)
    copy_side_files(model.path, directory)
    if not model.components:
        return []
    stage = f"component {model.label}"
    entries = [PlannedTensor(i.name, i.dtype, i.shape) for i in model.components]
    progress.start(stage, sum(i.nbytes for i in model.components))
    writer = ShardedWriter(directory, entries, plan.recipe.options.shard_size)
    try:
        for info in model.components:
            pass_through(writer, info.name, model.reader, info)
            progress.advance(stage, info.nbytes)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.end(stage)
    return [i.name for i in model.components]


# ----------------------------------------------------------------------------------------------------- record
def build_manifest(
    plan: MergePlan, stats: SlotStats, component_files: dict[str, list[str]], hashes: dict[str, dict[str, str | None]]
) -> Manifest:
    options = plan.recipe.options
    single_model = plan.variant.rule.single_model_output
    modalities = {}
    for m in plan.models:
        modalities[m.label] = ModalityRecord(
            name=m.label,
            source=m.record(hashes[m.label]),
            lambda_=plan.lambda_for(m.label),
            mask_file=None if single_model else f"{MASKS_DIR}/{m.label}.safetensors",
            component_dir=f"{COMPONENTS_DIR}/{m.label}",
            kept=stats.kept[m.label],
            total=plan.merged_numel,
            kept_per_tensor=stats.kept_per_tensor[m.label],
            llm_keys={name: info.name for name, info in m.llm.items()},
            component_tensors=component_files[m.label],
            private=plan.private[m.label],
            vocab_size=_vocab_rows(m),
            scale=stats.scales.get(m.label, 1.0),
            weight=1.0 if m.spec.weight is None else m.spec.weight,
        )
    tau_dtypes = sorted({DTYPE_NAMES[tau_dtype(plan, s.dtype)] for s in plan.merged_slots})
    resolved = {**options.to_dict(), "alpha": plan.variant.alpha}
    base_copied = options.base_storage == "copy" and not single_model
    return Manifest(
        mmer_version=__version__,
        options=resolved,
        base=plan.base.record(hashes["base"]),
        base_storage="copy" if base_copied else "reference",
        base_dir=BASE_DIR if base_copied else None,
        tau_star_dir=None if single_model else TAU_STAR_DIR,
        tau_star_dtype="/".join(tau_dtypes),
        merged_dir="." if single_model else None,
        slots=[
            SlotRecord(s.name, list(s.shape), DTYPE_NAMES.get(s.dtype, str(s.dtype)), s.merged, s.reason)
            for s in plan.slots
        ],
        modalities=modalities,
    )


def _vocab_rows(model: SourceModel) -> int | None:
    info = model.llm.get("model.embed_tokens.weight")
    return info.shape[0] if info is not None else None


def resolved_recipe(plan: MergePlan) -> Recipe:
    """The recipe with every default resolved (α, each modality's λ), Hub revisions pinned to the commit they
    resolved to and local paths made absolute, so the run repeats exactly from any working directory."""
    from dataclasses import replace

    def pin(model: SourceModel, lam: float | None = None) -> ModelSpec:
        spec = replace(model.spec, lambda_=lam)
        if model.resolved.commit:
            return replace(spec, revision=model.resolved.commit)
        return replace(spec, model=str(model.resolved.path))

    options = replace(plan.recipe.options, alpha=plan.variant.alpha)
    models = tuple(pin(m, plan.lambda_for(m.label)) for m in plan.models)
    return Recipe(pin(plan.base), models, options)
