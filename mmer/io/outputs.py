"""Which directories mmer may replace or remove: only the ones it wrote itself, and never one it reads from.

``--overwrite`` used to delete whatever sat at ``-o``: an input model, the parent of the inputs, the checkpoint
being rebuilt, a user's unrelated directory or a plain file. Now every output carries a small marker
(:data:`MARKER_NAME`, written into the staging directory as soon as it exists, so a merge's manifest lists it
and ``verify`` checks it like any file), and only a directory holding that marker, or the manifest of an output
written before the marker existed, is replaced. A target that is, contains or lies inside a path the run
reads is refused whatever it holds, and a link at the target is never followed nor replaced.

A run killed with SIGKILL cannot clean up, so its staging directory (named after the output and the writer's
pid) stays behind. The next run to the same output removes such leftovers when their process is gone and they
carry the marker, and says so; anything else that merely looks like one is named and left alone. On storage
shared between machines a pid says nothing about another machine's processes: two machines writing the same
output at once already clash at the final rename, and a leftover removal can only make the other run fail,
never lose a file mmer did not write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmer.errors import MmerError, OutputExistsError, from_os_error
from mmer.io.jsonfile import loads_bounded
from mmer.io.paths import allowed_roots
from mmer.progress import human_bytes
from mmer.version import __version__

MARKER_NAME = ".mmer-output"
# Outputs written before the marker existed are recognised by their manifest (a decoupled checkpoint's, an
# extension pack's). The names are spelled here because io sits below the packages that define them.
LEGACY_MANIFESTS = ("mmer_manifest.json", "moextend_manifest.json")
_MARKER_MAX_BYTES = 4096
_LEFTOVER = re.compile(r"\.mmer-(?P<what>staging|old)-(?:(?P<pid>\d{1,10})-)?(?P<tag>[0-9a-f]{8})")


def staging_name(target: Path, pid: int, tag: str) -> str:
    """The hidden sibling a run writes ``target`` into; the pid lets a later run tell whether the writer lives."""
    return f".{target.name}.mmer-staging-{pid}-{tag}"


def old_name(target: Path, pid: int, tag: str) -> str:
    """Where the previous ``target`` waits, for an instant, between the two renames of a replacement."""
    return f".{target.name}.mmer-old-{pid}-{tag}"


def marker_bytes(kind: str) -> bytes:
    """The marker's content: the same for every run of one mmer version, so outputs stay bit-reproducible."""
    data = {"tool": "mmer", "kind": kind, "mmer_version": __version__}
    return (json.dumps(data, sort_keys=True) + "\n").encode("utf-8")


def write_marker(directory: Path, kind: str) -> Path:
    path = directory / MARKER_NAME
    path.write_bytes(marker_bytes(kind))
    return path


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    """The marker of ``directory`` when it holds a genuine one (a small regular file, mmer's JSON), else None."""
    path = Path(directory) / MARKER_NAME
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MARKER_MAX_BYTES:
            return None
        data = loads_bounded(path.read_bytes(), path, what="output marker", max_bytes=_MARKER_MAX_BYTES)
    except (OSError, MmerError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "mmer" or not isinstance(data.get("kind"), str):
        return None
    return data


def is_mmer_output(path: str | Path) -> bool:
    """Whether ``path`` is a real directory (not a link) that mmer wrote: its marker, or a legacy manifest."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    if read_marker(path) is not None:
        return True
    return any((path / name).is_file() and not (path / name).is_symlink() for name in LEGACY_MANIFESTS)


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def output_os_error(err: OSError, path: Path) -> MmerError:
    """The :class:`~mmer.errors.MmerError` an OS error while writing the output at ``path`` becomes."""
    return from_os_error(err, path, writing_output=True)


def check_target(target: str | Path, overwrite: bool, protect: Iterable[str | Path] = ()) -> None:
    """Refuse an output that would destroy or write through something mmer does not own.

    ``protect`` is every path the run reads (input models, the checkpoint being read): the target may be
    none of them, contain none of them and lie inside none of them, whether it exists yet or not. A Hub cache
    snapshot also protects its repo folder, where the blobs its links point to live.
    """
    target = Path(os.path.abspath(os.path.expanduser(target)))  # not resolved: a link at the target is refused
    try:
        _check_target(target, overwrite, protect)
    except OSError as err:  # a name too long, a parent that is a file, a directory we may not list
        raise output_os_error(err, target) from None


def _check_target(target: Path, overwrite: bool, protect: Iterable[str | Path]) -> None:
    if target.is_symlink():
        raise OutputExistsError(
            f"{target}: is a symbolic link (to {os.readlink(target)}); mmer never writes through, nor replaces, "
            "a link given as the output",
            file=str(target),
            hint="give the real directory you want written, or a new path",
        )
    real = _real(target)
    for item in protect:
        for root in (_real(item), *allowed_roots(item)):
            if real == root or real in root.parents or root in real.parents:
                what = "is" if real == _real(item) else "contains" if real in root.parents else "is inside"
                raise OutputExistsError(
                    f"{target}: {what} {item}, which this run reads; mmer never writes over or into its own input",
                    file=str(target),
                    hint="choose an output path outside every input model and checkpoint",
                )
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise OutputExistsError(
            f"{target}: already exists and is a file; mmer replaces only a directory it wrote itself",
            file=str(target),
            hint="choose another output path, or move the file away yourself",
        )
    if is_mmer_output(target) or _empty(target):
        if not overwrite:
            raise OutputExistsError(
                f"{target}: already exists",
                file=str(target),
                hint="choose another output path or pass --overwrite to replace it",
            )
        return  # mmer's own output, or an empty directory: nothing of the user's to lose
    raise OutputExistsError(
        f"{target}: already exists and is not an mmer output (it holds no {MARKER_NAME} marker nor mmer "
        "manifest), so mmer will not replace it" + (", not even with --overwrite" if overwrite else ""),
        file=str(target),
        hint="choose a new output path (--overwrite replaces only a directory mmer wrote), or delete this one "
        "yourself if you no longer need it",
    )


def _empty(directory: Path) -> bool:
    try:
        return not any(directory.iterdir())
    except OSError:
        return False  # unreadable: assume it holds something


def _process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap, safe liveness test: never remove
    if pid <= 0:
        return False  # never a writer's pid, and os.kill(0, ...) would signal our own process group
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except (OverflowError, OSError):
        return False  # not a pid this system can have
    return True


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root, followlinks=False):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def clear_leftovers(target: Path) -> list[str]:
    """Remove what interrupted runs to ``target`` left beside it; returns one sentence per thing found.

    A leftover goes only when its writer's process is gone and it is a real directory carrying mmer's marker
    (or manifest); a live writer's is not touched, and one without the marker is named, not removed.
    """
    parent = target.parent
    prefix = f".{target.name}"
    notes: list[str] = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(prefix + ".mmer-")]
    except OSError:
        return notes
    for entry in sorted(entries, key=lambda e: e.name):
        match = _LEFTOVER.fullmatch(entry.name[len(prefix) :])
        if match is None:
            continue
        pid = None if match["pid"] is None else int(match["pid"])
        if pid is not None and _process_alive(pid):
            continue  # another run is writing this output right now
        path = Path(entry.path)
        what = (
            "a staging directory left by an interrupted run"
            if match["what"] == "staging"
            else "the previous output left by an interrupted replacement"
        )
        if not entry.is_dir(follow_symlinks=False) or not is_mmer_output(path):
            notes.append(
                f"left {path} alone: it is named like {what} but carries no mmer marker; "
                "delete it yourself if it is yours"
            )
            continue
        size = _tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        details = ", ".join(([] if pid is None else [f"pid {pid}"]) + [human_bytes(size)])
        if os.path.lexists(path):
            notes.append(f"could not fully remove {what} ({details}): {path}; delete it yourself")
        else:
            notes.append(f"removed {what} ({details}): {path}")
    return notes
