"""The errors mmer raises for bad input.

Every user-facing failure is an :class:`MmerError` that says what was found, what was expected and what to
do, and carries the file / tensor / key it is about as attributes so that ``--json`` output and tests can read
them without parsing prose. ``assert`` is kept for internal invariants only.

``exit_code`` is what the ``mmer`` command exits with: 2 for a usage error (what the user typed or wrote in a
recipe or spec: fix the command and run it again), 1 for a runtime failure (a corrupt or hostile file, an
incompatible model, non-finite weights, the file system refusing a read or write: the inputs or the machine
must change). Scripts can then tell "my command is wrong" from "the job failed".
"""

from __future__ import annotations

import errno


class MmerError(Exception):
    """Base class: a problem with the user's input or environment, never a bug in mmer."""

    exit_code = 2  # usage error unless a subclass says it is a runtime failure

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        tensor: str | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.tensor = tensor
        self.key = key
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [self.message]
        if self.hint:
            parts.append(f"Fix: {self.hint}")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, str | None]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "file": self.file,
            "tensor": self.tensor,
            "key": self.key,
            "hint": self.hint,
        }


class ConfigError(MmerError):
    """A YAML spec or recipe is malformed: unknown key, wrong type, value out of range."""


class ModelNotFoundError(MmerError):
    """A model path or Hub id could not be resolved to local files."""


class CheckpointFormatError(MmerError):
    """A weight file is truncated, corrupt, or disagrees with its index."""

    exit_code = 1


class LayoutError(MmerError):
    """The tensor names match no known way of storing an LLM inside a (multimodal) checkpoint."""

    exit_code = 1


class IncompatibleBaseError(MmerError):
    """A fine-tuned model was not fine-tuned from the given base (shapes, config dims or tensor sets differ)."""

    exit_code = 1


class NonFiniteError(MmerError):
    """A weight holds NaN or inf."""

    exit_code = 1


class OutputExistsError(MmerError):
    """The output path exists and ``overwrite`` was not asked for."""


class DecoupledFormatError(MmerError):
    """A decoupled checkpoint is missing files, is from a newer format, or fails a check."""

    exit_code = 1


class DiskFullError(MmerError):
    """The output file system ran out of space."""

    exit_code = 1


class UnsafePathError(MmerError):
    """A file would be read from, or written to, outside the directory it belongs to (a link out, ``..``)."""

    exit_code = 1


class OutputWriteError(MmerError):
    """The file system refused a write of the output: read-only, no permission, a name too long, busy."""

    exit_code = 1


class FileSystemError(MmerError):
    """The operating system refused to read or write a file: read-only, no permission, a name too long, busy."""

    exit_code = 1


_OS_HINT_BY_NAME = {
    "ENOSPC": "free some space on that file system, or write the output to a larger one",
    "EDQUOT": "your disk quota is used up; free some space or write the output elsewhere",
    "EROFS": "the file system is read-only; write the output to a writable directory",
    "EACCES": "you lack permission there; check the path's permissions or choose another path",
    "EPERM": "the operation is not permitted there; check the path's permissions or choose another path",
    "ENAMETOOLONG": "use a shorter file or directory name",
    "EBUSY": "the file is in use by another program; close it, or retry later",
    "ETXTBSY": "the file is in use by another program; close it, or retry later",
    "EISDIR": "a directory is where a file was expected; pass a file path",
    "ENOTDIR": "a part of the path is a file, not a directory; check the path",
    "ENOENT": "check that the path exists",
    "EEXIST": "something is already there; remove it or choose another path",
    "EMFILE": "too many open files; raise the limit (ulimit -n) and run again",
    "ELOOP": "the path has a symbolic link loop; fix the link",
    "EIO": "the device reported an I/O error; check the disk",
}
_OS_HINTS = {getattr(errno, name): hint for name, hint in _OS_HINT_BY_NAME.items() if hasattr(errno, name)}


def from_os_error(err: OSError) -> MmerError:
    """The :class:`MmerError` for an ``OSError`` nothing nearer caught: one message naming the path and a fix.

    A full disk is a :class:`DiskFullError`; anything else a :class:`FileSystemError`. Both exit 1.
    """
    path = err.filename if err.filename is not None else None
    reason = err.strerror or str(err) or type(err).__name__
    where = f"{path}: " if path is not None else ""
    extra = f" (and {err.filename2})" if getattr(err, "filename2", None) else ""
    cls = DiskFullError if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) else FileSystemError
    return cls(
        f"{where}{reason}{extra}",
        file=None if path is None else str(path),
        hint=_OS_HINTS.get(err.errno or -1, "check the path, its permissions and the free space"),
    )
