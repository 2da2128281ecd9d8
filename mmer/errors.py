"""The errors mmer raises for bad input.

Every user-facing failure is an :class:`MmerError` that says what was found, what was expected and what to
do, and carries the file / tensor / key it is about as attributes so that ``--json`` output and tests can read
them without parsing prose. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations


class MmerError(Exception):
    """Base class: a problem with the user's input or environment, never a bug in mmer."""

    exit_code = 2

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


class LayoutError(MmerError):
    """The tensor names match no known way of storing an LLM inside a (multimodal) checkpoint."""


class IncompatibleBaseError(MmerError):
    """A fine-tuned model was not fine-tuned from the given base (shapes, config dims or tensor sets differ)."""


class NonFiniteError(MmerError):
    """A weight holds NaN or inf."""


class OutputExistsError(MmerError):
    """The output path exists and ``overwrite`` was not asked for."""


class DecoupledFormatError(MmerError):
    """A decoupled checkpoint is missing files, is from a newer format, or fails a check."""


class DiskFullError(MmerError):
    """The output file system ran out of space."""


class UnsafePathError(MmerError):
    """A file would be read from, or written to, outside the directory it belongs to (a link out, ``..``)."""

    exit_code = 1


class OutputWriteError(MmerError):
    """The file system refused a write of the output: read-only, no permission, a name too long, busy."""

    exit_code = 1
