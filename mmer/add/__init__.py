"""Add fine-tuned models to a decoupled checkpoint: MMER's forgetting mitigation (docs/method.md §6).

When one modality's MLLM is fine-tuned on a new task, its LLM is one more task vector τ_new = θ_new − θ_base. The
paper re-merges all n+1 task vectors into a new τ* and derives n+1 masks; the old tasks keep their own masks
(rebuilt against the new τ*), the new task gets its own. :func:`add_models` does exactly that, through the same
engine and writer as ``mmer merge``, and chooses for every modality already in the checkpoint where its τᵢ
comes from:

- **original**: its fine-tuned model, found where the checkpoint's manifest says it came from (a local
  directory that still exists, a Hub id already in the local cache) or where the caller says it now is
  (``sources``), and checked against the sha256 the manifest recorded. With every original at hand the result is
  bit for bit the checkpoint ``mmer merge`` writes from all n+1 models (``tests/test_add.py`` checks it).
- **stand-in**: without it, its reconstruction from the checkpoint, θ̂ᵢ = θ_base + mᵢ∘τ* (private vocabulary
  rows and components unchanged), read slot by slot. The stand-in task vector is θ̂ᵢ − θ_base, exactly what
  ``mmer merge`` would compute if given the rebuilt model as the input: the result equals merging
  ``mmer reconstruct``'s output for the old modalities with the new models (also tested), without writing the
  rebuilt models anywhere. How far that is from the exact re-merge is measured by :func:`mmer.add.gap.measure_gap`.

Which of the two each modality used is recorded three ways: in ``mmer_add.json`` (a history of every add, listed
with its hash in the manifest), as a comment at the top of ``mmer_recipe.yaml`` (whose models are the originals:
``mmer merge --recipe`` on it gives the *exact* re-merge), and in the model card. The manifest itself keeps its
format: a stand-in modality keeps the source record of its original model, since that is what it stands for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from mmer.add.record import HISTORY_NAME, add_history, card_section, full_recipe, recipe_header
from mmer.add.report import MODES, ORIGINAL, STAND_IN, AddError, AddReport, OldModality
from mmer.checkpoint import bits
from mmer.checkpoint.decoupled import DecoupledCheckpoint, MaskFile, check_source_files, load_decoupled
from mmer.checkpoint.finish import finish_checkpoint
from mmer.checkpoint.sources import (
    base_read_spec,
    check_source_names,
    checkpoint_options,
    original_spec,
    pinned_spec,
)
from mmer.checkpoint.standin import SlotCache, StandInReader
from mmer.config import ModelSpec, Recipe, load_spec
from mmer.errors import ConfigError, DecoupledFormatError, IncompatibleBaseError, ModelNotFoundError
from mmer.io.hashing import hash_files, known
from mmer.io.layouts import layout_named
from mmer.io.outputs import check_target
from mmer.io.reader import DTYPE_NAMES, read_json
from mmer.io.resolve import ResolvedModel, resolve_model
from mmer.io.writer import StagedOutput
from mmer.pipeline import MergeReport, execute_plan
from mmer.plan import MergePlan, SourceModel, build_plan, estimate_memory, resolve_variant
from mmer.progress import NULL_PROGRESS, ProgressSink
from mmer.runtime import peak_rss_bytes


def stand_in_source(ckpt: DecoupledCheckpoint, name: str, cache: SlotCache | None = None) -> SourceModel:
    """A :class:`SourceModel` for old modality ``name`` whose weights are its reconstruction from ``ckpt``."""
    record = ckpt.modality(name)
    layout = layout_named(record.source.layout)
    if layout is None:
        raise DecoupledFormatError(
            f"{ckpt.path}: modality {name!r} has unknown layout {record.source.layout!r}",
            key=name,
            hint="the manifest is from a newer mmer or corrupt",
        )
    reader = StandInReader(ckpt, name, cache or SlotCache(ckpt))
    config_path = reader.directory / "config.json"
    config = read_json(config_path) if config_path.is_file() else None
    llm = {canonical: reader.tensors[disk] for disk, canonical in reader._canonical.items()}
    components = [reader.tensors[n] for n in record.component_tensors]
    spec = pinned_spec(name, record)
    resolved = ResolvedModel(spec_model=spec.model, path=reader.directory)
    return SourceModel(spec, resolved, reader, layout, config, llm, components)  # type: ignore[arg-type]


def add_models(
    checkpoint: str | Path,
    specs: Sequence[str | Path | ModelSpec],
    output: str | Path | None,
    *,
    sources: Mapping[str, str | Path] | None = None,
    mode: str = "auto",
    device: str | None = None,
    check_sources: bool = True,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: ProgressSink | None = None,
) -> AddReport:
    """Add fine-tuned models (new tasks of existing modalities, or new modalities) to a decoupled checkpoint.

    Args:
        checkpoint: the output directory of ``mmer merge`` (or of an earlier ``add``).
        specs: one model YAML (or :class:`ModelSpec`) per model to add, each with a ``modality`` name the
            checkpoint does not have yet (a new task of the vision modality gets e.g. ``vision_flickr``).
        output: where the new checkpoint goes (appears only when complete).
        sources: where an old modality's original model is now, by modality name, when not where the
            manifest recorded it.
        mode: ``auto`` re-merges each old modality from its original when at hand and checked, else from its
            stand-in; ``exact`` requires every original (the paper's procedure) and refuses otherwise;
            ``standin`` uses every old modality's reconstruction even where the original exists.
        device: where the arithmetic runs (default: as the checkpoint was merged).
        check_sources: compare each original's files with the sha256 the manifest recorded; a changed original
            is an error in ``exact`` mode and falls back to its stand-in (with a warning) in ``auto`` mode.
        overwrite: replace an existing ``output``.
        dry_run: decide and check everything (originals are hashed when checked), merge and write nothing.
        progress: receives the merge's stages.
    """
    progress = progress or NULL_PROGRESS
    started = time.perf_counter()
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}", key="mode", hint="auto, exact or standin")
    new = _load_new_specs(specs)
    ckpt = load_decoupled(checkpoint)
    try:
        if ckpt.manifest.base_storage == "reference" and not ckpt.is_single_model:
            ckpt.reference_base()  # the base it re-merges from must be the one it was merged from
        report = _add(
            ckpt, new, output, dict(sources or {}), mode, device, check_sources, overwrite, dry_run, progress
        )
    finally:
        ckpt.close()
    report.seconds = time.perf_counter() - started
    return report


def _load_new_specs(specs: Sequence[str | Path | ModelSpec]) -> list[tuple[ModelSpec, str | None]]:
    if not specs:
        raise ConfigError("no model to add", key="specs", hint="pass one YAML per fine-tuned model to add")
    out = []
    for item in specs:
        if isinstance(item, ModelSpec):
            out.append((item, None))
        else:
            out.append((load_spec(item), str(item)))
    return out


def _add(
    ckpt: DecoupledCheckpoint,
    new: list[tuple[ModelSpec, str | None]],
    output: str | Path | None,
    sources: dict[str, str | Path],
    mode: str,
    device: str | None,
    check_sources: bool,
    overwrite: bool,
    dry_run: bool,
    progress: ProgressSink,
) -> AddReport:
    report = AddReport(str(ckpt.path), None if output is None else str(output), dry_run)
    existing = set(ckpt.modalities)
    seen: dict[str, str] = {}
    for spec, file in new:
        where = file or spec.model
        if spec.modality is None:
            raise ConfigError(
                f"{where}: the model to add has no modality",
                file=file,
                key="modality",
                hint="name its task, e.g. `modality: vision_flickr` for a new vision task",
            )
        if spec.modality in existing:
            raise AddError(
                f"{where}: modality {spec.modality!r} is already in {ckpt.path}",
                file=file,
                key="modality",
                hint=f"every task gets its own mask: give the new one its own name, e.g. {spec.modality}_2 "
                f"(existing: {', '.join(ckpt.modalities)})",
            )
        if spec.modality in seen:
            raise ConfigError(
                f"{where}: modality {spec.modality!r} is added twice (also by {seen[spec.modality]})",
                file=file,
                key="modality",
                hint="give each added model its own modality name",
            )
        seen[spec.modality] = where
    check_source_names(ckpt, sources)
    if output is None and not dry_run:
        raise ConfigError("no output directory", key="output", hint="pass -o merged2/ (or --dry-run)")
    if output is not None and not dry_run:
        check_target(output, overwrite, [ckpt.path])  # before the originals are hashed, not after
    options = checkpoint_options(ckpt, device=device)

    # Where every old modality's task vector comes from.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for name in ckpt.modalities:
            report.old[name] = _locate(ckpt, name, sources.get(name), mode, check_sources, pool, report.warnings)
    stand_ins = [o.name for o in report.old.values() if o.source == STAND_IN]
    if stand_ins and ckpt.is_single_model:
        raise AddError(
            f"{ckpt.path} is a single merged model (mask rule none): it kept no per-modality information, so "
            f"{', '.join(stand_ins)} cannot stand in for their originals",
            file=str(ckpt.path),
            key="mode",
            hint="give the original models (--source MODALITY=PATH), or add to a checkpoint with masks",
        )
    plan = _plan(ckpt, report.old, [s for s, _ in new], options)
    try:
        report.added = {m.label: _describe_new(ckpt, m) for m in plan.models if m.label in seen}
        if dry_run:
            report.merge = MergeReport(output=report.output, dry_run=True, plan=plan.to_dict(), warnings=plan.warnings)
            report.warnings += plan.warnings
            return report
        report.merge = _execute(ckpt, plan, report, output, overwrite, progress)  # type: ignore[arg-type]
        report.warnings += report.merge.warnings
    finally:
        plan.close()
    return report


def _locate(
    ckpt: DecoupledCheckpoint,
    name: str,
    explicit: str | Path | None,
    mode: str,
    check: bool,
    pool: ThreadPoolExecutor,
    warnings: list[str],
) -> OldModality:
    record = ckpt.modality(name)
    old = OldModality(name, record, pinned_spec(name, record), STAND_IN, "", density_before=record.density)
    if mode == "standin":
        old.reason = "stand-in asked for (mode standin)"
        return old
    spec = original_spec(ckpt, name, explicit, local_only=mode == "auto")
    if spec is None:
        if mode == "exact":
            raise AddError(
                f"{name}: its original model {record.source.model} is not at hand",
                file=record.source.model,
                key=name,
                hint=f"pass --source {name}=PATH to where it is now, or use --mode auto to let its "
                "reconstruction from the checkpoint stand in for it",
            )
        old.reason = f"original {record.source.model} not found"
        return old
    try:
        resolved = resolve_model(spec.model, spec.revision)
    except ModelNotFoundError as err:
        if mode == "exact" or explicit is not None:
            raise AddError(
                f"{name}: its original model cannot be opened ({err.message})",
                file=err.file,
                key=name,
                hint=err.hint or f"pass --source {name}=PATH",
            ) from None
        old.reason = f"original {spec.model} cannot be opened"
        return old
    if check:
        checked = check_source_files(record.source, resolved.path, every_file=True, pool=pool)
        if checked.problems:
            problem = checked.problems[0]
            if mode == "exact" or explicit is not None:
                raise AddError(
                    f"{name}: {resolved.path} is not the model that was merged: {problem}",
                    file=str(resolved.path),
                    key=name,
                    hint="point --source to the model that was merged, use --mode standin, or pass "
                    "--no-check-sources if you know the tensors are the same",
                )
            warnings.append(
                f"{name}: {resolved.path} changed since the merge ({problem}); its reconstruction stands in"
            )
            old.reason = f"original {resolved.path} changed since the merge"
            return old
        old.hashes = checked.hashes
        if record.source.files and all(v is None for v in record.source.files.values()):
            warnings.append(
                f"{name}: the checkpoint recorded no hashes (merged with --no-hash-inputs); "
                f"{resolved.path} was used unchecked"
            )
    old.source = ORIGINAL
    old.read_from = spec
    old.reason = "original found" + (f" at {explicit}" if explicit is not None else "")
    return old


def _plan(ckpt: DecoupledCheckpoint, old: dict[str, OldModality], new: list[ModelSpec], options: Any) -> MergePlan:
    """The merge plan of all n+1 models, old ones first in the checkpoint's order (as ``mmer merge`` of all
    n+1 would have them), stand-ins reading from the checkpoint."""
    base_read = base_read_spec(ckpt)
    real = [o.read_from for o in old.values() if o.read_from is not None] + new
    real_plan = build_plan(Recipe(base_read, tuple(real), options))  # type: ignore[arg-type]
    try:
        _check_slots(ckpt, real_plan)
        by_label = {m.label: m for m in real_plan.models}
        cache = SlotCache(ckpt)
        models: list[SourceModel] = []
        for o in old.values():
            models.append(by_label[o.name] if o.read_from is not None else stand_in_source(ckpt, o.name, cache))
        models += [by_label[s.modality] for s in new]  # type: ignore[index]
        specs = tuple(o.read_from or o.spec for o in old.values()) + tuple(new)
        recipe = Recipe(base_read, specs, options)  # type: ignore[arg-type]
        private = dict(real_plan.private)
        for o in old.values():
            if o.read_from is None:
                private[o.name] = list(o.record.private)
        plan = MergePlan(recipe, real_plan.base, models, real_plan.slots, private, resolve_variant(recipe))
        plan.warnings = list(real_plan.warnings)
        plan.estimate = estimate_memory(plan)
    except BaseException:
        real_plan.close()
        raise
    return plan


def _check_slots(ckpt: DecoupledCheckpoint, plan: MergePlan) -> None:
    """The base read now is the base the checkpoint was made from, tensor for tensor."""
    old = {s.name: s for s in ckpt.slots}
    for slot in plan.slots:
        before = old.get(slot.name)
        dtype = DTYPE_NAMES.get(slot.dtype, str(slot.dtype))
        if before is None or list(before.shape) != list(slot.shape) or before.dtype != dtype:
            raise IncompatibleBaseError(
                f"{plan.base.path}: base tensor {slot.name!r} ({dtype} {list(slot.shape)}) differs from the one "
                f"{ckpt.path} was merged from" + ("" if before is None else f" ({before.dtype} {before.shape})"),
                file=str(plan.base.path),
                tensor=slot.name,
                hint="the base must be the one the checkpoint was merged from",
            )
    if len(old) != len(plan.slots):
        missing = sorted(set(old) - {s.name for s in plan.slots})
        raise IncompatibleBaseError(
            f"{plan.base.path}: the base lacks {missing[0]!r}, which {ckpt.path} was merged with",
            file=str(plan.base.path),
            tensor=missing[0],
            hint="the base must be the one the checkpoint was merged from",
        )


def _describe_new(ckpt: DecoupledCheckpoint, model: SourceModel) -> dict[str, Any]:
    """A new task of an existing modality shares its components (encoder, projector: frozen while the LLM was
    fine-tuned, §6); anything else is a new modality."""
    mine = {i.name: (tuple(i.shape), i.dtype) for i in model.components}
    kind = "new modality"
    for name in ckpt.modalities:
        record = ckpt.modality(name)
        reader = ckpt.component_reader(name)
        theirs = (
            {}
            if reader is None
            else {
                n: (tuple(reader.tensors[n].shape), reader.tensors[n].dtype)
                for n in record.component_tensors
                if n in reader.tensors
            }
        )
        if mine and mine == theirs:
            kind = f"new task of {name}"
            break
    return {"model": model.spec.model, "path": str(model.path), "kind": kind, "layout": model.layout.name}


def _execute(
    ckpt: DecoupledCheckpoint,
    plan: MergePlan,
    report: AddReport,
    output: str | Path,
    overwrite: bool,
    progress: ProgressSink,
) -> MergeReport:
    """``run_merge``'s steps on the assembled plan, then the record of what ``add`` did."""
    started = time.perf_counter()
    options = plan.recipe.options
    merge = MergeReport(output=str(output), dry_run=False, plan=plan.to_dict(), warnings=list(plan.warnings))
    stand_ins = {o.name for o in report.old.values() if o.source == STAND_IN}
    inputs = [ckpt.path, plan.base.path, *(m.path for m in plan.models)]
    staged = StagedOutput(output, overwrite=overwrite, kind="decoupled-checkpoint", protect=inputs)
    with staged as staging, ThreadPoolExecutor(max_workers=1) as hasher:
        merge.warnings += staged.warnings
        hashes: dict[str, dict[str, Future]] = {"base": {}}
        for m in plan.models:
            old = report.old.get(m.label)
            if m.label in stand_ins:
                hashes[m.label] = {}
            elif options.hash_inputs and old is not None and old.hashes and None not in old.hashes.values():
                hashes[m.label] = {k: known(v) for k, v in old.hashes.items()}  # hashed when checked
            else:
                hashes[m.label] = hash_files(m.reader.weight_files(), hasher, options.hash_inputs)
        manifest = execute_plan(plan, staging, hashes, merge, progress)
        # The base is the same tensors whichever copy was read: keep the record of the original base.
        manifest.base = ckpt.manifest.base
        for name in stand_ins:
            record = manifest.modalities[name]
            record.source = ckpt.modality(name).source  # the stand-in stands for its original model
            record.llm_keys = dict(ckpt.modality(name).llm_keys)
        for name, old in report.old.items():
            old.density_after = manifest.modalities[name].density
            if not plan.variant.rule.single_model_output and not ckpt.is_single_model:
                old.mask_bits_changed = _mask_bits_changed(ckpt, name, staging / manifest.modalities[name].mask_file)
        recipe = recipe_header(ckpt, report) + full_recipe(ckpt, plan, report).to_yaml()
        history = add_history(ckpt, report)
        (staging / HISTORY_NAME).write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
        finish_checkpoint(staging, manifest, merge, recipe, card_section(ckpt, report))
    merge.seconds["total"] = time.perf_counter() - started
    merge.peak_rss_bytes = peak_rss_bytes()
    return merge


def _mask_bits_changed(ckpt: DecoupledCheckpoint, name: str, new_file: Path) -> int:
    """Bits where the modality's new mask differs from its old one (xor of the packed bytes, no unpacking)."""
    before = ckpt.mask_file(name)
    after = MaskFile(new_file)
    changed = 0
    for tensor in before.shapes:
        changed += bits.popcount(torch.bitwise_xor(before.packed(tensor), after.packed(tensor)))
    return changed
