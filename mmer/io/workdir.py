"""A demo's work directory: made for it, reused by it, and never a directory of the user's.

``mmer demo`` and ``mmer extend demo`` write their models, data and outputs into one directory each; a marker
(:mod:`mmer.io.outputs`) of the demo's own kind lets a later run reuse it, and anything else is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmer.errors import OutputExistsError
from mmer.io.outputs import is_mmer_output, output_os_error, read_marker, write_marker

DEMO_KIND = "demo-workdir"  # mmer demo's; each demo passes its own kind


def claim_workdir(
    root: str | Path, kind: str = DEMO_KIND, writes: str = "base/, vision/, audio/, merged/ and specs"
) -> Path:
    """Make ``root`` a demo's work directory: a new or empty one is marked as this demo's (``kind``), a marked
    one reused.

    Anything else (a non-empty directory the demo did not make, a file, a link) is refused: a demo writes
    ``writes`` there and must not touch a user's files.
    """
    root = Path(os.path.abspath(os.path.expanduser(root)))
    marker = read_marker(root)
    if marker is not None and marker.get("kind") == kind and not root.is_symlink():
        return root
    if root.is_symlink() or (os.path.lexists(root) and not root.is_dir()):
        raise OutputExistsError(
            f"{root}: is {'a symbolic link' if root.is_symlink() else 'a file'}, not a demo work directory",
            file=str(root),
            hint="give --workdir a new or empty directory, or leave it out to use a temporary one",
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            what = "another mmer output" if marker is not None or is_mmer_output(root) else "files of its own"
            raise OutputExistsError(
                f"{root}: is not empty and not a previous demo work directory (it holds {what}); the demo would "
                f"write {writes} into it",
                file=str(root),
                hint="give --workdir a new or empty directory, or leave it out to use a temporary one",
            )
        write_marker(root, kind)
    except OSError as err:
        raise output_os_error(err, root) from None
    return root
