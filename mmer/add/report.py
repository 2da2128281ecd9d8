"""What ``mmer add`` decided and did: where each earlier modality's task vector came from, and the merge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmer.checkpoint.manifest import ModalityRecord
from mmer.config import ModelSpec
from mmer.errors import MmerError
from mmer.pipeline import MergeReport

MODES = ("auto", "exact", "standin")
ORIGINAL = "original"
STAND_IN = "stand-in"


class AddError(MmerError):
    """A model cannot be added as asked: an original is missing or changed, or the checkpoint cannot stand in."""


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
    """What :func:`mmer.add.add_models` did: returned to Python callers, rendered by the CLI, printed by ``--json``."""

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
