"""Check a decoupled checkpoint against itself (hashes, shapes, mask counts) and, optionally, its sources.

Every file is covered: the manifest lists the sha256 of every other file, and ``mmer_manifest.json.sha256``
holds the manifest's own hash, so flipping any byte anywhere is reported. The manifest goes through the same
reader and schema as every other command (:func:`mmer.checkpoint.manifest.read_manifest`), collecting its
problems instead of stopping at the first. A link that leads out of the checkpoint is reported, never followed.
A base kept by reference is checked against the sha256 recorded at the merge; what could not be checked (no
sha256 recorded, base not at hand) is said in ``notes`` rather than passed as checked. With ``sources=True``
each modality's original model is opened again (from the path or Hub commit the manifest records) and the
rebuilt LLM is compared with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmer.checkpoint import bits
from mmer.checkpoint.accounting import Placement, account_for, bucket_counts
from mmer.checkpoint.decoupled import DecoupledCheckpoint, check_source_files
from mmer.checkpoint.hub import checkpoint_directory
from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME, Manifest, read_manifest
from mmer.errors import ConfigError, MmerError, ModelNotFoundError
from mmer.io.hashing import file_sha256
from mmer.io.paths import check_inside
from mmer.io.reader import CheckpointReader
from mmer.io.resolve import resolve_model
from mmer.merge.error import error_l1, relative_error, tau_l1


@dataclass
class Reconstruction:
    """How far a modality's rebuilt LLM is from its source model."""

    rel_l1: float
    max_abs: float
    private_rows_equal: bool
    source_hashes_match: bool | None
    # Where each source tensor went (mmer.checkpoint.accounting): nothing the source holds goes unaccounted.
    tensors: dict[str, Placement] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rel_l1": self.rel_l1,
            "max_abs": self.max_abs,
            "private_rows_equal": self.private_rows_equal,
            "source_hashes_match": self.source_hashes_match,
            "buckets": bucket_counts(self.tensors),
            "tensors": {key: placement.to_dict() for key, placement in self.tensors.items()},
        }


@dataclass
class VerifyReport:
    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be checked, and why (never a pass)
    files_checked: int = 0
    masks_checked: int = 0
    tau_star_checked: int = 0  # quantised τ* tensors whose codes and scales were read and checked (0 when exact)
    reconstruction: dict[str, Reconstruction] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": self.problems,
            "notes": self.notes,
            "files_checked": self.files_checked,
            "masks_checked": self.masks_checked,
            "tau_star_checked": self.tau_star_checked,
            "reconstruction": {m: r.to_dict() for m, r in self.reconstruction.items()},
        }


def verify(
    path: str | Path,
    sources: bool = False,
    source_paths: Mapping[str, str | Path] | None = None,
    revision: str | None = None,
) -> VerifyReport:
    """Verify ``path``; problems are collected (not raised) so one run reports all of them.

    ``path`` is a checkpoint directory or a Hub id (at ``revision``): every file its manifest names is fetched
    into the Hugging Face cache (offline, only looked for there) and checked there.
    ``source_paths``: with ``sources``, where a modality's source model is now when it moved since the merge
    (as ``mmer add --source``); it is still checked against the sha256 the manifest recorded for it.
    """
    path = checkpoint_directory(path, revision)
    source_paths = dict(source_paths or {})
    report = VerifyReport(str(path))
    found: list[MmerError] = []
    try:
        manifest = read_manifest(path, problems=found)
    except MmerError as err:  # read_manifest collects; anything raised still becomes one problem
        found.append(err)
        manifest = None
    report.problems += [err.message for err in found]
    if manifest is None:
        return report
    for name in source_paths:  # a usage error, not a finding about the checkpoint
        if name not in manifest.modalities:
            raise ConfigError(
                f"--source given for modality {name!r}, which {path} does not have",
                key="source",
                hint=f"its modalities are: {', '.join(manifest.modalities)}",
            )
    _check_files(path, manifest, report)
    try:
        with DecoupledCheckpoint(path, manifest) as ckpt:
            _check_reference_base(ckpt, report, fetch=sources)
            refused = ckpt.stored_problems(base=_base_at_hand(ckpt))
            report.problems += [err.message for err in refused]
            if refused:
                return report  # the readers refuse it: rebuilding (for masks or sources) would only repeat that
            _check_masks(ckpt, report)
            _check_tau_encoding(ckpt, report)
            if sources:
                for modality in ckpt.modalities:
                    moved = source_paths.get(modality)
                    report.reconstruction[modality] = _reconstruction(ckpt, modality, report, moved)
    except MmerError as err:
        report.problems.append(err.message)
    return report


def _check_files(path: Path, manifest: Manifest, report: VerifyReport) -> None:
    """Hash every listed file where it really is inside the checkpoint; report links out, and unlisted files."""
    listed = set(manifest.files)
    for rel, expected in sorted(manifest.files.items()):
        file = path / rel
        report.files_checked += 1
        if not os.path.lexists(file):
            report.problems.append(f"{rel}: missing")
            continue
        try:
            real = check_inside(path, file)
        except MmerError:
            continue  # reported by the walk below, never followed
        if not real.is_file():
            report.problems.append(f"{rel}: not a regular file")
        elif file_sha256(real) != expected:
            report.problems.append(f"{rel}: sha256 differs from the manifest (modified or corrupt)")
    for root, dirs, files in os.walk(path):  # links are listed, never descended into
        for name in sorted(dirs + files):
            entry = Path(root) / name
            rel = entry.relative_to(path).as_posix()
            if entry.is_symlink():
                try:
                    check_inside(path, entry)
                except MmerError:
                    target = os.readlink(entry)
                    report.problems.append(f"{rel}: a link to {target}, outside the checkpoint (never followed)")
                    continue
            if name in files:
                if rel not in listed and rel not in (MANIFEST_NAME, MANIFEST_SHA_NAME):
                    report.problems.append(f"{rel}: not listed in the manifest (added after the merge?)")


def _check_reference_base(ckpt: DecoupledCheckpoint, report: VerifyReport, fetch: bool) -> None:
    """A base kept by reference must be the one merged; say so when that could not be checked."""
    base = ckpt.manifest.base
    if ckpt.manifest.base_storage != "reference" or ckpt.is_single_model:
        return  # a single merged model is rebuilt from θ* alone
    if not any(base.files.values()):
        report.notes.append(
            f"base: no sha256 was recorded for {base.model} (merged with hash_inputs off), so the reference base "
            "it is rebuilt from was not checked"
        )
        return
    try:
        ckpt.reference_base(local_only=not fetch)
    except ModelNotFoundError as err:
        report.notes.append(f"base: not checked, not at hand ({err.message}); `mmer verify --sources` fetches it")
    except MmerError as err:
        report.problems.append(err.message)


def _check_masks(ckpt: DecoupledCheckpoint, report: VerifyReport) -> None:
    if ckpt.is_single_model:
        return
    merged = {s.name: tuple(s.shape) for s in ckpt.merged_slots}
    for modality in ckpt.modalities:
        record = ckpt.modality(modality)
        mask_file = ckpt.mask_file(modality)  # validates every claimed shape against its bytes
        if set(mask_file.shapes) != set(merged):
            missing = sorted(set(merged) - set(mask_file.shapes))[:3]
            report.problems.append(f"{record.mask_file}: masks do not cover the merged tensors (e.g. {missing})")
            continue
        kept = 0
        for name, shape in merged.items():
            report.masks_checked += 1
            if mask_file.shapes[name] != shape:
                report.problems.append(
                    f"{record.mask_file}: {name} has shape {list(mask_file.shapes[name])}, not {list(shape)}"
                )
                continue
            packed = mask_file.packed(name)
            ones = bits.popcount(packed)
            numel = math.prod(shape)
            if numel % 8 and int(packed[-1]) >> (numel % 8):
                report.problems.append(f"{record.mask_file}: {name} has set padding bits")
            if record.kept_per_tensor and record.kept_per_tensor.get(name) != ones:
                said = record.kept_per_tensor.get(name)
                report.problems.append(f"{record.mask_file}: {name} keeps {ones} parameters, the manifest says {said}")
            kept += ones
        if kept != record.kept:
            report.problems.append(f"{modality}: masks keep {kept} parameters, the manifest says {record.kept}")


def _check_tau_encoding(ckpt: DecoupledCheckpoint, report: VerifyReport) -> None:
    """A quantised τ*: every tensor's scales and codes are what a writer writes (FORMAT.md, Quantised τ*), read
    and checked by the loader's own dequantisation; an exact τ* has nothing beyond its headers and hashes."""
    if ckpt.is_single_model or ckpt.tau_star_encoding is None:
        return
    for slot in ckpt.merged_slots:
        try:
            ckpt.tau_star(slot.name)
        except MmerError as err:
            report.problems.append(err.message)
            continue
        report.tau_star_checked += 1


def _base_at_hand(ckpt: DecoupledCheckpoint) -> bool:
    """Whether the base's headers can be checked without fetching it: copied, or a reference base already found."""
    if ckpt.is_single_model:
        return False
    return ckpt.manifest.base_storage == "copy" or ckpt.reference_base_checked


def _reconstruction(
    ckpt: DecoupledCheckpoint, modality: str, report: VerifyReport, moved: str | Path | None = None
) -> Reconstruction:
    """Relative ℓ1 distance of θ̂ᵢ from θᵢ over the shared rows, and exactness of the private rows."""
    record = ckpt.modality(modality)
    source = record.source
    if moved is not None:  # where the caller says it is now: its files must still hash as recorded
        resolved = resolve_model(str(moved))
    else:
        resolved = resolve_model(source.model, source.commit if source.commit else None)
    reader = CheckpointReader(resolved.path)
    checked = check_source_files(source, resolved.path)  # only recorded plain names, only inside the source
    differences = checked.problems if checked.recorded else None
    hashes_match = None if differences is None else not differences
    if differences:
        report.problems.append(
            f"{modality}: the source files at {resolved.path} differ from those merged ({differences[0]})"
        )
    elif differences is None:
        report.notes.append(f"{modality}: no sha256 was recorded for its source (hash_inputs off); not checked")
    placements, unaccounted = account_for(ckpt, modality, reader.tensors)
    report.problems += unaccounted
    _check_components(ckpt, modality, reader, placements, report)
    error = norm = max_abs = 0.0
    private_equal = True
    for slot in ckpt.slots:
        key = record.llm_keys.get(slot.name)
        if key is None or slot.reason == "buffer":
            continue
        original = reader.get(key).float()
        rebuilt = ckpt.llm_tensor(modality, slot.name).float()
        rows = slot.shape[0] if slot.shape else None
        if rebuilt.shape != original.shape:
            report.problems.append(
                f"{modality}: {slot.name} rebuilds to {list(rebuilt.shape)}, the source has {list(original.shape)}"
            )
            continue
        if rows is not None and original.shape[0] > rows:
            private_equal &= bool(torch.equal(rebuilt[rows:], original[rows:]))
            rebuilt, original = rebuilt[:rows], original[:rows]
        base = ckpt.base_tensor(slot.name).float()
        error += error_l1(rebuilt, theta=original)
        norm += tau_l1(theta=original, base=base)
        max_abs = max(max_abs, float((rebuilt - original).abs().max()) if rebuilt.numel() else 0.0)
    reader.close()
    if not private_equal:
        report.problems.append(f"{modality}: private vocabulary rows differ from the source")
    return Reconstruction(relative_error(error, norm), max_abs, private_equal, hashes_match, placements)


def _check_components(
    ckpt: DecoupledCheckpoint,
    modality: str,
    source: CheckpointReader,
    placements: dict[str, Placement],
    report: VerifyReport,
) -> None:
    """Every tensor in the component bucket is stored exactly as the source holds it."""
    names = [key for key, placement in placements.items() if placement.bucket == "component"]
    components = ckpt.component_reader(modality) if names else None
    for name in names:
        stored = components.get(name, copy=False) if components is not None else None
        if stored is None or not _same_bytes(stored, source.get(name, copy=False)):
            report.problems.append(f"{modality}: component {name!r} differs from the source's")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (a NaN equals itself), as a copied tensor must be."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
