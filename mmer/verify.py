"""Check a decoupled checkpoint against itself (hashes, shapes, mask counts) and, optionally, its sources.

Every file is covered: the manifest lists the sha256 of every other file, and ``mmer_manifest.json.sha256``
holds the manifest's own hash, so flipping any byte anywhere is reported. With ``sources=True`` each
modality's original model is opened again (from the path or Hub commit the manifest records) and the
rebuilt LLM is compared with it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmer.checkpoint import bits
from mmer.checkpoint.decoupled import DecoupledCheckpoint
from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME, Manifest
from mmer.errors import MmerError
from mmer.io.reader import SAFETENSORS_DTYPES, CheckpointReader
from mmer.io.resolve import resolve_model


@dataclass
class Reconstruction:
    """How far a modality's rebuilt LLM is from its source model."""

    rel_l1: float
    max_abs: float
    private_rows_equal: bool
    source_hashes_match: bool | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rel_l1": self.rel_l1,
            "max_abs": self.max_abs,
            "private_rows_equal": self.private_rows_equal,
            "source_hashes_match": self.source_hashes_match,
        }


@dataclass
class VerifyReport:
    path: str
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0
    masks_checked: int = 0
    reconstruction: dict[str, Reconstruction] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": self.problems,
            "files_checked": self.files_checked,
            "masks_checked": self.masks_checked,
            "reconstruction": {m: r.to_dict() for m, r in self.reconstruction.items()},
        }


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(path: str | Path, sources: bool = False) -> VerifyReport:
    """Verify ``path``; problems are collected (not raised) so one run reports all of them."""
    path = Path(path)
    report = VerifyReport(str(path))
    manifest_file = path / MANIFEST_NAME
    sidecar = path / MANIFEST_SHA_NAME
    if sidecar.is_file() and manifest_file.is_file():
        if sidecar.read_bytes() != (_sha256(manifest_file) + "\n").encode():
            report.problems.append(
                f"{MANIFEST_NAME}: its sha256 differs from {MANIFEST_SHA_NAME} (modified or corrupt)"
            )
    elif manifest_file.is_file():
        report.problems.append(f"{MANIFEST_SHA_NAME} is missing: the manifest itself cannot be checked")
    try:
        manifest = Manifest.read(path)
    except MmerError as err:
        report.problems.append(err.message)
        return report
    _check_files(path, manifest, report)
    try:
        with DecoupledCheckpoint(path, manifest) as ckpt:
            _check_masks(ckpt, report)
            _check_tau_star(ckpt, report)
            if sources:
                for modality in ckpt.modalities:
                    report.reconstruction[modality] = _reconstruction(ckpt, modality, report)
    except MmerError as err:
        report.problems.append(err.message)
    return report


def _check_files(path: Path, manifest: Manifest, report: VerifyReport) -> None:
    listed = set(manifest.files)
    for rel, expected in sorted(manifest.files.items()):
        file = path / rel
        report.files_checked += 1
        if not file.is_file():
            report.problems.append(f"{rel}: missing")
        elif _sha256(file) != expected:
            report.problems.append(f"{rel}: sha256 differs from the manifest (modified or corrupt)")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel not in listed and rel not in (MANIFEST_NAME, MANIFEST_SHA_NAME):
            report.problems.append(f"{rel}: not listed in the manifest (added after the merge?)")


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


def _check_tau_star(ckpt: DecoupledCheckpoint, report: VerifyReport) -> None:
    directory = ckpt.manifest.tau_star_dir or ckpt.manifest.merged_dir
    if directory is None:
        return
    reader = CheckpointReader(ckpt.path / directory)
    wanted = ckpt.merged_slots if not ckpt.is_single_model else ckpt.slots
    dtypes = {SAFETENSORS_DTYPES.get(d) for d in ckpt.manifest.tau_star_dtype.split("/")}
    for slot in wanted:
        info = reader.tensors.get(slot.name)
        if info is None:
            report.problems.append(f"{directory}: {slot.name} is missing")
        elif list(info.shape) != list(slot.shape):
            report.problems.append(f"{directory}: {slot.name} has shape {list(info.shape)}, not {slot.shape}")
        elif not ckpt.is_single_model and info.dtype not in dtypes:
            report.problems.append(
                f"{directory}: {slot.name} is {info.dtype}, the manifest says {ckpt.manifest.tau_star_dtype}"
            )


def _reconstruction(ckpt: DecoupledCheckpoint, modality: str, report: VerifyReport) -> Reconstruction:
    """Relative ℓ1 distance of θ̂ᵢ from θᵢ over the shared rows, and exactness of the private rows."""
    record = ckpt.modality(modality)
    source = record.source
    resolved = resolve_model(source.model, source.commit if source.commit else None)
    reader = CheckpointReader(resolved.path)
    hashes_match = None
    recorded = {k: v for k, v in source.files.items() if v is not None}
    if recorded:
        hashes_match = all(
            (resolved.path / name).is_file() and _sha256(resolved.path / name) == digest
            for name, digest in recorded.items()
        )
        if not hashes_match:
            report.problems.append(f"{modality}: the source files at {resolved.path} differ from those merged")
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
        diff = (rebuilt - original).abs()
        error += float(diff.sum())
        norm += float((original - base).abs().sum())
        max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
    reader.close()
    if not private_equal:
        report.problems.append(f"{modality}: private vocabulary rows differ from the source")
    return Reconstruction(error / norm if norm else 0.0, max_abs, private_equal, hashes_match)
