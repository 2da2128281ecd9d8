"""`mmer demo`: builds the tiny models, merges them and inspects the masks in one go."""

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

# ---------------------------------------------------------------------------------------------------- runner
# tests/cli has no conftest.py on purpose: without an __init__.py it would shadow the `conftest` module that
# tests/test_pipeline.py imports by name. Each CLI test module therefore carries this small runner.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Wide, colourless output so that rich neither wraps paths nor adds escape codes.
CLI_ENV = {"COLUMNS": "500", "LINES": "200", "TTY_COMPATIBLE": "0", "NO_COLOR": "1", "FORCE_COLOR": None}


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:  # shown by pytest when an assertion on the result fails
        return f"exit {self.exit_code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}\n--- {self.exception!r}"


def cli(*args: str | Path) -> CliResult:
    """Run the ``mmer`` app in-process with stdout and stderr kept apart."""
    # Click < 8.2 mixes stderr into stdout unless told not to; Click >= 8.2 dropped `mix_stderr`.
    mix = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters else {}
    previous = signal.getsignal(signal.SIGTERM)  # the app's callback installs its own SIGTERM handler
    try:
        result = CliRunner(env=CLI_ENV, **mix).invoke(app, [str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, previous)
    exception = None if isinstance(result.exception, SystemExit) else result.exception
    return CliResult(result.exit_code, ANSI.sub("", result.stdout), ANSI.sub("", result.stderr), exception)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_json_returns_the_merge_and_mask_summaries_and_an_existing_png(tmp_path):
    workdir = tmp_path / "demo"

    result = cli("demo", "--workdir", workdir, "--json")

    assert result.exit_code == 0, result
    data = result.json()
    assert data["ok"] is True
    merge_densities = {m["modality"]: m["density"] for m in data["merge"]["modalities"]}
    assert set(merge_densities) == {"vision", "audio"}
    assert all(0.0 <= d <= 1.0 for d in merge_densities.values())
    assert {name: m["density"] for name, m in data["masks"]["modalities"].items()} == merge_densities
    assert len(data["masks"]["overlaps"]) == 1
    png = Path(data["png"])
    assert png.is_file()
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert (workdir / "merged" / "mmer_manifest.json").is_file()
    for spec in ("base.yaml", "vision.yaml", "audio.yaml"):
        assert (workdir / spec).is_file()
