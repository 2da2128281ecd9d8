"""Where every failure of an `mmer` command ends: one `error:`/`fix:` message and an exit code, never a traceback.

Each command renders the :class:`~mmer.errors.MmerError` it expects itself; this guard, wrapped around the whole
app, catches whatever else escapes: an ``OSError`` from deep inside a merge (read-only or full file system, a
name too long, a busy file), a mistyped option, Ctrl-C, and any exception mmer did not foresee (a bug, reported
as one). Under ``--json`` each of these is one JSON document with ``"ok": false`` on stdout, so that a script
always has exactly one document to read.

Exit codes: 0 success, 1 runtime failure (the inputs or the machine must change), 2 usage error (the command,
recipe or spec must change), 130 interrupted. ``MMER_DEBUG=1`` re-raises unexpected exceptions with their
traceback instead (the test suite sets it, so that no bug hides behind a clean message).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import typer
from mmer_cli import render
from typer.core import TyperGroup

from mmer.errors import MmerError, from_os_error

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

RERUN = "run the command again to finish the job"

EPILOG = (
    "Exit codes: 0 success; 1 runtime failure (a corrupt or hostile file, incompatible models, a full or read-only "
    "disk); 2 usage error (a bad option, recipe or spec); 130 interrupted. With --json, stdout holds one JSON "
    'document, with "ok": false on failure.'
)


class CommandLineError(MmerError):
    """An option or argument click could not accept (unknown option, missing argument, wrong type)."""

    exit_code = EXIT_USAGE


class Interrupted(MmerError):
    """Ctrl-C or SIGTERM stopped the command."""

    exit_code = EXIT_INTERRUPTED


class InternalError(MmerError):
    """An exception mmer did not foresee: a bug in mmer, reported as one."""

    exit_code = EXIT_RUNTIME


def _is(exc: BaseException, name: str) -> bool:
    """Whether ``exc`` is click's exception ``name``: by class name, as typer itself checks, because typer
    vendors its own copy of click in some versions and uses the ``click`` package in others."""
    return any(cls.__name__ == name for cls in type(exc).__mro__)


def debug() -> bool:
    """``MMER_DEBUG=1``: let unexpected exceptions through with their traceback."""
    return os.environ.get("MMER_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def wants_json(args: Sequence[str]) -> bool:
    """Whether the command line asks for ``--json`` (before a ``--`` that ends the options)."""
    for arg in args:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def interrupted(as_json: bool, detail: str = "") -> int:
    """Report Ctrl-C (or SIGTERM) and return its exit code; ``detail`` says what became of partial outputs."""
    render.print_error(Interrupted("interrupted" + (f": {detail}" if detail else ""), hint=RERUN), as_json)
    return EXIT_INTERRUPTED


def usage_error(err: Any) -> MmerError:
    """A click usage error (``err.format_message()``, ``err.exit_code``, maybe ``err.ctx``) as one failure."""
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "mmer"
    param = getattr(err, "param", None)
    key = getattr(param, "name", None) or getattr(err, "option_name", None)
    failure = CommandLineError(err.format_message(), key=key, hint=f"see `{command} --help` for what it takes")
    failure.exit_code = err.exit_code  # a usage error is 2; click's few runtime errors (FileError) are 1
    return failure


def internal_error(exc: BaseException) -> MmerError:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return InternalError(
        f"internal error: mmer hit an unexpected {type(exc).__name__}" + (f" ({text})" if text else ""),
        hint="this is a bug in mmer, not in your input: please report it with the command you ran and this "
        "message (run it again with MMER_DEBUG=1 to see the traceback)",
    )


def failure_for(exc: BaseException) -> MmerError:
    """The one message (and exit code) for an exception that reached the top of the app."""
    if isinstance(exc, MmerError):
        return exc
    if _is(exc, "ClickException"):
        return usage_error(exc)
    if isinstance(exc, KeyboardInterrupt) or _is(exc, "Abort"):
        return Interrupted("interrupted", hint=RERUN)
    if isinstance(exc, OSError):
        return from_os_error(exc)
    return internal_error(exc)


class GuardedGroup(TyperGroup):
    """The `mmer` group: click's own main, with every exception turned into one rendered failure."""

    as_json = False  # whether the running command line asked for --json

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # typer would turn it into a silent exit 130; say so, as JSON when asked
            raise typer.Exit(interrupted(self.as_json)) from None

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # embedded by someone who handles exceptions themselves
            return super().main(args, prog_name, complete_var, standalone_mode, windows_expand_args, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        self.as_json = as_json = wants_json(argv)
        try:
            code = super().main(argv, prog_name, complete_var, False, windows_expand_args, **extra)
        except SystemExit:
            raise
        except BaseException as exc:  # the one place every failure is rendered
            if _is(exc, "NoArgsIsHelpError"):  # the help is printed already
                sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
            failure = failure_for(exc)
            if isinstance(failure, InternalError) and debug():
                raise
            render.print_error(failure, as_json)
            code = failure.exit_code
        sys.exit(code if isinstance(code, int) else 0)
