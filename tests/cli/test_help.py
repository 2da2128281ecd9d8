"""`--help` of every command and subcommand prints its usage: help texts are rich markup, and one stray bracket
(`[/MASK]` reads as a closing tag) once crashed `mmer compare --help`."""

from __future__ import annotations

import pytest
import typer.main
from cli_runner import cli
from mmer_cli.main import app


def command_paths(command, path=()) -> list[tuple[str, ...]]:
    """Every command path under the app: ``()`` for `mmer` itself, ``("extend", "align")``..."""
    out = [path]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        out += command_paths(sub, (*path, name))
    return out


PATHS = command_paths(typer.main.get_command(app))


def test_the_walk_finds_every_command_group_and_subcommand():
    names = {" ".join(p) for p in PATHS}
    assert {"merge", "compare", "verify", "inspect-masks", "reconstruct", "add", "tune", "demo"} <= names
    assert {"extend", "extend align", "extend train"} <= names


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) or "mmer" for p in PATHS])
def test_every_command_prints_its_help(path):
    result = cli(*path, "--help")
    assert result.exit_code == 0, result
    assert result.exception is None, result
    assert "Usage" in result.stdout and "--help" in result.stdout, result


def test_the_help_names_both_exit_codes():
    text = " ".join(cli("--help").stdout.split())
    assert "1 runtime failure" in text and "2 usage error" in text


def test_the_variant_help_shows_its_brackets():
    text = cli("compare", "--help").stdout
    assert "METHOD[+dare[=P]][/MASK]" in text
