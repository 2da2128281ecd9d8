"""`mmer add` and `mmer tune` (mmer.add, mmer.tune); registered on the app by cli/main.py."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
