"""Turn a model spec (local directory, or Hub id with revision) into a local directory.

Hub ids go through huggingface_hub's cache, so ``HF_HUB_OFFLINE=1`` and a pre-filled cache work with no
network; the commit a revision resolved to is recorded so the run can be repeated exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mmer.errors import ModelNotFoundError

# Only what a merge reads; never *.py (no remote code is fetched, let alone run) nor optimizer states.
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.bin",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "*.jinja",
    "tokenizer*",
    "README.md",
]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a spec's files are, and which exact revision they are."""

    spec_model: str
    path: Path
    hub_id: str | None = None
    revision: str | None = None
    commit: str | None = None


def resolve_model(model: str, revision: str | None = None) -> ResolvedModel:
    """Resolve ``model`` to a local directory: a path if it exists, else a Hub id through the cache."""
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(
                f"{model}: is a file, not a model directory",
                file=model,
                hint="point to the directory that holds config.json and the weight files",
            )
        if revision is not None:
            raise ModelNotFoundError(
                f"{model}: a revision ({revision}) was given for a local directory",
                file=model,
                hint="drop `revision`, or give a Hub id instead of a path",
            )
        # The directory the user named may itself be a link (to shared storage, into a Hub snapshot): it is
        # resolved, never refused; only links *inside* it are held to mmer.io.paths' rule when files are read.
        return ResolvedModel(spec_model=model, path=local.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"{model}: no such directory", file=model, hint="check the path")
    return _resolve_hub(model, revision)


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedModel:
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError

    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=_offline()
        )
    except HFValidationError as err:
        raise ModelNotFoundError(
            f"{repo_id}: not a local directory nor a valid Hub id ({err})",
            file=repo_id,
            hint="give an existing directory, or a Hub id of the form org/name",
        ) from None
    except Exception as err:  # huggingface_hub raises many types for "not available"
        where = "in the local Hugging Face cache" if _offline() else "on the Hub"
        raise ModelNotFoundError(
            f"{repo_id}@{revision or 'main'}: not found {where} ({type(err).__name__}: {err})",
            file=repo_id,
            hint="check the id and revision; offline, download it first with `hf download` or unset HF_HUB_OFFLINE",
        ) from None
    snapshot = Path(path)
    return ResolvedModel(
        spec_model=repo_id, path=snapshot, hub_id=repo_id, revision=revision or "main", commit=snapshot.name
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def cached_blob_sha256(file: Path) -> str | None:
    """The sha256 of a Hub-cache file, read from its blob name where the cache stores LFS files by sha256."""
    if not file.is_symlink():
        return None
    target = Path(os.path.realpath(file))
    name = target.name
    if target.parent.name == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    return None
