"""Add fine-tuned models to an existing decoupled checkpoint: MMER's forgetting mitigation (docs/method.md §6).

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
  rebuilt models anywhere. How far that is from the exact re-merge is measured by :func:`measure_gap`.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mmer.checkpoint import bits
from mmer.checkpoint.decoupled import (
    BASE_DIR,
    PRIVATE_FILE,
    DecoupledCheckpoint,
    MaskFile,
    load_decoupled,
    modality_tensor,
    slot_dtype,
)
from mmer.checkpoint.finish import finish_checkpoint
from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME, ModalityRecord, SourceRecord
from mmer.config import ModelSpec, Recipe, load_spec, options_from_dict
from mmer.errors import ConfigError, DecoupledFormatError, IncompatibleBaseError, MmerError, ModelNotFoundError
from mmer.io.hashing import file_sha256, hash_files, known
from mmer.io.jsonfile import read_json_file
from mmer.io.layouts import LAYOUTS
from mmer.io.outputs import check_target
from mmer.io.reader import DTYPE_NAMES, CheckpointReader, TensorInfo, read_json
from mmer.io.reader import read_safetensors_header as _read_header
from mmer.io.resolve import HUB_PATTERNS, ResolvedModel, cached_blob_sha256, resolve_model
from mmer.io.writer import StagedOutput
from mmer.merge.error import error_l1, relative_error, tau_l1
from mmer.merge.masks import reconstruct
from mmer.pipeline import MergeReport, execute_plan, resolved_recipe
from mmer.plan import MergePlan, SourceModel, build_plan, estimate_memory, open_source, resolve_variant
from mmer.progress import NULL_PROGRESS, ProgressSink
from mmer.runtime import peak_rss_bytes
from mmer.version import __version__

MODES = ("auto", "exact", "standin")
ORIGINAL = "original"
STAND_IN = "stand-in"
HISTORY_NAME = "mmer_add.json"
HISTORY_FORMAT = "mmer-add/1"


class AddError(MmerError):
    """A model cannot be added as asked: an original is missing or changed, or the checkpoint cannot stand in."""


# ---------------------------------------------------------------------------------------------------- reports
@dataclass
class OldModality:
    """A modality already in the checkpoint, and where its task vector comes from in the re-merge."""

    name: str
    record: ModalityRecord
    spec: ModelSpec  # its original model, pinned as the manifest recorded it (what the recipe names)
    source: str  # ORIGINAL or STAND_IN
    reason: str
    read_from: ModelSpec | None = None  # where the original is read (None for a stand-in)
    hashes: dict[str, str | None] | None = None  # sha256 of the original's files, when checked
    mask_bits_changed: int | None = None
    density_before: float = 0.0
    density_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "reason": self.reason,
            "model": self.spec.model,
            "read_from": None if self.read_from is None else self.read_from.model,
            "density_before": self.density_before,
            "density_after": self.density_after,
            "mask_bits_changed": self.mask_bits_changed,
        }


@dataclass
class AddReport:
    """What :func:`add_models` did: returned to Python callers, rendered by the CLI, printed by ``--json``."""

    checkpoint: str
    output: str | None
    dry_run: bool
    added: dict[str, dict[str, Any]] = field(default_factory=dict)
    old: dict[str, OldModality] = field(default_factory=dict)
    merge: MergeReport | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exact(self) -> bool:
        """True when every old modality was re-merged from its original (the paper's procedure, bit exact)."""
        return all(o.source == ORIGINAL for o in self.old.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "output": self.output,
            "dry_run": self.dry_run,
            "exact": self.exact,
            "added": self.added,
            "old": {name: o.to_dict() for name, o in self.old.items()},
            "merge": None if self.merge is None else self.merge.to_dict(),
            "warnings": self.warnings,
            "seconds": self.seconds,
        }


# --------------------------------------------------------------------------------------------------- recipes
def pinned_spec(name: str, record: ModalityRecord) -> ModelSpec:
    """A modality's original model as the manifest recorded it: a Hub id pinned to its commit, or a local path."""
    src = record.source
    return ModelSpec(
        model=src.model,
        revision=src.commit,
        modality=name,
        lambda_=record.lambda_,
        weight=None if record.weight == 1.0 else record.weight,
    )


def base_spec(ckpt: DecoupledCheckpoint) -> ModelSpec:
    """The base LLM as the manifest recorded it (what a recipe names)."""
    return ModelSpec(ckpt.manifest.base.model, revision=ckpt.manifest.base.commit)


def base_read_spec(ckpt: DecoupledCheckpoint) -> ModelSpec:
    """Where the base's tensors are read: the checkpoint's own copy when it has one (the same bytes), else the
    reference the manifest pins."""
    manifest = ckpt.manifest
    if manifest.base_storage == "copy" and manifest.merged_dir is None:
        return ModelSpec(str(ckpt.path / (manifest.base_dir or BASE_DIR)))
    return base_spec(ckpt)


def checkpoint_options(ckpt: DecoupledCheckpoint, **overrides: Any):
    """The merge options the checkpoint was made with (from its manifest), with ``overrides`` applied."""
    options = options_from_dict(ckpt.manifest.options, file=str(ckpt.path / MANIFEST_NAME))
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(options, **changes) if changes else options


def check_source_names(ckpt: DecoupledCheckpoint, sources: Mapping[str, Any] | None, key: str = "source") -> None:
    """Every modality named in ``sources`` exists in the checkpoint."""
    for name in sources or {}:
        if name not in ckpt.manifest.modalities:
            raise ConfigError(
                f"{key} given for modality {name!r}, which {ckpt.path} does not have",
                key=key,
                hint=f"its modalities are: {', '.join(ckpt.modalities)}",
            )


def original_spec(
    ckpt: DecoupledCheckpoint, name: str, explicit: str | Path | None = None, *, local_only: bool = True
) -> ModelSpec | None:
    """Where modality ``name``'s original model can be read, or ``None`` when it is not at hand.

    ``explicit`` (a directory or Hub id the caller gives) wins. Otherwise the manifest's source: a local
    directory that still exists, or a Hub id at its recorded commit; with ``local_only`` a Hub id counts only
    when that commit is already in the local cache (nothing is downloaded to find out).
    """
    record = ckpt.modality(name)
    spec = pinned_spec(name, record)
    if explicit is not None:
        return replace(spec, model=str(explicit), revision=None)
    if record.source.commit is None:
        return spec if Path(record.source.model).is_dir() else None
    if local_only and not _in_hub_cache(record.source.model, record.source.commit):
        return None
    return spec


def _in_hub_cache(repo_id: str, commit: str) -> bool:
    try:
        import huggingface_hub

        huggingface_hub.snapshot_download(repo_id, revision=commit, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except Exception:  # not cached, not a valid id, no huggingface_hub: not at hand either way
        return False
    return True


def source_mismatch(
    record: SourceRecord, resolved: ResolvedModel, pool: ThreadPoolExecutor | None = None
) -> tuple[str | None, dict[str, str | None]]:
    """Compare a model's weight files with what the manifest recorded when it was merged.

    Returns ``(problem or None, sha256 by file name)``. The file names must match; each recorded sha256 is
    compared (Hub-cache files are hashed for free by their blob name, local files are read once).
    """
    reader = CheckpointReader(resolved.path)
    try:
        files = {f.name: f for f in reader.weight_files()}
    finally:
        reader.close()
    recorded = record.files or {}
    if recorded and set(files) != set(recorded):
        missing = sorted(set(recorded) - set(files)) or sorted(set(files) - set(recorded))
        return f"its weight files differ from those merged ({missing[0]})", {}
    own_pool = pool is None
    pool = pool or ThreadPoolExecutor(max_workers=2)
    try:
        futures: dict[str, Future] = {}
        for name, path in files.items():
            cached = cached_blob_sha256(path)
            if cached is not None:
                futures[name] = known(cached)
            else:
                futures[name] = pool.submit(file_sha256, path) if recorded.get(name) is not None else known(None)
        hashes = {name: f.result() for name, f in futures.items()}
    finally:
        if own_pool:
            pool.shutdown()
    for name, digest in recorded.items():
        if digest is not None and hashes.get(name) is not None and hashes[name] != digest:
            return f"{name} differs from the file merged (sha256 {hashes[name][:12]}… ≠ {digest[:12]}…)", hashes
    return None, hashes


# ----------------------------------------------------------------------------------------------- stand-ins
class _SlotCache:
    """θ_base and τ* of the slot being read, shared by every stand-in (they are read model after model)."""

    def __init__(self, ckpt: DecoupledCheckpoint) -> None:
        self.ckpt = ckpt
        self._name: str | None = None
        self._base: torch.Tensor | None = None
        self._tau: torch.Tensor | None = None

    def get(self, name: str, merged: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if name != self._name:
            self._name = None
            self._base = self.ckpt.base_tensor(name)
            self._tau = self.ckpt.tau_star(name) if merged else None
            self._name = name
        return self._base, self._tau  # type: ignore[return-value]


class StandInReader:
    """One old modality's model, read back from the decoupled checkpoint as if it were a checkpoint on disk.

    Duck-types :class:`mmer.io.reader.CheckpointReader` for the merge engine: LLM tensors under the source's own
    keys are θ̂ᵢ = θ_base + sᵢ·mᵢ∘τ* (base dtype) with the private rows appended (the stored rows, in their
    stored dtype), component tensors are the stored components. Nothing is held beyond the slot being read.
    """

    format = "safetensors"

    def __init__(self, ckpt: DecoupledCheckpoint, modality: str, cache: _SlotCache) -> None:
        self.ckpt = ckpt
        self.modality = modality
        self.cache = cache
        record = ckpt.modality(modality)
        self.record = record
        self.directory = ckpt.path / record.component_dir
        self.files: list[Path] = []
        slots = {s.name: s for s in ckpt.slots}
        self._slots = slots
        self._private = {p.name: p for p in record.private}
        private_dtypes: dict[str, torch.dtype] = {}
        if record.private:
            infos, _ = _read_header(self.directory / PRIVATE_FILE)
            for p in record.private:
                if p.name not in infos:
                    raise DecoupledFormatError(
                        f"{self.directory / PRIVATE_FILE}: no private tensor {p.name!r} listed in the manifest",
                        file=str(self.directory / PRIVATE_FILE),
                        tensor=p.name,
                        hint="the checkpoint is incomplete; re-run the merge",
                    )
                private_dtypes[p.name] = infos[p.name].dtype
        self.tensors: dict[str, TensorInfo] = {}
        self._canonical: dict[str, str] = {}
        where = self.directory / "(rebuilt from the decoupled checkpoint)"
        for canonical, disk in record.llm_keys.items():
            slot = slots.get(canonical)
            if slot is None:
                continue  # a buffer the base does not have: never merged, never needed
            shape = list(slot.shape)
            dtype = slot_dtype(slot)
            p = self._private.get(canonical)
            if p is not None:
                dtype = private_dtypes[canonical]
                shape = list(p.shape) if p.row_start == 0 else [p.row_start + p.shape[0], *shape[1:]]
            self.tensors[disk] = TensorInfo(disk, dtype, tuple(shape), where)
            self._canonical[disk] = canonical
        components = ckpt.component_reader(modality)
        self._components = components
        for name in record.component_tensors:
            info = None if components is None else components.tensors.get(name)
            if info is None:
                raise DecoupledFormatError(
                    f"{self.directory}: component tensor {name!r} is listed in the manifest but not stored",
                    file=str(self.directory),
                    tensor=name,
                    hint="the checkpoint is incomplete; re-run the merge",
                )
            self.tensors[name] = info

    def get(self, name: str, copy: bool = True) -> torch.Tensor:
        canonical = self._canonical.get(name)
        if canonical is None:
            return self._components.get(name)  # type: ignore[union-attr]
        slot = self._slots[canonical]

        def shared() -> torch.Tensor:
            base, tau = self.cache.get(canonical, slot.merged)
            if slot.merged:
                mask = self.ckpt.mask(self.modality, canonical)
                return reconstruct(base, tau, mask, scale=self.record.scale)  # type: ignore[arg-type]
            return base.clone() if copy else base

        p = self._private.get(canonical)
        if p is None:
            return modality_tensor(shared)
        rows = self.ckpt.private_tensor(self.modality, canonical)
        return modality_tensor(shared, rows, p.row_start, dtype=self.tensors[name].dtype)

    def weight_files(self) -> list[Path]:
        return []

    def release(self) -> None:
        """Nothing is mapped here (tensors are computed from the checkpoint); kept for the reader interface."""

    def close(self) -> None:
        """The checkpoint is shared by every stand-in; :func:`add_models` closes it."""


def stand_in_source(ckpt: DecoupledCheckpoint, name: str, cache: _SlotCache | None = None) -> SourceModel:
    """A :class:`SourceModel` for old modality ``name`` whose weights are its reconstruction from ``ckpt``."""
    record = ckpt.modality(name)
    layout = LAYOUTS.get(record.source.layout)
    if layout is None:
        raise DecoupledFormatError(
            f"{ckpt.path}: modality {name!r} has unknown layout {record.source.layout!r}",
            key=name,
            hint="the manifest is from a newer mmer or corrupt",
        )
    reader = StandInReader(ckpt, name, cache or _SlotCache(ckpt))
    config_path = reader.directory / "config.json"
    config = read_json(config_path) if config_path.is_file() else None
    llm = {canonical: reader.tensors[disk] for disk, canonical in reader._canonical.items()}
    components = [reader.tensors[n] for n in record.component_tensors]
    spec = pinned_spec(name, record)
    resolved = ResolvedModel(spec_model=spec.model, path=reader.directory)
    return SourceModel(spec, resolved, reader, layout, config, llm, components)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------ add
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
        problem, hashes = source_mismatch(record.source, resolved, pool)
        if problem is not None:
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
        old.hashes = hashes
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
        cache = _SlotCache(ckpt)
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
        recipe = _recipe_header(ckpt, report) + _recipe(ckpt, plan, report).to_yaml()
        history = _history(ckpt, report)
        (staging / HISTORY_NAME).write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
        finish_checkpoint(staging, manifest, merge, recipe, _card_section(ckpt, report))
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


def _recipe(ckpt: DecoupledCheckpoint, plan: MergePlan, report: AddReport) -> Recipe:
    """All n+1 models as ``mmer merge`` would pin them; old modalities name their originals (stand-in or not)."""
    resolved = resolved_recipe(plan)
    models = tuple(
        replace(report.old[spec.modality].spec, lambda_=spec.lambda_)
        if spec.modality in report.old and report.old[spec.modality].source == STAND_IN
        else spec
        for spec in resolved.models
    )
    return Recipe(base_spec(ckpt), models, resolved.options)


def _recipe_header(ckpt: DecoupledCheckpoint, report: AddReport) -> str:
    added = ", ".join(report.added)
    lines = [f"# Made by `mmer add` {__version__}: {added} added to {ckpt.path}."]
    stand_ins = [n for n, o in report.old.items() if o.source == STAND_IN]
    if stand_ins:
        lines += [
            f"# Stand-ins: the task vectors of {', '.join(stand_ins)} were their reconstructions from that",
            "# checkpoint (θ̂ᵢ − θ_base), not their original models. The models below are the originals: `mmer merge",
            "# --recipe` on this file gives the exact re-merge, close to but not equal to this checkpoint.",
        ]
    else:
        lines.append(
            "# Every model was read from its original: `mmer merge --recipe` on this file repeats it exactly."
        )
    return "\n".join(lines) + "\n"


def _card_section(ckpt: DecoupledCheckpoint, report: AddReport) -> str:
    rows = "\n".join(f"| {name} | {info['kind']} | `{info['model']}` |" for name, info in report.added.items())
    old = "\n".join(
        f"| {name} | {o.source} | {o.density_before:.2%} → {o.density_after:.2%} |"
        for name, o in report.old.items()
        if o.density_after is not None
    )
    return f"""
## Added with `mmer add`

Models added to `{ckpt.path.name}` by re-merging every task vector into a new τ* with one mask each (MMER §3.2.3):

| modality | added as | model |
|---|---|---|
{rows}

| earlier modality | task vector from | mask density before → after |
|---|---|---|
{old}

A *stand-in* is the modality's reconstruction θ_base + mᵢ∘τ* from the earlier checkpoint, used where its original
model was not at hand. The full history is in `{HISTORY_NAME}`.
"""


def _history(ckpt: DecoupledCheckpoint, report: AddReport) -> dict[str, Any]:
    previous: list[Any] = []
    path = ckpt.path / HISTORY_NAME
    if path.is_file():
        try:
            data = read_json_file(path, what="add history")
            previous = list(data.get("history", [])) if isinstance(data, dict) else []
        except MmerError:  # a damaged history is started afresh, not fatal: the manifest is the record
            previous = []
    sha_file = ckpt.path / MANIFEST_SHA_NAME
    entry = {
        "operation": "add",
        "mmer_version": __version__,
        "from": {
            "path": str(ckpt.path.resolve()),
            "manifest_sha256": sha_file.read_text(encoding="utf-8").strip() if sha_file.is_file() else None,
            "modalities": list(ckpt.modalities),
        },
        "added": report.added,
        "old": {
            name: {
                "source": o.source,
                "reason": o.reason,
                "density_before": o.density_before,
                "density_after": o.density_after,
                "mask_bits_changed": o.mask_bits_changed,
            }
            for name, o in report.old.items()
        },
        "exact": report.exact,
    }
    return {"format": HISTORY_FORMAT, "history": [*previous, entry]}


# ------------------------------------------------------------------------------------------------ the gap
@dataclass
class GapReport:
    """How far one decoupled checkpoint is from another made from the same models (e.g. stand-in vs exact).

    ``tau_star_rel_l1`` is ‖τ*_b − τ*_a‖₁ / ‖τ*_a‖₁. Per modality: ``mask_agreement`` (share of equal mask bits
    over the merged parameters), the densities, ``rebuild_rel_l1`` = ‖θ̂ᵢ_b − θ̂ᵢ_a‖₁ / ‖τᵢ‖₁ and, when the
    original model is at hand, each checkpoint's own reconstruction error ‖θ̂ᵢ − θᵢ‖₁ / ‖τᵢ‖₁ (``error_a``,
    ``error_b``). Without the original, τᵢ in the denominators is a's reconstruction θ̂ᵢ_a − θ_base.
    """

    reference: str
    candidate: str
    tau_star_rel_l1: float
    modalities: dict[str, dict[str, float | None]]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def measure_gap(
    reference: str | Path, candidate: str | Path, originals: Mapping[str, str | Path] | None = None
) -> GapReport:
    """Compare ``candidate`` with ``reference`` (same base, same modalities) slot by slot.

    ``originals`` maps a modality to its fine-tuned model; by default each modality's manifest source is used
    when it is a local directory that still exists.
    """
    a, b = load_decoupled(reference), load_decoupled(candidate)
    opened: dict[str, SourceModel] = {}
    try:
        if a.is_single_model or b.is_single_model:
            raise AddError("measure_gap compares checkpoints with masks", hint="both must have τ* and masks")
        names = [n for n in a.modalities if n in b.manifest.modalities]
        for name in names:
            path = (originals or {}).get(name)
            if path is None and originals is None:
                src = a.modality(name).source
                path = src.model if src.commit is None and Path(src.model).is_dir() else None
            if path is not None:
                opened[name] = open_source(ModelSpec(str(path), modality=name))
        a_slots = {s.name for s in a.merged_slots}
        diff = norm = 0.0
        acc = {
            n: dict.fromkeys(("agree", "kept_a", "kept_b", "rebuild", "err_a", "err_b", "norm"), 0.0) for n in names
        }
        total = 0
        for slot in b.merged_slots:
            if slot.name not in a_slots:
                raise AddError(
                    f"{candidate}: slot {slot.name!r} is not merged in {reference}",
                    tensor=slot.name,
                    hint="compare two checkpoints of the same base and options",
                )
            base = a.base_tensor(slot.name).float()
            tau_a, tau_b = a.tau_star(slot.name), b.tau_star(slot.name)
            diff += float((tau_b.float() - tau_a.float()).abs().sum())
            norm += float(tau_a.float().abs().sum())
            numel = tau_a.numel()
            total += numel
            rows = base.shape[0] if base.dim() else None
            for name in names:
                ma, mb = a.mask(name, slot.name), b.mask(name, slot.name)
                r = acc[name]
                r["agree"] += numel - int((ma ^ mb).sum())
                r["kept_a"] += int(ma.sum())
                r["kept_b"] += int(mb.sum())
                ra = reconstruct(base, tau_a, ma, dtype=torch.float32, scale=a.modality(name).scale)
                rb = reconstruct(base, tau_b, mb, dtype=torch.float32, scale=b.modality(name).scale)
                r["rebuild"] += error_l1(rb, theta=ra)
                model = opened.get(name)
                if model is not None:
                    theta = model.reader.get(model.llm[slot.name].name).float()
                    theta = theta[:rows] if rows is not None and theta.dim() else theta
                    r["err_a"] += error_l1(ra, theta=theta)
                    r["err_b"] += error_l1(rb, theta=theta)
                    r["norm"] += tau_l1(theta=theta, base=base)
                else:
                    r["norm"] += tau_l1(theta=ra, base=base)
        out: dict[str, dict[str, float | None]] = {}
        for name in names:
            r = acc[name]
            known = name in opened
            out[name] = {
                "mask_agreement": r["agree"] / total if total else 1.0,
                "density_a": r["kept_a"] / total if total else 0.0,
                "density_b": r["kept_b"] / total if total else 0.0,
                "rebuild_rel_l1": relative_error(r["rebuild"], r["norm"]),
                "error_a": relative_error(r["err_a"], r["norm"]) if known else None,
                "error_b": relative_error(r["err_b"], r["norm"]) if known else None,
            }
        return GapReport(str(reference), str(candidate), diff / norm if norm else 0.0, out)
    finally:
        a.close()
        b.close()
        for m in opened.values():
            m.reader.close()
