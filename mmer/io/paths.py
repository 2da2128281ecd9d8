"""Where mmer may read: inside a model's own directory, or its Hugging Face cache repo folder, and nowhere else.

A model directory downloaded from a stranger may hold symlinks (``tokenizer.json -> /proc/self/environ``) that
would pull files from the user's machine into a published artifact. The Hub cache itself is made of links
(``snapshots/<commit>/x -> ../../blobs/<sha>``), so links are followed only while they resolve inside the
directory or, for a snapshot, inside its ``models--org--name`` repo folder. People who keep weights on shared
storage and link to them opt in with ``MMER_ALLOW_EXTERNAL_LINKS=1`` (or :func:`set_allow_external_links`, which
the CLI's ``--allow-external-links`` calls).

The directory itself is never policed: the user named it, so a model path that is a link to elsewhere is fine.
Only what lies inside it is. Callers open the resolved path :func:`check_inside` returns, so a link swapped in
after the check changes nothing, and they open only regular files (:func:`regular_file`), because a FIFO
planted under a weight file's name would block the read forever.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mmer.errors import CheckpointFormatError, UnsafePathError

ENV_ALLOW_EXTERNAL_LINKS = "MMER_ALLOW_EXTERNAL_LINKS"
CLI_ALLOW_EXTERNAL_LINKS = "--allow-external-links"
_allow_external_links: bool | None = None


def set_allow_external_links(allowed: bool | None) -> None:
    """Opt in (or out) of following links that leave a model's directory; ``None`` defers to the environment."""
    global _allow_external_links
    _allow_external_links = allowed


def external_links_allowed() -> bool:
    if _allow_external_links is not None:
        return _allow_external_links
    return os.environ.get(ENV_ALLOW_EXTERNAL_LINKS, "0").lower() in ("1", "true", "yes", "on")


def allowed_roots(directory: str | Path) -> tuple[Path, ...]:
    """The resolved directory, plus its Hub cache repo folder when the directory is a cache snapshot."""
    real = Path(os.path.realpath(directory))
    roots = [real]
    plain = Path(os.path.abspath(directory))
    for candidate in (plain, real):
        # <cache>/models--org--name/snapshots/<commit>[/sub] : the repo folder holds the blobs the links point to
        parts = candidate.parts
        for i in range(len(parts) - 2, 0, -1):
            if parts[i] == "snapshots" and parts[i - 1].split("--")[0] in ("models", "datasets", "spaces"):
                roots.append(Path(os.path.realpath(Path(*parts[:i]))))
                break
    return tuple(dict.fromkeys(roots))


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_inside(directory: str | Path, path: str | Path, *, what: str = "file") -> Path:
    """The real path of ``path``, refused unless it resolves inside ``directory`` (or its Hub cache repo folder).

    ``path`` is named as for ``open()`` (absolute, or relative to the current directory, like ``directory``
    itself), so ``directory / name`` is always right, a relative ``directory`` included. Returns the resolved
    path, which callers should open instead of ``path`` so that a link swapped in afterwards changes nothing.
    """
    directory = Path(directory)
    candidate = Path(path)
    real = Path(os.path.realpath(candidate))
    roots = allowed_roots(directory)
    if any(_within(real, root) for root in roots) or external_links_allowed():
        return real
    try:
        where = f"is a link to {os.readlink(candidate)}, which resolves to {real}"
    except OSError:  # not itself a link: a linked folder on its way, or ``..``
        where = f"resolves to {real}"
    raise UnsafePathError(
        f"{candidate}: this {what} {where}, outside {directory}",
        file=str(candidate),
        hint=(
            "a model directory may only link inside itself (or its Hugging Face cache folder); this file may be "
            f"hostile: replace the link with the file it should be. If you linked it yourself on purpose, set "
            f"{ENV_ALLOW_EXTERNAL_LINKS}=1 or pass {CLI_ALLOW_EXTERNAL_LINKS}"
        ),
    )


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def not_regular(shown: str | Path, mode: int, what: str = "file") -> UnsafePathError:
    """The refusal for a name that holds something other than a regular file (never opened: it could block)."""
    return UnsafePathError(
        f"{shown}: this {what} is {_kind(mode)}, not a regular file; it is not read",
        file=str(shown),
        hint="replace it with the real file; a model directory holds only regular files (and links to them)",
    )


def regular_file(real: str | Path, shown: str | Path, *, what: str = "file") -> bool:
    """Whether ``real`` (a path :func:`check_inside` returned) is a regular file: ``False`` when nothing is there.

    Anything else that is there (FIFO, device, socket, directory) is refused, naming ``shown``, without being
    opened.
    """
    try:
        mode = os.stat(real).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as err:
        raise unreadable(shown, err) from None
    if not stat.S_ISREG(mode):
        raise not_regular(shown, mode, what)
    return True


def unreadable(shown: str | Path, err: OSError) -> CheckpointFormatError:
    """An input file the operating system would not let mmer read."""
    return CheckpointFormatError(
        f"{shown}: cannot be read ({err.strerror or err})",
        file=str(shown),
        hint="check the file's permissions, or fetch the model again",
    )


def copy_regular_file(real: str | Path, destination: str | Path, *, shown: str | Path, max_bytes: int) -> int:
    """Copy the regular file ``real`` to a new file ``destination``; return the bytes copied.

    The source is opened without blocking and checked on the open descriptor, so what is checked is what is
    read and a FIFO swapped in cannot hang the copy; at most ``max_bytes`` are read whatever its size claims
    (files under ``/proc`` report 0). The copy gets a fresh file's mode (0o644 less the umask): no mode, owner
    or time is carried over from the source, so a copy never becomes more readable than a new file.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as err:
        raise unreadable(shown, err) from None
    with os.fdopen(fd, "rb", buffering=0) as src:
        mode = os.fstat(src.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(shown, mode)
        os.set_blocking(src.fileno(), True)
        out_flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        out = os.open(destination, out_flags, 0o644)
        total = 0
        try:
            with os.fdopen(out, "wb") as dst:
                while True:
                    try:
                        chunk = src.read(1 << 20)
                    except OSError as err:
                        raise CheckpointFormatError(
                            f"{shown}: cannot be read ({err.strerror or err})", file=str(shown), hint="fetch it again"
                        ) from None
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > max_bytes:
                        raise too_large(shown, max_bytes)
                    dst.write(chunk)
        except BaseException:
            Path(destination).unlink(missing_ok=True)
            raise
    return total


def too_large(shown: str | Path, max_bytes: int) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{shown}: larger than the {max_bytes // 2**20} MiB a config, tokenizer or processor file may be",
        file=str(shown),
        hint="this is not a real side file (or it is hostile); remove it from the model directory or replace it",
    )
