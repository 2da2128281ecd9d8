"""`--help` of every command and subcommand prints its usage, found by walking the app (never a hand list): help
texts are rich markup, and one stray bracket (`[/MASK]` reads as a closing tag) once crashed `mmer compare
--help`; a help text that names a flag must name one its command has."""

from __future__ import annotations

import re

import pytest
import typer.main
from cli_runner import cli
from mmer_cli.main import app
from rich.markup import render

ROOT = typer.main.get_command(app)


def command_paths(command, path=()) -> list[tuple[str, ...]]:
    """Every command path under the app: ``()`` for `mmer` itself, ``("extend", "align")``..."""
    out = [path]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        out += command_paths(sub, (*path, name))
    return out


def command_at(path: tuple[str, ...]):
    command = ROOT
    for name in path:
        command = command.commands[name]
    return command


def help_texts(command) -> list[tuple[str, str]]:
    """(where, text) for the command's own help, epilog and each parameter's help."""
    texts = [("help", command.help), ("short help", command.short_help), ("epilog", command.epilog)]
    texts += [(f"{p.name} help", getattr(p, "help", None)) for p in command.params]
    return [(where, text) for where, text in texts if text]


def flags_of(command) -> set[str]:
    """A command's own flags; a group's help may also name its subcommands' (`mmer --help`: "With --json")."""
    own = {opt for p in command.params for opt in (*p.opts, *getattr(p, "secondary_opts", ())) if opt.startswith("--")}
    return own.union(*(flags_of(sub) for sub in getattr(command, "commands", {}).values()))


PATHS = command_paths(ROOT)
IDS = [" ".join(p) or "mmer" for p in PATHS]
# "mmer merge --recipe": a flag of another command, named with it; "`mmer extend align`", a command, not a flag.
OTHER_COMMAND = re.compile(r"mmer ((?:[a-z][a-z-]* ?)+?)(?= --|`|$)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def test_the_walk_finds_every_command_group_and_subcommand():
    names = {" ".join(p) for p in PATHS}
    assert {"merge", "compare", "verify", "inspect-masks", "reconstruct", "add", "tune", "demo"} <= names
    assert {"extend", "extend align", "extend train", "extend demo"} <= names


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_every_command_prints_its_help(path):
    result = cli(*path, "--help")
    assert result.exit_code == 0, result
    assert result.exception is None, result
    assert "Traceback" not in result.stdout + result.stderr, result
    assert "Usage" in result.stdout and "--help" in result.stdout, result


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_every_help_text_is_plain_text_to_rich(path):
    """No help text holds a markup tag: rich would eat it (``[bold]``) or crash on it (``[/MASK]``); a literal
    bracket pair is escaped (``\\[``) and so shows as typed."""
    for where, text in help_texts(command_at(path)):
        try:
            rendered = render(text)
        except Exception as err:  # rich.errors.MarkupError and friends
            pytest.fail(f"mmer {' '.join(path)}: {where} is not valid rich markup ({err}): {text!r}")
        assert not rendered.spans, f"mmer {' '.join(path)}: {where} holds markup tags: {text!r}"
        assert rendered.plain == text.replace("\\[", "["), f"mmer {' '.join(path)}: {where} changes when rendered"


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_every_flag_a_help_text_names_exists(path):
    command = command_at(path)
    for where, text in help_texts(command):
        own = text
        for match in OTHER_COMMAND.finditer(text):  # "mmer merge --recipe": checked against `mmer merge`
            other = tuple(match.group(1).split())
            while other and " ".join(other) not in {" ".join(p) for p in PATHS}:
                other = other[:-1]
            rest = text[match.end() :]
            named = FLAG.match(rest.lstrip())
            if other and named:
                assert named.group() in flags_of(command_at(other)), f"{where} of mmer {' '.join(path)}: {text!r}"
                own = own.replace(match.group() + rest[: len(rest) - len(rest.lstrip())] + named.group(), "")
        for flag in FLAG.findall(own):
            assert flag in flags_of(command), f"mmer {' '.join(path)}: {where} names {flag}, which it lacks: {text!r}"


def test_the_help_names_both_exit_codes():
    text = " ".join(cli("--help").stdout.split())
    assert "1 runtime failure" in text and "2 usage error" in text


def test_the_variant_help_shows_its_brackets():
    text = cli("compare", "--help").stdout
    assert "METHOD[+dare[=P]][/MASK]" in text


def test_extend_train_help_names_the_option_that_holds_its_checkpoints():
    text = " ".join(cli("extend", "train", "--help").stdout.split())
    assert "--checkpoint-dir" not in text and "latest checkpoint in --workdir" in text
