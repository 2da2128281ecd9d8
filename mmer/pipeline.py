"""A merge from recipe to decoupled checkpoint: plan → thresholds → merge pass → components → manifest.

This module wires the steps and writes what is the artifact's alone (components, side files, manifest, recipe,
card); the passes over the weights are the engine's (``mmer.engine``), which compare, tune and add share.
Output goes to a staging directory renamed only when complete.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmer.checkpoint.decoupled import BASE_DIR, COMPONENTS_DIR, MASKS_DIR, TAU_STAR_DIR
from mmer.checkpoint.finish import finish_checkpoint
from mmer.checkpoint.manifest import Manifest, ModalityRecord, SlotRecord
from mmer.checkpoint.quant import record_encoding, store_tau_star
from mmer.config import ModelSpec, Recipe
from mmer.engine import SlotStats, count_majority, find_thresholds, merge_slots, tau_dtype
from mmer.engine.merge_pass import verifies_guesses
from mmer.engine.trim_warnings import trim_warnings
from mmer.io.hashing import hash_files
from mmer.io.reader import DTYPE_NAMES, copy_side_files
from mmer.io.writer import PlannedTensor, ShardedWriter, StagedOutput, pass_through
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
        finish_checkpoint(staging, manifest, report, resolved_recipe(plan).to_yaml())
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
    # a threshold the sample pins to one magnitude is confirmed by the merge's own pass (engine.merge_pass)
    unverified: list | None = [] if verifies_guesses(plan) else None
    thresholds = find_thresholds(plan, [plan.variant], progress, unverified)
    report.seconds["thresholds"] = time.perf_counter() - t
    if plan.variant.needs_census:  # zero_sign majority: the variant carries its census from here on, recorded
        t = time.perf_counter()
        (plan.variant,) = count_majority(plan, [plan.variant], thresholds, progress)
        report.plan.setdefault("options", {}).update(plan.variant.recorded())
        report.seconds["sign_census"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = merge_slots(plan, staging, thresholds, progress, unverified)
    # τ* in the recipe's tau_storage, once every mask is made from the exact τ*
    encoding = store_tau_star(staging, plan.recipe.options, [(s.name, tuple(s.shape)) for s in plan.merged_slots])
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
    record_encoding(manifest, encoding)
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
    report.warnings += trim_warnings(
        [m.label for m in plan.models],
        thresholds.get(plan.variant.threshold_key) if plan.variant.dare == 0 else None,
        plan.variant.ks(len(plan.models)),
        stats.delta_l1,
    )
    return manifest


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
            k=m.spec.k,
            dare=m.spec.dare,
        )
    tau_dtypes = sorted({DTYPE_NAMES[tau_dtype(plan, s.dtype)] for s in plan.merged_slots})
    resolved = {**options.to_dict(), "alpha": plan.variant.alpha, **plan.variant.recorded()}
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
