"""How tune refuses: a file the caller gave (probes, a score's module, the report's directory) that cannot be used,
and a score that could not be computed. One shape for each, so every refusal names the file and the option that
brought it, and says what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmer.errors import ConfigError, MmerError


class TuneError(MmerError):
    """A score could not be computed: the callable failed or returned no number, a probe does not fit."""

    def __reduce__(self) -> tuple[Any, ...]:  # survives a process or Ray worker with its fields
        return (_tune_error, (self.message, self.file, self.tensor, self.key, self.hint))


def _tune_error(message: str, file: str | None, tensor: str | None, key: str | None, hint: str | None) -> TuneError:
    return TuneError(message, file=file, tensor=tensor, key=key, hint=hint)


def refused(file: str | Path, problem: str, *, key: str, hint: str, line: int | None = None) -> ConfigError:
    """The error for a file the caller gave under option ``key`` that tune cannot use (``line``: where in it)."""
    where = f"{file}:{line}" if line is not None else f"{file}"
    return ConfigError(f"{where}: {problem}", file=str(file), key=key, hint=hint)
