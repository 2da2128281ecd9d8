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


class FileSystemError(MmerError):
    """The operating system refused to read or write a file: read-only, no permission, a name too long, busy."""

    exit_code = 1


class OutputWriteError(FileSystemError):
    """The file system refused a write of the output (a :class:`FileSystemError` met while writing it)."""


# The one table of what each errno means and what to do about it; anything else is still named, with its reason.
_OS_ERRORS = {
    "EROFS": ("the file system is read-only", "write to a writable location (for an output: another -o)"),
    "EACCES": ("permission denied", "check the path's permissions, or choose a directory you may write to"),
    "EPERM": ("operation not permitted", "check the path's permissions, or choose a directory you may write to"),
    "ENAMETOOLONG": (
        "the name is too long for the file system",
        "use a shorter name (for an output, mmer adds about 40 characters to it for its staging directory)",
    ),
    "EBUSY": ("busy (in use by another process, or a mount point)", "close what holds it, or retry later"),
    "ETXTBSY": ("busy (in use by another process)", "close what holds it, or retry later"),
    "EEXIST": (
        "already exists (a file where a directory is needed, or made by another process meanwhile)",
        "remove it or choose another path, and run one writer per output",
    ),
    "ENOTEMPTY": (
        "appeared while writing (another process writing the same output?)",
        "run one writer per output, or choose another output path",
    ),
    "ENOTDIR": ("a part of the path is a file, not a directory", "check the path"),
    "EISDIR": ("is a directory where a file was expected", "pass a file path, not a directory"),
    "ENOENT": ("no such file or directory", "check that the path exists"),
    "ELOOP": ("too many symbolic links in the path", "fix the link loop"),
    "EMFILE": ("too many open files", "raise the open-file limit (ulimit -n) and run again"),
    "EFBIG": ("a file grew past the file system's size limit", "write to a file system without that limit"),
    "EIO": ("input/output error", "check the disk, then run again"),
}
_OS_ERRORS_BY_CODE = {getattr(errno, name): text for name, text in _OS_ERRORS.items() if hasattr(errno, name)}
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_ANY_OS_ERROR = "check the path, its permissions and the free space"


def from_os_error(err: OSError, path: object = None, *, writing_output: bool = False) -> MmerError:
    """The :class:`MmerError` an ``OSError`` becomes: one message naming the path, its reason and a fix.

    A full disk is a :class:`DiskFullError`; while writing an output anything else is an
    :class:`OutputWriteError`, elsewhere a :class:`FileSystemError`. All exit 1.
    """
    where = err.filename if err.filename else path
    prefix = f"{where}: " if where is not None else ""
    file = None if where is None else str(where)
    if err.errno in _DISK_FULL:
        during = " while writing the output" if writing_output else ""
        return DiskFullError(
            f"{prefix}no space left on the device{during}",
            file=file,
            hint="free some space on that file system, or write the output to a larger one; nothing partial was kept",
        )
    fallback = (err.strerror or str(err) or type(err).__name__, _ANY_OS_ERROR)
    reason, hint = _OS_ERRORS_BY_CODE.get(err.errno or -1, fallback)
    extra = f" (and {err.filename2})" if getattr(err, "filename2", None) else ""
    if writing_output:
        return OutputWriteError(f"{prefix}cannot write the output: {reason}{extra}", file=file, hint=hint)
    return FileSystemError(f"{prefix}{reason}{extra}", file=file, hint=hint)
