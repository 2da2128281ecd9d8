"""`mmer` commands. Each builds its inputs through the library, calls one library function, renders the result."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from mmer_cli import render
from mmer_cli.guard import EPILOG, GuardedGroup, interrupted

import mmer
from mmer.config import build_recipe, parse_size
from mmer.errors import ConfigError, MmerError
from mmer.io.report_files import check_png
from mmer.merge.masks import MASKS
from mmer.merge.methods import METHOD_OPTIONS, METHODS, methods_accepting
from mmer.mergekit_config import check_plan as check_mergekit_plan

app = typer.Typer(
    name="mmer",
    help="Merge multimodal LLMs that share a base LLM into one decoupled checkpoint (MMER).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    cls=GuardedGroup,
    epilog=EPILOG,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmer {mmer.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
    allow_external_links: Annotated[
        bool,
        typer.Option(
            "--allow-external-links",
            help="Follow links in model directories that lead outside them (default: refused; "
            "also MMER_ALLOW_EXTERNAL_LINKS=1).",
        ),
    ] = False,
) -> None:
    """Merge, inspect and use decoupled MMER checkpoints."""
    mmer.io.paths.set_allow_external_links(allow_external_links or None)  # None: MMER_ALLOW_EXTERNAL_LINKS decides
    # SIGTERM (CI cancelling a job) unwinds like Ctrl-C, so the staging directory is removed.
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _fail(err: MmerError, as_json: bool) -> None:
    render.print_error(err, as_json)
    raise typer.Exit(err.exit_code)


def _check_png(png: Path | None, default_name: str) -> Path | None:
    """Where a --png goes, refused before the work, not after it: a missing directory is not created (as with
    matplotlib's own savefig, a typo in it should not silently make a new tree), and a file mmer did not write
    is never replaced. An existing directory receives ``default_name`` inside it, and that file is reported."""
    if png is None:
        return None
    if png.is_dir() and not png.is_symlink():
        png = png / default_name
    try:
        return check_png(png)
    except MmerError as err:
        err.key = err.key or "png"
        raise


def _parse_lambdas(values: list[str]) -> dict[str, float]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--lambda-for {item!r} is not MODALITY=VALUE", key="lambda-for", hint="e.g. audio=0.7")
    return out


def _takes(option: str) -> str:
    """Which methods (or mask rules) take an option, from the registries' declarations: any other refuses it."""
    takers = methods_accepting(option) or sorted(name for name, rule in MASKS.items() if option in rule.accepts)
    kind = "Methods" if option in METHOD_OPTIONS else "Mask rules"
    return f" {kind}: {', '.join(takers)}."


@app.command()
def merge(
    specs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="A recipe YAML (base, models, options) or a mergekit config; or base.yaml first, then one YAML "
            "per fine-tuned model."
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory.")] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(help="Recipe YAML (base, models, options); spec files replace its models, flags its options."),
    ] = None,
    method: Annotated[str | None, typer.Option(help=f"Merge method: {', '.join(METHODS)} (default ties).")] = None,
    mask: Annotated[
        str | None, typer.Option(help=f"Mask rule: {', '.join(MASKS)} (default mmer; none: one merged model).")
    ] = None,
    k: Annotated[
        float | None, typer.Option("--k", help="Fraction of each task vector kept by the trim (0.8)." + _takes("k"))
    ] = None,
    lambda_: Annotated[
        float | None, typer.Option("--lambda", help="λ of the mask rule for every modality (0.9)." + _takes("lambda"))
    ] = None,
    lambda_for: Annotated[
        list[str] | None, typer.Option("--lambda-for", help="Per-modality λ, e.g. --lambda-for audio=0.7.")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="Scale of τ* (method default: 1; task_arithmetic 0.3).")] = None,
    trim_scope: Annotated[
        str | None, typer.Option(help="global (paper) or per-tensor." + _takes("trim_scope"))
    ] = None,
    zero_sign: Annotated[
        str | None,
        typer.Option(
            help="Elected sign where Σ τ = 0: zero (TIES paper), positive (mergekit) or majority (TIES/FusionBench "
            "code: the model-wide majority sign, one more pass)." + _takes("zero_sign")
        ),
    ] = None,
    trim_count: Annotated[
        str | None,
        typer.Option(help="reference (TIES code: ⌊d·K⌋+1 kept) or exact (mergekit: ⌊d·K⌋)." + _takes("trim_count")),
    ] = None,
    elect_on: Annotated[
        str | None, typer.Option(help="Sign election on raw (paper) or weighted deltas." + _takes("elect_on"))
    ] = None,
    aggregate: Annotated[str | None, typer.Option(help="Disjoint mean (paper) or sum." + _takes("aggregate"))] = None,
    dare: Annotated[
        float | None, typer.Option(help="DARE drop rate p applied before the method (0 = off)." + _takes("dare"))
    ] = None,
    dare_seed: Annotated[int | None, typer.Option(help="Seed of DARE's random masks.")] = None,
    common_space: Annotated[
        float | None,
        typer.Option(help="Share of each matrix's rank in Iso-CTS's common subspace (0.8)." + _takes("common_space")),
    ] = None,
    iterations: Annotated[
        int | None, typer.Option(help="WUDI's Adam steps per weight matrix (400)." + _takes("iterations"))
    ] = None,
    rank_fraction: Annotated[
        float | None,
        typer.Option(help="CART's kept share of each matrix's rank per task (0.1)." + _takes("rank_fraction")),
    ] = None,
    mask_source: Annotated[
        str | None, typer.Option(help="Compare τ* with the trimmed (paper) or raw τᵢ." + _takes("mask_source"))
    ] = None,
    vocab_policy: Annotated[str | None, typer.Option(help="shared-rows, strict or exclude.")] = None,
    delta_dtype: Annotated[str | None, typer.Option(help="dtype of stored τ*: base or float32.")] = None,
    base_storage: Annotated[str | None, typer.Option(help="copy the base, or store a pinned reference.")] = None,
    tau_storage: Annotated[
        str | None, typer.Option(help="How τ* is stored: exact (default), or int8/int4 codes with per-group scales.")
    ] = None,
    tau_group_size: Annotated[
        int | None, typer.Option(help="Entries per scale with --tau-storage int8/int4 (128).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Where the math runs: cpu, cuda, cuda:1...")] = None,
    shard_size: Annotated[str | None, typer.Option(help="Max bytes per output shard, e.g. 5GB.")] = None,
    allow_nonfinite: Annotated[
        bool | None, typer.Option("--allow-nonfinite/--refuse-nonfinite", help="Merge weights holding NaN/inf.")
    ] = None,
    hash_inputs: Annotated[
        bool | None, typer.Option("--hash-inputs/--no-hash-inputs", help="Record sha256 of every input file.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier mmer output there (never anything mmer did not write).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check inputs, print the plan and memory estimate.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Merge fine-tuned multimodal LLMs into a decoupled checkpoint: base + τ* + one bit-mask per modality."""
    try:
        recipe_obj = build_recipe(
            specs or [],
            recipe,
            _parse_lambdas(lambda_for or []),
            method=method,
            mask=mask,
            k=k,
            lambda_=lambda_,
            alpha=alpha,
            trim_scope=trim_scope,
            trim_count=trim_count,
            zero_sign=zero_sign,
            elect_on=elect_on,
            aggregate=aggregate,
            dare=dare,
            dare_seed=dare_seed,
            common_space=common_space,
            iterations=iterations,
            rank_fraction=rank_fraction,
            mask_source=mask_source,
            vocab_policy=vocab_policy,
            delta_dtype=delta_dtype,
            base_storage=base_storage,
            tau_storage=tau_storage,
            tau_group_size=tau_group_size,
            device=device,
            shard_size=None if shard_size is None else parse_size(shard_size),
            allow_nonfinite=allow_nonfinite,
            hash_inputs=hash_inputs,
        )
        if output is None and not dry_run:
            raise ConfigError("no output directory", key="output", hint="pass -o merged/ (or --dry-run)")
        translated = recipe_obj.source is not None and recipe_obj.source.kind == "mergekit"
        notes = list(recipe_obj.source.notes) if translated else []
        if dry_run:
            with mmer.build_plan(recipe_obj) as plan:
                check_mergekit_plan(recipe_obj, plan)
                report = mmer.run_merge(plan, output, dry_run=True)
            if json_out:
                extra = {"mergekit": {"recipe": recipe_obj.to_dict(), "notes": notes}} if translated else {}
                render.print_json({"ok": True, **report.to_dict(), **extra})
            else:
                if translated:
                    render.out_console.print(
                        f"# {recipe_obj.source.file} is a mergekit config; mmer runs it as this recipe:\n"
                        + recipe_obj.to_compact_yaml(),
                        markup=False,
                        highlight=False,
                    )
                render.print_plan(report.plan)
                render.print_warnings(notes + report.warnings)
            return
        with mmer.build_plan(recipe_obj) as plan:  # opened and checked once: the estimate first, then the merge
            check_mergekit_plan(recipe_obj, plan)
            if not json_out and not quiet:
                render.print_estimate(plan.to_dict()["estimate"])
            with render.RichProgress(enabled=not quiet and not json_out) as progress:
                report = mmer.run_merge(plan, output, overwrite=overwrite, progress=progress)
    except MmerError as err:
        _fail(err, json_out)
    except KeyboardInterrupt:
        raise typer.Exit(interrupted(json_out, "the partial output was removed; nothing was written")) from None
    if json_out:
        extra = {"mergekit": {"recipe": recipe_obj.to_dict(), "notes": notes}} if translated else {}
        render.print_json({"ok": True, **report.to_dict(), **extra})
    else:
        render.print_warnings(notes + report.warnings)
        render.print_merge_report(report.to_dict())


@app.command()
def compare(
    specs: Annotated[
        list[Path] | None, typer.Argument(help="base.yaml first, then one YAML per fine-tuned model.")
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            # Help is rich markup: an unescaped "[/MASK]" reads as a closing tag and crashes `--help`.
            help=r"METHOD[+dare[=P]]\[/MASK], repeatable (default: the MMER paper's baselines and MMER itself).",
        ),
    ] = None,
    recipe: Annotated[Path | None, typer.Option(help="Recipe YAML whose options every variant starts from.")] = None,
    k: Annotated[float | None, typer.Option("--k", help="Fraction kept by the trim (0.8).")] = None,
    lambda_: Annotated[float | None, typer.Option("--lambda", help="λ for every modality (rule default).")] = None,
    dare: Annotated[float | None, typer.Option(help="Drop rate of '+dare' variants without '=P' (0.5).")] = None,
    device: Annotated[str | None, typer.Option(help="Where the math runs: cpu, cuda...")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    png: Annotated[
        Path | None, typer.Option(help="Write a bar chart of errors and densities (a directory: DIR/compare.png).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Compare merge methods and mask rules on the same models: how far each modality's rebuilt LLM is from its own."""
    from mmer.compare import PAPER_VARIANTS, run_compare, write_bar_chart

    try:
        png = _check_png(png, "compare.png")
        recipe_obj = build_recipe(specs or [], recipe, None, k=k, lambda_=lambda_, dare=dare, device=device)
        with render.RichProgress(enabled=not quiet and not json_out) as progress:
            report = run_compare(recipe_obj, tuple(variant or PAPER_VARIANTS), progress=progress)
        if png is not None:
            png = write_bar_chart(report, png)
    except MmerError as err:
        _fail(err, json_out)
    except KeyboardInterrupt:
        raise typer.Exit(interrupted(json_out)) from None
    if json_out:
        render.print_json({"ok": True, **report.to_dict(), "png": None if png is None else str(png)})
        return
    render.print_compare(report.to_dict())
    render.print_warnings(report.warnings)
    if png is not None:
        render.out_console.print(f"bar chart written to {png}", markup=False)


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="A decoupled checkpoint directory, or its Hub id (org/name).")],
    sources: Annotated[
        bool, typer.Option("--sources", help="Also rebuild each modality and compare with its source model.")
    ] = False,
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source", help="Where a modality's source model is now: MODALITY=PATH (repeatable; implies --sources)."
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    revision: Annotated[
        str | None, typer.Option(help="With a Hub id for PATH: the branch, tag or commit (default main).")
    ] = None,
) -> None:
    """Check every file's hash, every mask's shape and count, and optionally the rebuild against the sources."""
    from mmer_cli.parsing import pairs

    from mmer.verify import verify as run_verify

    try:
        moved = pairs(source, "--source")
        report = run_verify(path, sources=sources or bool(moved), source_paths=moved, revision=revision)
    except MmerError as err:
        _fail(err, json_out)
    if json_out:
        render.print_json(report.to_dict())
    else:
        render.print_verify(report.to_dict())
    if not report.ok:
        raise typer.Exit(1)


@app.command("inspect-masks")
def inspect_masks(
    path: Annotated[Path, typer.Argument(help="A decoupled checkpoint directory, or its Hub id (org/name).")],
    revision: Annotated[
        str | None, typer.Option(help="With a Hub id for PATH: the branch, tag or commit (default main).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
    png: Annotated[
        Path | None,
        typer.Option(
            help="Write a heatmap (layers × modules, one panel per modality; a directory: DIR/mask_density.png)."
        ),
    ] = None,
) -> None:
    """Show what each modality's mask kept: per layer, per module type, and overlaps between modalities."""
    from mmer.inspect import write_heatmap

    try:
        png = _check_png(png, "mask_density.png")
        stats = mmer.inspect_masks(path, revision)
        if png is not None:
            png = write_heatmap(stats, png)
    except MmerError as err:
        _fail(err, json_out)
    data = stats.to_dict()
    if json_out:
        render.print_json({"ok": True, **data, "png": None if png is None else str(png)})
        return
    render.print_mask_stats(data, stats.modules, stats.rows)
    if png is not None:
        render.out_console.print(f"heatmap written to {png}", markup=False)


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Where to build the tiny models and write the result (default: a temp dir).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the merge and mask summaries as JSON.")] = False,
) -> None:
    """Build a tiny base LLM plus LLaVA-style and Qwen2-Audio models from it, merge them, inspect the masks."""
    from mmer.demo import build_demo_models
    from mmer.inspect import write_heatmap

    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mmer-demo-"))
    try:
        if not json_out:
            render.err_console.print(f"building tiny demo models in {root} ...")
        models = build_demo_models(root)
        recipe_obj = build_recipe(list(models.specs))
        with render.RichProgress(enabled=not json_out) as progress:
            report = mmer.run_merge(recipe_obj, root / "merged", overwrite=True, progress=progress)
        stats = mmer.inspect_masks(root / "merged")
        png = write_heatmap(stats, root / "mask_density.png")
    except MmerError as err:
        _fail(err, json_out)
    if json_out:
        render.print_json({"ok": True, "merge": report.to_dict(), "masks": stats.to_dict(), "png": str(png)})
        return
    render.print_merge_report(report.to_dict())
    render.print_warnings(report.warnings)
    render.print_mask_stats(stats.to_dict(), stats.modules, stats.rows)
    render.out_console.print(
        f"\nmodel specs: {', '.join(str(s) for s in models.specs)}\nheatmap: {png}\n"
        f"try: mmer merge {' '.join(str(s) for s in models.specs)} -o {root / 'merged2'} --dry-run"
    )


def _register_command_groups() -> None:
    """Commands owned by their own modules (route, extend) register on the one app, in a fixed order."""
    from mmer_cli import extend_commands, route_commands, tune_commands

    route_commands.register(app)
    tune_commands.register(app)
    extend_commands.register(app)


_register_command_groups()

if __name__ == "__main__":
    app()
