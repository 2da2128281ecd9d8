"""sha256 of files: the one rule every writer and checker of a checkpoint uses.

Inputs are hashed when merged so a later ``add``, ``verify`` or a reference base can prove it reads the same
bytes; outputs are hashed into the manifest so any change to a checkpoint is caught. Files are read in chunks
(never whole into memory) with ``hashlib.sha256``, which every supported Python has (``hashlib.file_digest``
needs 3.11). A file in the Hub cache is named by its sha256, so its hash costs nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mmer.io.resolve import cached_blob_sha256

CHUNK_BYTES = 1 << 24  # large reads keep hashing at disk speed; one chunk is all it holds in memory


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def known(digest: str | None) -> Future:
    """A future that already holds ``digest``: a hash known without reading the file (or none wanted), so it
    sits beside the hashes still being computed and every one is read back the same way."""
    f: Future = Future()
    f.set_result(digest)
    return f


def hash_files(files: Iterable[Path], pool: ThreadPoolExecutor, enabled: bool = True) -> dict[str, Future]:
    """sha256 of each file by name: from the Hub cache's blob name when possible, else read on ``pool`` (so
    the hashing overlaps the merge that reads the same files); ``None`` for each when not ``enabled``."""
    futures: dict[str, Future] = {}
    for file in files:
        if not enabled:
            futures[file.name] = known(None)
        elif (cached := cached_blob_sha256(file)) is not None:
            futures[file.name] = known(cached)
        else:
            futures[file.name] = pool.submit(file_sha256, file)
    return futures


def hash_tree(root: Path, exclude: set[str]) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative POSIX path, in sorted order (the manifest's ``files``).

    Files are hashed on one thread per core (sha256 releases the GIL), so a checkpoint's two large files, the
    base copy and τ*, are read and hashed side by side."""
    paths = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in exclude:
            paths[rel] = path
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        return dict(zip(paths, pool.map(file_sha256, paths.values()), strict=True))
