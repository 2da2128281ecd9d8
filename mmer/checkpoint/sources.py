"""Where a decoupled checkpoint's inputs are now, and whether they are still what was merged.

A checkpoint's manifest records each model it was merged from (a Hub id pinned to its commit, or a local
directory) with the sha256 of its weight files. Re-merging from it (``mmer add``, ``mmer tune`` on a
checkpoint) first has to turn those records back into models to read: a recipe's pinned specs, the base's
tensors (the checkpoint's own copy when it has one), the options it was merged with, and for each modality its
original model if it is at hand (``decoupled.check_source_files`` checks it against the recorded hashes, so a
changed file is never taken for the one that was merged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmer.checkpoint.decoupled import BASE_DIR, DecoupledCheckpoint
from mmer.checkpoint.manifest import MANIFEST_NAME, ModalityRecord
from mmer.config import ModelSpec, options_from_dict
from mmer.errors import ConfigError
from mmer.io.resolve import HUB_PATTERNS
from mmer.merge.slot import RECORDED_KEYS


def pinned_spec(name: str, record: ModalityRecord) -> ModelSpec:
    """A modality's original model as the manifest recorded it: a Hub id pinned to its commit, or a local path."""
    src = record.source
    return ModelSpec(
        model=src.model,
        revision=src.commit,
        modality=name,
        lambda_=record.lambda_,
        weight=None if record.weight == 1.0 else record.weight,
        k=record.k,
        dare=record.dare,
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
    """The merge options the checkpoint was made with (from its manifest), with ``overrides`` applied; what the
    merge counted beside them (the sign census) is left out: a new merge counts its own."""
    settings = {k: v for k, v in ckpt.manifest.options.items() if k not in RECORDED_KEYS}
    options = options_from_dict(settings, file=str(ckpt.path / MANIFEST_NAME))
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
