"""Turn a model spec (local directory, or Hub id with revision) into a local directory.

Hub ids go through huggingface_hub's cache, so ``HF_HUB_OFFLINE=1`` and a pre-filled cache work with no
network; the commit a revision resolved to is recorded so the run can be repeated exactly. A decoupled checkpoint
on the Hub is fetched file by file (:func:`fetch_hub_files`: its manifest first, then the files it names), never
as a whole repository.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
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
    # The licence texts travel with the weights (copied into the output, declared on its card).
    "LICENSE*",
    "LICENCE*",
    "COPYING*",
    "NOTICE*",
]
# A Hub repo id: ``org/name`` (the Hub's own rule: letters, digits, ``-``, ``_``, ``.``; no ``..``, no leading
# or trailing ``.``/``-``). Anything else that is not a local path is not looked up.
HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9_](?:[\w.-]*[\w])?")


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


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub repo id (``org/name``); says nothing of whether it exists."""
    return bool(HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name


def fetch_hub_files(repo_id: str, revision: str | None, files: Sequence[str], *, what: str) -> ResolvedModel:
    """Fetch exactly ``files`` (paths in the repo) of ``repo_id`` at ``revision`` into the Hugging Face cache.

    Offline (``HF_HUB_OFFLINE=1``) they are only looked for there. Returns the snapshot directory and the commit
    the revision resolved to; pass that commit back as ``revision`` to fetch more files of the same version. Every
    file must then be in the snapshot: one that is not is named, with the command that fetches it.
    """
    shown = f"{repo_id}@{revision or 'main'}"
    offline = _offline()
    path = _snapshot(repo_id, revision, [_literal(f) for f in files], what=what)
    snapshot = Path(path)
    missing = [f for f in files if not os.path.lexists(snapshot / f)]
    if missing:
        raise ModelNotFoundError(
            f"{shown}: {missing[0]} is not "
            + ("in the local Hugging Face cache" if offline else "in the repository")
            + (f" (and {len(missing) - 1} more files)" if len(missing) > 1 else "")
            + f"; this {what} cannot be opened without it",
            file=repo_id,
            key=missing[0],
            hint=(
                f"download it: `hf download {repo_id} --revision {snapshot.name}` (or unset HF_HUB_OFFLINE)"
                if offline
                else f"the repository is not a complete {what}; check the id and revision"
            ),
        )
    return ResolvedModel(
        spec_model=repo_id, path=snapshot, hub_id=repo_id, revision=revision or "main", commit=snapshot.name
    )


def _literal(name: str) -> str:
    """``name`` as an fnmatch pattern matching only itself (``allow_patterns`` are globs)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _not_available(
    repo_id: str, shown: str, revision: str | None, what: str, offline: bool, err: Exception
) -> ModelNotFoundError:
    where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the Hugging Face Hub"
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    return ModelNotFoundError(
        f"{shown}: no {what} of that name here, and not found {where} ({type(err).__name__})",
        file=repo_id,
        hint=(
            f"check the path or the id; to use it offline, download it first (`{fetch}`) or unset HF_HUB_OFFLINE"
            if offline
            else "check the path, or the id and revision (a private or gated repo needs `hf auth login`)"
        ),
    )


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedModel:
    snapshot = Path(_snapshot(repo_id, revision, HUB_PATTERNS, what="model"))
    return ResolvedModel(
        spec_model=repo_id, path=snapshot, hub_id=repo_id, revision=revision or "main", commit=snapshot.name
    )


def _snapshot(repo_id: str, revision: str | None, patterns: Sequence[str], *, what: str) -> str:
    """The files of ``repo_id`` matching ``patterns``, fetched into the Hugging Face cache (only looked for there
    offline): the one place a Hub download can fail, so every caller refuses it alike."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError

    offline = _offline()
    try:
        return huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=list(patterns), local_files_only=offline
        )
    except HFValidationError as err:
        raise ModelNotFoundError(
            f"{repo_id}: not a local directory nor a valid Hub id ({err})",
            file=repo_id,
            hint="give an existing directory, or a Hub id of the form org/name",
        ) from None
    except Exception as err:  # huggingface_hub raises many types for "not available"
        shown = f"{repo_id}@{revision or 'main'}"
        raise _not_available(repo_id, shown, revision, what, offline, err) from None


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
