"""Single files mmer writes where the user points it (plots, tune reports, tuned recipes): never someone else's.

A plot path or a report directory is often reused between runs, so replacing what mmer wrote there last time is
expected; replacing a file mmer did not write (a figure of the user's, a recipe they edited by hand, anything a
link at that path points to) is data loss. So an existing file is replaced only when it carries mmer's own
signature (a PNG's ``Software`` text chunk, a report's format tag, a recipe's header line), and every file is
written to a temporary sibling and renamed into place: a link at the path is replaced, never followed, and an
interrupted write leaves the old file as it was.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmer.errors import MmerError, OutputExistsError, from_os_error
from mmer.version import __version__

PNG_SOFTWARE = f"mmer {__version__}"
_SIGNATURE_BYTES = 64 * 1024  # a signature sits in the first bytes of every file mmer writes


def _png_written_by_mmer(head: bytes) -> bool:
    # PNG text chunks are "tEXt" + keyword + NUL + text; matplotlib writes the Software one before the image data.
    return head.startswith(b"\x89PNG") and b"tEXtSoftware\x00mmer" in head


def _is_replaceable(path: Path, written_by_mmer: Callable[[bytes], bool], what: str) -> None:
    """Refuse ``path`` unless it is absent, or a regular file (not a link) that mmer wrote."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_file():
        kind = "a link" if path.is_symlink() else "not a regular file"
        raise OutputExistsError(
            f"{path}: is {kind}; mmer writes its {what} only as a new file or over one it wrote",
            file=str(path),
            hint="choose another path",
        )
    try:
        with open(path, "rb") as f:
            head = f.read(_SIGNATURE_BYTES)
    except OSError as err:
        raise from_os_error(err, path) from None
    if not written_by_mmer(head):
        raise OutputExistsError(
            f"{path}: already exists and mmer did not write it; refusing to replace it with the {what}",
            file=str(path),
            hint="choose another path, or move that file away first",
        )


def check_report_file(path: str | Path, written_by_mmer: Callable[[bytes], bool], what: str) -> Path:
    """Check, before any work, that ``path`` may receive the ``what``; returns it as a Path."""
    path = Path(path)
    _is_replaceable(path, written_by_mmer, what)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputExistsError(
            f"{path}: directory {parent} does not exist",
            file=str(path),
            hint=f"create it first (mkdir -p {parent}) or choose another path",
        )
    return path


def write_report_file(path: str | Path, data: bytes, written_by_mmer: Callable[[bytes], bool], what: str) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename, after :func:`check_report_file`."""
    path = check_report_file(path, written_by_mmer, what)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.mmer-tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o666)  # a new file's mode: the umask applies, nothing is widened
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as err:
        raise from_os_error(err, path, writing_output=True) from None
    return path


def check_png(path: str | Path) -> Path:
    """Check a plot path before the work that draws it."""
    return check_report_file(path, _png_written_by_mmer, "plot")


def save_figure(fig: Any, path: str | Path, dpi: int) -> Path:
    """Save a matplotlib figure as a PNG signed by mmer (so a later run may replace it, and only it)."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": PNG_SOFTWARE})
    except (ValueError, RuntimeError) as err:  # matplotlib's own failures (a figure too large, a font problem)
        raise MmerError(f"{path}: matplotlib could not draw the plot ({err})", file=str(path)) from None
    return write_report_file(path, buffer.getvalue(), _png_written_by_mmer, "plot")


def text_written_by(first_line: str) -> Callable[[bytes], bool]:
    """A signature check for text files whose first line mmer writes (recipes, reports)."""
    prefix = first_line.encode("utf-8")
    return lambda head: head.startswith(prefix)
