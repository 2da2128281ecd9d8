"""The manifest of a decoupled checkpoint: what is where, how it was made, and hashes of every file.

It is plain JSON (``mmer_manifest.json``) so any tool can read it; this module gives it types and checks it
on the way in. The compatibility rule: readers accept any ``format_version`` with their major number and
refuse a newer major (a wrong merge is worse than a failed one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mmer.errors import DecoupledFormatError

MANIFEST_NAME = "mmer_manifest.json"
MANIFEST_SHA_NAME = "mmer_manifest.json.sha256"  # the manifest's own hash: with `files`, every byte is covered
FORMAT_NAME = "mmer-decoupled"
FORMAT_VERSION = "1.0"


@dataclass
class SourceRecord:
    """Where an input model came from, exactly enough to fetch the same bytes again."""

    model: str
    revision: str | None
    commit: str | None
    layout: str
    dtype: str
    config: str | None
    files: dict[str, str | None]  # weight file name → sha256 (None when hashing was turned off)


@dataclass
class SlotRecord:
    """One canonical LLM tensor of the base: its shape and dtype, and how it was treated."""

    name: str
    shape: list[int]
    dtype: str
    merged: bool
    reason: str | None = None  # why not merged: "buffer", "integer dtype", "vocab_policy=exclude"


@dataclass
class PrivateRecord:
    """A model-private LLM tensor: vocabulary rows past the base's, or a whole unmerged tensor."""

    name: str  # canonical name
    row_start: int  # first row of the model's own tensor this slice holds (0 = the whole tensor)
    shape: list[int]


@dataclass
class ModalityRecord:
    """One fine-tuned model: its source, mask, component and private LLM tensors."""

    name: str
    source: SourceRecord
    lambda_: float | None
    mask_file: str | None  # None for a single merged model (mask rule "none")
    component_dir: str
    kept: int
    total: int
    llm_keys: dict[str, str]  # canonical name → the source's own on-disk key (for writing it back)
    component_tensors: list[str]
    private: list[PrivateRecord] = field(default_factory=list)
    vocab_size: int | None = None
    kept_per_tensor: dict[str, int] = field(default_factory=dict)  # canonical name → set bits of its mask
    scale: float = 1.0  # EMR's rescaler sᵢ in θ̂ᵢ = θ_base + sᵢ·mᵢ∘τ* (1 for every other rule)
    weight: float = 1.0  # the model's merge weight

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0


@dataclass
class Manifest:
    """Everything a reader needs before touching a weight."""

    mmer_version: str
    options: dict[str, Any]
    base: SourceRecord
    base_storage: str  # "copy" (under base/) or "reference" (fetch base.source again)
    base_dir: str | None
    tau_star_dir: str | None  # None for a single merged model
    tau_star_dtype: str
    slots: list[SlotRecord]
    modalities: dict[str, ModalityRecord]
    files: dict[str, str] = field(default_factory=dict)  # relative path → sha256 of every other file
    merged_dir: str | None = None  # "." when the output is one merged model (mask rule "none")
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION

    # ------------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for record in data["modalities"].values():
            record["lambda"] = record.pop("lambda_")
            record["density"] = record["kept"] / record["total"] if record["total"] else 0.0
        return {"format": data.pop("format"), "format_version": data.pop("format_version"), **data}

    def write(self, directory: Path) -> Path:
        """Write the manifest and, beside it, its sha256 (so a changed manifest is caught too)."""
        path = directory / MANIFEST_NAME
        data = (json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n").encode("utf-8")
        path.write_bytes(data)
        (directory / MANIFEST_SHA_NAME).write_text(hashlib.sha256(data).hexdigest() + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise DecoupledFormatError(
                f"{directory}: no {MANIFEST_NAME}; not a decoupled checkpoint",
                file=str(path),
                hint="point to the output directory of `mmer merge`",
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DecoupledFormatError(f"{path}: not valid JSON ({err})", file=str(path)) from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, file: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise DecoupledFormatError(f"{file}: not an mmer manifest (format != {FORMAT_NAME!r})", file=file)
        version = str(data.get("format_version", ""))
        major = version.split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise DecoupledFormatError(
                f"{file}: format_version {version} is not readable by this mmer (reads {FORMAT_VERSION})",
                file=file,
                key="format_version",
                hint="upgrade mmer" if major.isdigit() and int(major) > int(FORMAT_VERSION.split(".")[0]) else None,
            )
        try:
            modalities = {}
            for name, rec in data["modalities"].items():
                rec = dict(rec)
                rec.pop("density", None)
                rec["lambda_"] = rec.pop("lambda")
                rec["source"] = SourceRecord(**rec["source"])
                rec["private"] = [PrivateRecord(**p) for p in rec.get("private", [])]
                modalities[name] = ModalityRecord(**rec)
            manifest = cls(
                mmer_version=data["mmer_version"],
                options=data["options"],
                base=SourceRecord(**data["base"]),
                base_storage=data["base_storage"],
                base_dir=data["base_dir"],
                tau_star_dir=data["tau_star_dir"],
                tau_star_dtype=data["tau_star_dtype"],
                slots=[SlotRecord(**s) for s in data["slots"]],
                modalities=modalities,
                files=dict(data.get("files", {})),
                merged_dir=data.get("merged_dir"),
                format_version=version,
            )
        except (KeyError, TypeError) as err:
            raise DecoupledFormatError(
                f"{file}: malformed manifest ({type(err).__name__}: {err})", file=file
            ) from None
        for rel in manifest.referenced_paths():
            check_relative(rel, file)
        return manifest

    def referenced_paths(self) -> list[str]:
        paths = [*self.files]
        for optional in (self.tau_star_dir, self.base_dir, self.merged_dir):
            if optional:
                paths.append(optional)
        for m in self.modalities.values():
            paths += [p for p in (m.mask_file, m.component_dir) if p]
        return paths


def check_relative(rel: str, file: str) -> None:
    """Refuse a manifest path that would leave the checkpoint directory (absolute, ``..``, drive letters)."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or ":" in rel:
        raise DecoupledFormatError(
            f"{file}: path {rel!r} points outside the checkpoint",
            file=file,
            key=rel,
            hint="manifest paths must be relative and stay inside the checkpoint; this file may be hostile",
        )
