"""`mmer reconstruct`: one modality or all, loadable by transformers, JSON summary, refusals that leave nothing."""

from __future__ import annotations

import inspect
import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mmer_cli.main import app
from typer.testing import CliRunner

import mmer
from mmer.config import build_recipe

# ---------------------------------------------------------------------------------------------------- runner
# The same small runner as the other CLI test modules (tests/cli has no conftest.py, see there).
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CLI_ENV = {"COLUMNS": "500", "LINES": "200", "TTY_COMPATIBLE": "0", "NO_COLOR": "1", "FORCE_COLOR": None}


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"exit {self.exit_code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}\n--- {self.exception!r}"


def cli(*args: str | Path) -> CliResult:
    mix = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters else {}
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner(env=CLI_ENV, **mix).invoke(app, [str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, previous)
    exception = None if isinstance(result.exception, SystemExit) else result.exception
    return CliResult(result.exit_code, ANSI.sub("", result.stdout), ANSI.sub("", result.stderr), exception)


@pytest.fixture(scope="module")
def merged(demo_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reconstruct-cli") / "merged"
    mmer.run_merge(build_recipe(list(demo_models.specs)), out)
    return out


def test_one_modality_is_written_into_the_output_and_loads_with_from_pretrained(merged, tmp_path):
    from transformers import LlavaForConditionalGeneration

    result = cli("reconstruct", merged, "--modality", "vision", "-o", tmp_path / "vision", "--quiet")

    assert result.exit_code == 0, result
    assert "vision:" in result.stdout and "hf_legacy layout" in result.stdout
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "vision")


def test_all_writes_one_subdirectory_per_modality_and_json_lists_them(merged, tmp_path):
    result = cli("reconstruct", merged, "--all", "-o", tmp_path / "all", "--json")

    assert result.exit_code == 0, result
    data = result.json()
    assert data["ok"] is True
    assert [m["modality"] for m in data["models"]] == ["vision", "audio"]
    for m in data["models"]:
        assert m["path"] == str(tmp_path / "all" / m["modality"])
        assert (Path(m["path"]) / "model.safetensors").is_file()
        assert (Path(m["path"]) / "config.json").is_file()


def test_neither_modality_nor_all_exits_2_with_a_hint_and_writes_nothing(merged, tmp_path):
    result = cli("reconstruct", merged, "-o", tmp_path / "out")

    assert result.exit_code == 2, result
    assert "either --modality or --all" in result.stderr
    assert "fix:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_modality_exits_2_naming_the_ones_there_are(merged, tmp_path):
    result = cli("reconstruct", merged, "--modality", "video", "-o", tmp_path / "out", "--json")

    assert result.exit_code == 2, result
    data = result.json()
    assert data["ok"] is False and data["error"] == "DecoupledFormatError"
    assert "vision, audio" in data["message"]
    assert not (tmp_path / "out").exists()


def test_an_existing_output_exits_2_unless_overwrite_is_given(merged, tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    refused = cli("reconstruct", merged, "--modality", "audio", "-o", out, "--quiet")
    replaced = cli("reconstruct", merged, "--modality", "audio", "-o", out, "--quiet", "--overwrite")

    assert refused.exit_code == 2 and "already exists" in refused.stderr, refused
    assert replaced.exit_code == 0, replaced
    assert (out / "model.safetensors").is_file()
