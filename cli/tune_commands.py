"""`mmer add` and `mmer tune` (mmer.add, mmer.tune); registered on the app by cli/main.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from mmer_cli import render
from mmer_cli.guard import interrupted
from mmer_cli.parsing import pairs as _pairs
from rich.markup import escape
from rich.table import Table

from mmer.errors import ConfigError, MmerError


def _fail(err: MmerError, as_json: bool) -> None:
    render.print_error(err, as_json)
    raise typer.Exit(err.exit_code)


def _interrupted(as_json: bool) -> None:
    raise typer.Exit(interrupted(as_json, "the partial output was removed; nothing was written"))


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r} is not a comma-separated list of numbers",
            key=flag.lstrip("-"),
            hint=f"e.g. {flag} 0.3,0.6,0.9",
        ) from None


def add(
    checkpoint: Annotated[
        Path, typer.Argument(help="The decoupled checkpoint to add to (output of mmer merge), or its Hub id.")
    ],
    specs: Annotated[
        list[Path], typer.Argument(help="One YAML per fine-tuned model to add, each with a new modality name.")
    ],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory.")] = None,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", help="Where an old modality's original model is now: MODALITY=PATH (repeatable)."),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(help="auto: originals where at hand, else stand-ins; exact: originals only; standin: never."),
    ] = "auto",
    device: Annotated[str | None, typer.Option(help="Where the math runs (default: as merged).")] = None,
    check_sources: Annotated[
        bool, typer.Option("--check-sources/--no-check-sources", help="Check originals against the recorded sha256.")
    ] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier mmer output there (never anything mmer did not write).")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Decide and check everything, write nothing.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    revision: Annotated[
        str | None, typer.Option(help="With a Hub id for CHECKPOINT: the branch, tag or commit (default main).")
    ] = None,
) -> None:
    """Add fine-tuned models (new tasks or new modalities) to a decoupled checkpoint: re-merge all task vectors.

    With the original models at hand this is the merge of all n+1 models, bit for bit (MMER §3.2.3); without
    them each old modality's reconstruction θ_base + mᵢ∘τ* stands in for it. mmer_add.json records which.
    """
    from mmer.add import add_models
    from mmer.checkpoint.hub import checkpoint_directory

    try:
        with render.RichProgress(enabled=not quiet and not json_out and not dry_run) as progress:
            report = add_models(
                checkpoint_directory(checkpoint, revision),
                list(specs),
                output,
                sources=_pairs(source, "--source"),
                mode=mode,
                device=device,
                check_sources=check_sources,
                overwrite=overwrite,
                dry_run=dry_run,
                progress=progress,
            )
    except MmerError as err:
        _fail(err, json_out)
    except KeyboardInterrupt:
        _interrupted(json_out)
    data = report.to_dict()
    if json_out:
        render.print_json({"ok": True, **data})
        return
    _print_add(data)


def _print_add(data: dict[str, Any]) -> None:
    table = Table(title="earlier modalities" + (" (dry run)" if data["dry_run"] else ""))
    for col in ("modality", "task vector from", "why", "mask density", "mask bits changed"):
        table.add_column(col)
    for name, o in data["old"].items():
        after = "" if o["density_after"] is None else f" → {o['density_after']:.2%}"
        changed = "" if o["mask_bits_changed"] is None else f"{o['mask_bits_changed']:,}"
        style = "" if o["source"] == "original" else "yellow"
        table.add_row(
            name,
            f"[{style}]{o['source']}[/]" if style else o["source"],
            escape(o["reason"]),
            f"{o['density_before']:.2%}{after}",
            changed,
        )
    render.out_console.print(table)
    added = Table(title="added")
    for col in ("modality", "added as", "model"):
        added.add_column(col, overflow="fold" if col == "model" else "ellipsis")
    for name, info in data["added"].items():
        added.add_row(name, info["kind"], escape(str(info["model"])))
    render.out_console.print(added)
    render.print_warnings(data["warnings"])
    if data["dry_run"]:
        return
    render.print_merge_report(data["merge"])
    kind = (
        "exact re-merge (every original at hand)" if data["exact"] else "re-merge with stand-ins (see mmer_add.json)"
    )
    render.out_console.print(f"{escape(str(data['output']))}: {kind}", highlight=False)


def tune(
    specs: Annotated[
        list[Path] | None, typer.Argument(help="base.yaml first, then one YAML per fine-tuned model.")
    ] = None,
    recipe: Annotated[Path | None, typer.Option(help="Recipe YAML (base, models, options) to tune.")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Tune a decoupled checkpoint's recipe, reusing its τ* for its K.")
    ] = None,
    source: Annotated[
        list[str] | None, typer.Option("--source", help="With --checkpoint: MODALITY=PATH of a moved original.")
    ] = None,
    score: Annotated[
        str, typer.Option(help="recon, logits, or MODULE:FUNCTION / path/file.py:FUNCTION (higher is better).")
    ] = "recon",
    probes: Annotated[
        list[str] | None, typer.Option("--probes", help="For logits: FILE for every modality, or MODALITY=FILE.")
    ] = None,
    lambdas: Annotated[
        str | None, typer.Option("--lambdas", help="λ grid, comma-separated (default 0.3,0.6,0.9,1.2,1.5).")
    ] = None,
    ks: Annotated[
        str | None, typer.Option("--ks", help="K grid, e.g. 0.6,0.8,1.0 (default: the recipe's K only).")
    ] = None,
    alphas: Annotated[
        str | None,
        typer.Option("--alphas", help="α grid (the scale on τ*), e.g. 0.8,1.0,1.2 (default: the recipe's α only)."),
    ] = None,
    modality: Annotated[
        list[str] | None, typer.Option("--modality", help="Tune only this modality (repeatable; default all).")
    ] = None,
    joint: Annotated[
        bool,
        typer.Option(
            "--joint",
            help="Choose every λ together (with K, α) for expansion mode: each candidate a merge your --score "
            "runs mixed prompts on (candidate.expansion()).",
        ),
    ] = False,
    search: Annotated[
        str | None,
        typer.Option(help="With --joint: grid (the whole product), coordinate (ascent), auto (grid if it fits)."),
    ] = None,
    budget: Annotated[
        int | None, typer.Option(help="With --joint: the most candidates scored (default 32); each may be a merge.")
    ] = None,
    validation: Annotated[
        Path | None,
        typer.Option(help="Your validation data, handed to your --score as candidate.validation."),
    ] = None,
    jobs: Annotated[int, typer.Option(help="Workers scoring candidates in parallel.")] = 1,
    backend: Annotated[str, typer.Option(help="auto, serial, thread, process or ray.")] = "auto",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address for --backend ray (default: a local Ray).")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for tune.json and tune.png.")] = Path(
        "mmer-tune"
    ),
    write_recipe: Annotated[
        Path | None, typer.Option(help="Write a recipe with the chosen λ and K, for mmer merge --recipe.")
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Scratch directory (shared storage for a Ray cluster).")] = None,
    device: Annotated[str | None, typer.Option(help="Where the math runs: cpu, cuda...")] = None,
    check_sources: Annotated[
        bool, typer.Option("--check-sources/--no-check-sources", help="With --checkpoint: check originals' sha256.")
    ] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier tune's files there (never a file mmer did not write).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    revision: Annotated[
        str | None, typer.Option(help="With a Hub id for --checkpoint: the branch, tag or commit (default main).")
    ] = None,
) -> None:
    """Search λ per modality (and K, α) maximising a score: a reconstruction or logit proxy, or your own function.

    With --joint, the λ vector is searched as a whole for expansion mode, scored by your function of mixed prompts.
    """
    from mmer.checkpoint.hub import checkpoint_directory
    from mmer.config import build_recipe
    from mmer.tune import DEFAULT_BUDGET, DEFAULT_LAMBDAS, check_outputs, run_joint_tune, run_tune, write_outputs

    try:
        if revision is not None and checkpoint is None:
            raise ConfigError("--revision goes with --checkpoint", key="revision", hint="name the checkpoint's Hub id")
        if checkpoint is not None:
            checkpoint = checkpoint_directory(checkpoint, revision)
        recipe_obj = build_recipe(list(specs or []), recipe) if specs or recipe is not None else None
        probe_arg: Any = None
        if probes:
            if len(probes) == 1 and not ("=" in probes[0] and not Path(probes[0]).exists()):
                probe_arg = probes[0]
            else:
                probe_arg = _pairs(probes, "--probes")
        lambda_grid = _floats(lambdas, "--lambdas") or DEFAULT_LAMBDAS
        k_grid = _floats(ks, "--ks")
        alpha_grid = _floats(alphas, "--alphas")
        check_outputs(output, write_recipe, overwrite)
        if not joint:
            given = [f for f, v in (("--search", search), ("--budget", budget)) if v is not None]
            if given:
                raise ConfigError(
                    f"{given[0]} goes with --joint", key=given[0].lstrip("-"), hint="add --joint, or leave it out"
                )
        elif probe_arg is not None:
            raise ConfigError("--probes goes with --score logits, not --joint", key="probes", hint="leave it out")
        with render.RichProgress(enabled=not quiet and not json_out) as progress:
            shared = dict(
                checkpoint=checkpoint,
                sources=_pairs(source, "--source"),
                score=score,
                ks=k_grid,
                alphas=alpha_grid,
                modalities=modality,
                validation=validation,
                jobs=jobs,
                backend=backend,
                ray_address=ray_address,
                workdir=workdir,
                device=device,
                check_sources=check_sources,
                progress=progress,
            )
            if joint:
                report = run_joint_tune(
                    recipe_obj,
                    lambdas=_floats(lambdas, "--lambdas"),
                    search=search or "auto",
                    budget=DEFAULT_BUDGET if budget is None else budget,
                    **shared,
                )
            else:
                report = run_tune(recipe_obj, lambdas=lambda_grid, probes=probe_arg, **shared)
        written = write_outputs(report, output, write_recipe, overwrite)
    except MmerError as err:
        _fail(err, json_out)
    except KeyboardInterrupt:
        raise typer.Exit(interrupted(json_out)) from None
    files = {label: None if path is None else str(path) for label, path in written.items()}
    if json_out:
        render.print_json({"ok": True, **report.to_dict(), "files": files})
        return
    (_print_joint if joint else _print_tune)(report.to_dict(), files)


def _print_tune(data: dict[str, Any], files: dict[str, str | None]) -> None:
    best = data["best"]
    table = Table(title=f"score by λ: {escape(data['description'])} (higher is better; ★ chosen)")
    table.add_column("modality")
    table.add_column("K", justify="right")
    table.add_column("α", justify="right")
    for lam in data["grid"]["lambda"]:
        table.add_column(f"λ={lam:g}", justify="right")
    cells: dict[tuple[str, float, float, float], float] = {
        (r["modality"], r["k"], r["alpha"], r["lambda"]): r["score"] for r in data["results"]
    }
    for modality in data["modalities"]:
        for k in data["grid"]["k"]:
            for alpha in data["grid"]["alpha"]:
                row = []
                for lam in data["grid"]["lambda"]:
                    value = f"{cells[(modality, k, alpha, lam)]:.5g}"
                    if (k, alpha) == (best["k"], best["alpha"]) and lam == best["lambda"][modality]:
                        value = f"[bold]{value} ★[/]"
                    row.append(value)
                table.add_row(modality, f"{k:g}", f"{alpha:g}", *row)
    render.out_console.print(table)
    chosen = ", ".join(f"{m}={v:g}" for m, v in best["lambda"].items())
    current = ", ".join(f"{m}={'default' if v is None else f'{v:g}'}" for m, v in data["current"]["lambda"].items())
    render.out_console.print(
        f"chosen: K={best['k']:g}, α={best['alpha']:g}, λ: {chosen}   "
        f"(was K={data['current']['k']:g}, α={data['current']['alpha']:g}, λ: {current})",
        highlight=False,
    )
    reused = data["tau_star_reused_for_k"]
    render.out_console.print(
        f"{len(data['results'])} candidates in {data['seconds']:.1f} s ({data['backend']}, {data['jobs']} job(s))"
        + ("" if reused is None else f"; the checkpoint's τ* reused for K={reused:g}"),
        highlight=False,
    )
    render.print_warnings(data["warnings"])
    for label, path in files.items():
        if path is not None:
            render.out_console.print(f"{label}: {escape(path)}", highlight=False)


def _print_joint(data: dict[str, Any], files: dict[str, str | None]) -> None:
    best, search = data["best"], data["search"]
    table = Table(title=f"candidates in search order: {escape(data['description'])} (higher is better; ★ chosen)")
    for col in ("#", "K", "α", *(f"λ {m}" for m in data["modalities"]), "score"):
        table.add_column(escape(col), justify="right")
    for r in data["results"]:
        score = f"{r['score']:.5g}"
        if r["order"] == best["order"]:
            score = f"[bold]{score} ★[/]"
        lams = [f"{r['lambda'][m]:g}" for m in data["modalities"]]
        table.add_row(str(r["order"]), f"{r['k']:g}", f"{r['alpha']:g}", *lams, score)
    render.out_console.print(table)
    chosen = ", ".join(f"{m}={v:g}" for m, v in best["lambda"].items())
    current = ", ".join(f"{m}={'default' if v is None else f'{v:g}'}" for m, v in data["current"]["lambda"].items())
    render.out_console.print(
        f"chosen: K={best['k']:g}, α={best['alpha']:g}, λ: {chosen}   "
        f"(was K={data['current']['k']:g}, α={data['current']['alpha']:g}, λ: {current})",
        highlight=False,
    )
    rounds = f", {search['rounds']} round(s)" if search["method"] == "coordinate" else ""
    render.out_console.print(
        f"{search['method']} search: {search['scored']} of at most {search['budget']} candidates{rounds}, "
        f"{search['stopped']}; {data['seconds']:.1f} s ({data['backend']}, {data['jobs']} job(s))",
        highlight=False,
    )
    render.print_warnings(data["warnings"])
    for label, path in files.items():
        if path is not None:
            render.out_console.print(f"{label}: {escape(path)}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("add")(add)
    app.command("tune")(tune)
