"""Write one modality's model back out as a standalone checkpoint, in its source's own layout and key names.

Retention (docs/method.md §4): θ̂ᵢ = θ_base + mᵢ∘τ*, private vocabulary rows appended, written under the
source's on-disk keys (the manifest's ``llm_keys``) beside the untouched components, config and tokenizer
files, so the tool that loaded the original model (e.g. transformers' ``from_pretrained``) loads this one
unchanged. Tensors are rebuilt and written one at a time, into a staging directory renamed only when
complete.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmer.checkpoint.decoupled import DecoupledCheckpoint, load_decoupled, slot_dtype
from mmer.config import MergeOptions
from mmer.errors import ConfigError, DecoupledFormatError
from mmer.io.reader import copy_side_files
from mmer.io.writer import PlannedTensor, ShardedWriter, StagedOutput
from mmer.progress import NULL_PROGRESS, ProgressSink
from mmer.route.weights import modality_shape, private_dtypes
from mmer.version import __version__

DEFAULT_SHARD_SIZE = MergeOptions.shard_size


@dataclass
class ModelWritten:
    """One rebuilt model: where it went and what it holds."""

    modality: str
    path: str
    layout: str
    llm_tensors: int
    component_tensors: int
    bytes: int
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ReconstructReport:
    """What ``reconstruct`` wrote; rendered by the CLI and printed by ``--json``."""

    checkpoint: str
    output: str
    models: list[ModelWritten] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "output": self.output,
            "models": [m.to_dict() for m in self.models],
            "seconds": self.seconds,
            "warnings": self.warnings,
        }


def _open(
    checkpoint: str | Path | DecoupledCheckpoint, revision: str | None, modalities: Sequence[str] | None
) -> DecoupledCheckpoint:
    if isinstance(checkpoint, DecoupledCheckpoint):
        return checkpoint
    return load_decoupled(checkpoint, revision, modalities=modalities)


def reconstruct_modality(
    checkpoint: str | Path | DecoupledCheckpoint,
    modality: str,
    output: str | Path,
    *,
    overwrite: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: ProgressSink | None = None,
    revision: str | None = None,
) -> ReconstructReport:
    """Write ``modality``'s rebuilt model to ``output`` (a model directory ``from_pretrained`` can load)."""
    return reconstruct(
        checkpoint,
        output,
        [modality],
        subdirs=False,
        overwrite=overwrite,
        shard_size=shard_size,
        progress=progress,
        revision=revision,
    )


def reconstruct(
    checkpoint: str | Path | DecoupledCheckpoint,
    output: str | Path,
    modalities: Sequence[str] | None = None,
    *,
    subdirs: bool = True,
    overwrite: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: ProgressSink | None = None,
    revision: str | None = None,
) -> ReconstructReport:
    """Rebuild ``modalities`` (all by default) into ``output/<modality>/``, or into ``output`` itself.

    Args:
        checkpoint: a decoupled checkpoint directory, its Hub id (only the files of ``modalities`` are
            fetched), or an open checkpoint.
        output: where to write; appears only when every model is complete.
        modalities: which models to rebuild; ``None`` means every modality of the checkpoint.
        subdirs: one subdirectory per modality; ``False`` needs exactly one modality and writes it to ``output``.
        overwrite: replace an existing ``output``.
        shard_size: maximum bytes per safetensors shard.
        progress: receives one stage per modality, sized in bytes.
        revision: with a Hub id, the branch, tag or commit (``main`` by default).
    """
    started = time.perf_counter()
    ckpt = _open(checkpoint, revision, modalities)
    try:
        return _reconstruct(ckpt, output, modalities, subdirs, overwrite, shard_size, progress, started)
    finally:
        if ckpt is not checkpoint:
            ckpt.close()


def _reconstruct(
    ckpt: DecoupledCheckpoint,
    output: str | Path,
    modalities: Sequence[str] | None,
    subdirs: bool,
    overwrite: bool,
    shard_size: int,
    progress: ProgressSink | None,
    started: float,
) -> ReconstructReport:
    names = list(ckpt.modalities if modalities is None else modalities)
    for name in names:
        ckpt.modality(name)  # refuses an unknown modality, naming the ones there are
    if not names:
        raise ConfigError("no modality to rebuild", key="modality", hint="name one, or rebuild all")
    if shard_size < 1024:
        raise ConfigError(f"shard_size = {shard_size} bytes is too small", key="shard_size", hint="e.g. 5GB")
    if not subdirs and len(names) != 1:
        raise ConfigError(
            f"{len(names)} modalities cannot share one model directory",
            key="modality",
            hint="rebuild one modality, or write one subdirectory per modality",
        )
    report = ReconstructReport(str(ckpt.path), str(Path(output)))
    inputs = [ckpt.path] + ([] if ckpt.manifest.base_storage == "copy" else [ckpt.reference_base()])
    staged = StagedOutput(output, overwrite=overwrite, kind="reconstruct", protect=inputs)
    with staged as staging:
        report.warnings += staged.warnings
        for name in names:
            target = staging / name if subdirs else staging
            written = write_model(ckpt, name, target, shard_size, progress or NULL_PROGRESS)
            final = Path(report.output) / name if subdirs else Path(report.output)
            written.path = str(final)
            report.models.append(written)
    report.seconds = time.perf_counter() - started
    return report


def _planned_llm(ckpt: DecoupledCheckpoint, modality: str) -> list[tuple[str, PlannedTensor]]:
    """(canonical name, tensor under its source key) for every LLM tensor of the modality, from the manifest."""
    record = ckpt.modality(modality)
    slots = {s.name: s for s in ckpt.slots}
    whole_private = {p.name for p in record.private if p.row_start == 0}
    stored = private_dtypes(ckpt, modality)
    planned = []
    for canonical, disk_key in record.llm_keys.items():
        slot = slots.get(canonical)
        if slot is None:
            raise DecoupledFormatError(
                f"{ckpt.path}: {modality!r} maps {canonical!r} to {disk_key!r} but the base has no such tensor",
                tensor=canonical,
                key=modality,
                hint="the manifest is corrupt; re-run the merge",
            )
        dtype = stored[canonical] if canonical in whole_private else slot_dtype(slot)
        shape = modality_shape(ckpt, modality, canonical)
        planned.append((canonical, PlannedTensor(disk_key, dtype, shape)))
    return planned


def write_model(
    ckpt: DecoupledCheckpoint, modality: str, directory: Path, shard_size: int, progress: ProgressSink
) -> ModelWritten:
    """Rebuild one modality into ``directory``: LLM under its source keys, components, config, tokenizer."""
    record = ckpt.modality(modality)
    directory.mkdir(parents=True, exist_ok=True)
    llm = _planned_llm(ckpt, modality)
    components = ckpt.component_reader(modality)
    component_entries = [
        PlannedTensor(info.name, info.dtype, info.shape)
        for name in record.component_tensors
        if (info := components.tensors.get(name) if components is not None else None) is not None
    ]
    if len(component_entries) != len(record.component_tensors):
        have = set() if components is None else set(components.tensors)
        missing = next(n for n in record.component_tensors if n not in have)
        raise DecoupledFormatError(
            f"{ckpt.path / record.component_dir}: component tensor {missing!r} is listed in the manifest but not "
            "stored",
            file=str(ckpt.path / record.component_dir),
            tensor=missing,
            hint="the checkpoint is incomplete; re-run the merge",
        )
    clash = {p.name for _, p in llm} & {e.name for e in component_entries}
    if clash:
        raise DecoupledFormatError(
            f"{ckpt.path}: {sorted(clash)[0]!r} is both an LLM key and a component of {modality!r}",
            tensor=sorted(clash)[0],
            hint="the manifest is corrupt; re-run the merge",
        )
    entries = sorted([p for _, p in llm] + component_entries, key=lambda e: e.name)
    writer = ShardedWriter(
        directory,
        entries,
        shard_size,
        metadata={"format": "pt", "mmer_reconstructed": modality, "mmer_version": __version__},
    )
    stage = f"rebuild {modality}"
    progress.start(stage, writer.total_bytes)
    try:
        for canonical, planned in llm:
            _write_checked(writer, planned, ckpt.llm_tensor(modality, canonical), canonical)
            progress.advance(stage, planned.nbytes)
        for entry in component_entries:
            _write_checked(writer, entry, components.get(entry.name), entry.name)  # type: ignore[union-attr]
            progress.advance(stage, entry.nbytes)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.end(stage)
    files += copy_side_files(ckpt.path / record.component_dir, directory, root=ckpt.path)
    return ModelWritten(
        modality=modality,
        path=str(directory),
        layout=record.source.layout,
        llm_tensors=len(llm),
        component_tensors=len(component_entries),
        bytes=writer.total_bytes,
        files=sorted(files),
    )


def _write_checked(writer: ShardedWriter, planned: PlannedTensor, tensor: Any, name: str) -> None:
    if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
        raise DecoupledFormatError(
            f"{name}: the checkpoint gives {tensor.dtype} {tuple(tensor.shape)} where its manifest promises "
            f"{planned.dtype} {planned.shape}",
            tensor=name,
            hint="the checkpoint and its manifest disagree; re-run the merge",
        )
    writer.write(planned.name, tensor)
