"""Run the `mmer` app in-process the way a terminal user would, for every test module that drives the CLI.

A plain module rather than a conftest: tests/cli has no __init__.py, so a conftest.py there would shadow the
`conftest` module that other test modules import by name.
"""

from __future__ import annotations

import inspect
import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmer_cli.main import app
from typer.testing import CliRunner

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Wide, colourless output so that rich neither wraps paths nor adds escape codes. MMER_DEBUG=1: an exception mmer
# did not foresee (a bug) is raised into the test (result.exception), never hidden behind a clean "internal error".
CLI_ENV = {
    "COLUMNS": "500",
    "LINES": "200",
    "TTY_COMPATIBLE": "0",
    "NO_COLOR": "1",
    "FORCE_COLOR": None,
    "MMER_DEBUG": "1",
}


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:  # shown by pytest when an assertion on the result fails
        return f"exit {self.exit_code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}\n--- {self.exception!r}"


def cli(*args: str | Path, env: dict[str, str | None] | None = None) -> CliResult:
    """Run ``mmer ARGS`` with stdout and stderr kept apart, restoring the SIGTERM handler the app installs.

    ``env`` adds to (or, with ``None`` values, removes from) the environment the command sees.
    """
    # Click < 8.2 mixes stderr into stdout unless told not to; Click >= 8.2 dropped `mix_stderr`.
    mix = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters else {}
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner(env={**CLI_ENV, **(env or {})}, **mix).invoke(app, [str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, previous)
    exception = None if isinstance(result.exception, SystemExit) else result.exception
    return CliResult(result.exit_code, ANSI.sub("", result.stdout), ANSI.sub("", result.stderr), exception)
