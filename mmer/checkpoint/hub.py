"""A decoupled checkpoint named by its Hub id: fetched into the Hugging Face cache file by file, manifest first.

Only what the manifest names is fetched (and, for a reader that needs only some modalities, only their masks and
components): never the whole repository, whatever else it holds. The manifest is read and validated from the
cache like a local one (:func:`mmer.checkpoint.manifest.read_manifest`) before it decides anything, and the files
are fetched at the commit the manifest came from, so a push in between cannot mix two versions. The cache's
links are followed only inside the repository's own cache folder (:mod:`mmer.io.paths`), as for any snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME, Manifest
from mmer.errors import ConfigError
from mmer.io.resolve import fetch_hub_files, is_hub_id

WHAT = "decoupled checkpoint"


def checkpoint_directory(
    path: str | Path, revision: str | None = None, modalities: Iterable[str] | None = None
) -> Path:
    """The local directory of the checkpoint ``path``: itself when it exists (or is no Hub id), else the Hub
    cache snapshot of ``path`` at ``revision`` holding the files ``modalities`` need (every file by default).

    Offline (``HF_HUB_OFFLINE=1``) nothing is downloaded; a checkpoint not in the cache is refused naming the
    id and the command that fetches it.
    """
    name = os.fspath(path)
    if os.path.lexists(name) or not is_hub_id(name):
        if revision is not None:
            raise ConfigError(
                f"{name}: a revision ({revision}) was given for a local directory",
                file=name,
                key="revision",
                hint="drop the revision, or name the checkpoint by its Hub id (org/name)",
            )
        return Path(path)
    head = fetch_hub_files(name, revision, [MANIFEST_NAME, MANIFEST_SHA_NAME], what=WHAT)
    manifest = Manifest.read(head.path)
    return fetch_hub_files(name, head.commit, needed_files(manifest, modalities), what=WHAT).path


def needed_files(manifest: Manifest, modalities: Iterable[str] | None = None) -> list[str]:
    """The files of the checkpoint a reader of ``modalities`` opens: all of them, less the masks and component
    folders of the modalities it leaves out."""
    if modalities is None:
        return sorted(manifest.files)
    wanted = set(modalities)
    skipped_files, skipped_dirs = set(), []
    for name, record in manifest.modalities.items():
        if name not in wanted:
            if record.mask_file:
                skipped_files.add(record.mask_file)
            skipped_dirs.append(record.component_dir.rstrip("/") + "/")
    return sorted(
        f for f in manifest.files if f not in skipped_files and not any(f.startswith(d) for d in skipped_dirs)
    )
