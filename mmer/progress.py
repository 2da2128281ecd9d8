"""How long work reports progress without the library knowing about consoles.

The library calls a :class:`ProgressSink`; the CLI passes one that draws rich progress bars with ETA, and
Python callers may pass their own (or nothing).
"""

from __future__ import annotations


class ProgressSink:
    """Receives progress of named stages; every method is a no-op here."""

    def start(self, stage: str, total: float, unit: str = "B") -> None:
        """A stage begins; ``total`` is in ``unit`` (bytes by default, so ETA follows the I/O)."""

    def advance(self, stage: str, amount: float) -> None:
        """``amount`` more of ``stage`` is done."""

    def end(self, stage: str) -> None:
        """The stage is finished."""

    def note(self, message: str) -> None:
        """A line worth showing the user (a warning, an estimate)."""


NULL_PROGRESS = ProgressSink()


def human_bytes(n: float) -> str:
    """Sizes as users read them in progress lines, warnings and reports (decimal units, like download tools)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
