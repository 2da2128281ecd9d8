"""`mmer reconstruct` and the router commands (mmer.route); registered on the app by cli/main.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from mmer_cli import render
from mmer_cli.guard import interrupted

from mmer.config import parse_size
from mmer.errors import ConfigError, MmerError


def reconstruct(
    path: Annotated[
        Path, typer.Argument(help="A decoupled checkpoint directory (the output of `mmer merge`), or its Hub id.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the rebuilt model(s) go.")],
    modality: Annotated[
        list[str] | None, typer.Option("--modality", "-m", help="Modality to rebuild (repeatable).")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Rebuild every modality, one subdirectory each.")] = False,
    shard_size: Annotated[str, typer.Option(help="Max bytes per output shard, e.g. 5GB.")] = "5GiB",
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier mmer output there (never anything mmer did not write).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    revision: Annotated[
        str | None, typer.Option(help="With a Hub id for PATH: the branch, tag or commit (default main).")
    ] = None,
) -> None:
    """Rebuild θ_base + mᵢ∘τ* as a standalone checkpoint in the source model's own layout, loadable unchanged.

    One --modality writes the model into OUTPUT; --all (or several --modality) writes OUTPUT/<modality>/.
    """
    from mmer.route.reconstruct import reconstruct as rebuild

    try:
        if all_ == bool(modality):
            raise ConfigError(
                "give either --modality or --all", key="modality", hint="e.g. --modality vision, or --all"
            )
        names = None if all_ else modality
        with render.RichProgress(enabled=not quiet and not json_out) as progress:
            report = rebuild(
                path,
                output,
                names,
                subdirs=all_ or len(names or []) > 1,
                overwrite=overwrite,
                shard_size=parse_size(shard_size),
                progress=progress,
                revision=revision,
            )
    except MmerError as err:
        render.print_error(err, json_out)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        raise typer.Exit(interrupted(json_out, "the partial output was removed; nothing was written")) from None
    if json_out:
        render.print_json({"ok": True, **report.to_dict()})
        return
    for model in report.models:
        render.out_console.print(
            f"{model.modality}: {model.path} ({model.layout} layout, {model.llm_tensors} LLM + "
            f"{model.component_tensors} component tensors, {render.human_bytes(model.bytes)})",
            highlight=False,
            markup=False,
        )
    render.print_warnings(report.warnings)
    render.out_console.print(f"done in {report.seconds:.1f} s", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("reconstruct")(reconstruct)
