"""`mmer extend ...` (MoExtend, mmer.extend); registered on the app by cli/main.py.

Thin: each command reads its inputs through the library, calls one library function, renders the result.
Stage flags (--steps, --lr, ...) apply to the stage the command runs; the other stages come from --recipe. The
options every stage shares are declared once (``StageFlags``, ``STAGE_OPTIONS``) and added by ``stage_command``;
each stage's signature holds only what is its own.
"""

from __future__ import annotations

import dataclasses
import functools
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer
from mmer_cli import render
from mmer_cli.guard import interrupted

from mmer.errors import ConfigError, MmerError, OutputExistsError

extend_app = typer.Typer(
    name="extend",
    help="MoExtend: extend a pretrained MoE LLM (Mixtral, Qwen2-MoE, OLMoE) with new experts for a new modality.",
    no_args_is_help=True,
)

Base = Annotated[Path, typer.Argument(help="The base MoE causal LM (a local transformers directory).")]
Data = Annotated[
    Path,
    typer.Argument(
        help="Training data: a safetensors file written by mmer.extend.save_data, or a directory of such files "
        "(shards, read lazily; mmer.extend.save_shards). Text-only samples may sit beside the modality's: "
        "feature_mask [N] is 0 for them, they have no placeholder token and no row in features "
        "(docs/moextend.md §7)."
    ),
]
Recipe = Annotated[
    Path | None, typer.Option(help="MoExtend recipe YAML (align, probe, finetune, selection, extend...).")
]
Steps = Annotated[int | None, typer.Option(help="Optimiser steps of this stage (default: the recipe's).")]
Lr = Annotated[float | None, typer.Option("--lr", help="Peak learning rate of this stage.")]
BatchSize = Annotated[int | None, typer.Option(help="Samples per micro-batch.")]
Device = Annotated[str | None, typer.Option(help="auto, cpu or cuda.")]
Precision = Annotated[str | None, typer.Option(help="auto, no, bf16 or fp16.")]
Seed = Annotated[int | None, typer.Option(help="Seed of init, data order and RNG.")]
CheckpointDir = Annotated[Path | None, typer.Option(help="Keep resumable checkpoints here.")]
GradientCheckpointing = Annotated[
    bool, typer.Option(help="Recompute activations in the backward pass (less memory, same result).")
]
StatsSamples = Annotated[int | None, typer.Option(help="Size of the statistics set S_e (paper: 10,000).")]
RoutingTokens = Annotated[
    str | None, typer.Option(help="Tokens the routing statistics count: all, or prompt (the authors' code).")
]


def _resume(where: str) -> Any:
    """--resume names the option that holds the checkpoints of the stage it is on (train's is --workdir)."""
    return Annotated[bool, typer.Option(help=f"Continue from the latest checkpoint in {where}.")]


Resume = _resume("--checkpoint-dir")
SaveEvery = Annotated[int | None, typer.Option(help="Steps between checkpoints.")]
Projector = Annotated[Path | None, typer.Option(help="An aligned projector: the pack `mmer extend align` wrote.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _fail(err: MmerError, as_json: bool) -> None:
    render.print_error(err, as_json)
    raise typer.Exit(err.exit_code)


@dataclasses.dataclass(frozen=True)
class StageFlags:
    """What every training stage is told the same way: the recipe, this stage's training options, the run."""

    recipe: Path | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    device: str | None = None
    mixed_precision: str | None = None
    seed: int | None = None
    save_every: int | None = None
    gradient_checkpointing: bool = False
    resume: bool = False
    overwrite: bool = False
    json_out: bool = False
    quiet: bool = False

    def recipe_for(self, stage: str):
        """The recipe file (or defaults) with this stage's flags applied."""
        from mmer.extend import MoExtendRecipe, load_moextend_recipe
        from mmer.extend.options import replace_options

        recipe = load_moextend_recipe(self.recipe) if self.recipe is not None else MoExtendRecipe()
        options = {
            "steps": self.steps,
            "learning_rate": self.lr,
            "batch_size": self.batch_size,
            "device": self.device,
            "mixed_precision": self.mixed_precision,
            "seed": self.seed,
            "save_every": self.save_every,
            "gradient_checkpointing": self.gradient_checkpointing or None,
        }
        changes = {k: v for k, v in options.items() if v is not None}
        if not changes:
            return recipe
        section = replace_options(getattr(recipe, stage), stage, changes)
        return dataclasses.replace(recipe, **{stage: section})


STAGE_OPTIONS = {
    "recipe": Recipe,
    "steps": Steps,
    "lr": Lr,
    "batch_size": BatchSize,
    "device": Device,
    "mixed_precision": Precision,
    "seed": Seed,
    "save_every": SaveEvery,
    "gradient_checkpointing": GradientCheckpointing,
    "resume": Resume,
    "overwrite": Overwrite,
    "json_out": JsonOut,
    "quiet": Quiet,
}


def stage_command(func):
    """Register ``func(..., flags: StageFlags)`` as a stage: typer sees its own parameters, then ``STAGE_OPTIONS``."""
    hints = get_type_hints(func, include_extras=True)
    own = [p.replace(annotation=hints[p.name]) for p in signature(func).parameters.values() if p.name != "flags"]
    options = dict(STAGE_OPTIONS)
    if "checkpoint_dir" not in hints:
        options["resume"] = _resume("--workdir")
    shared = [
        Parameter(name, Parameter.KEYWORD_ONLY, default=getattr(StageFlags, name), annotation=annotation)
        for name, annotation in options.items()
    ]

    @functools.wraps(func)
    def command(**kwargs: Any) -> None:
        flags = StageFlags(**{name: kwargs.pop(name) for name in STAGE_OPTIONS})
        func(**kwargs, flags=flags)

    command.__signature__ = signature(func).replace(parameters=[*own, *shared])
    command.__annotations__ = {p.name: p.annotation for p in own} | options
    return extend_app.command()(command)


def _selection(rec, **flags: Any):
    """The recipe's selection options with the flags given (None: not given) applied."""
    from mmer.extend.options import replace_options

    changes = {k: v for k, v in flags.items() if v is not None}
    return replace_options(rec.selection, "selection", changes) if changes else rec.selection


def _aligned(base: Path, projector: Path | None):
    """The base LM, with the aligned projector loaded onto it when one is given."""
    from mmer.extend import load_base, load_extension_pack

    if projector is None:
        return None, load_base(base)
    model = load_extension_pack(base, projector)
    if model.projector is None or model.manifest is None or model.manifest["layers"]:
        raise ConfigError(
            f"{projector}: not a projector pack",
            file=str(projector),
            key="projector",
            hint="pass what `mmer extend align` wrote",
        )
    return model, model.lm


def _finish(summary: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    from mmer.extend.distributed import is_main_process

    if not is_main_process():  # under a multi-process launch, one process reports
        return
    if as_json:
        render.print_json({"ok": True, **summary})
        return
    for line in lines:
        render.out_console.print(line, highlight=False, markup=False)


def _report_lines(reports: dict[str, Any]) -> list[str]:
    out = []
    for name, r in reports.items():
        final = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        resumed = f", resumed at step {r['resumed_from']}" if r.get("resumed_from") else ""
        out.append(
            f"{name}: {r['steps']} steps, {r['trainable_parameters']:,} trainable parameters, final loss {final}, "
            f"{r['seconds']:.1f} s on {r['device']} ({r['mixed_precision']}){resumed}"
        )
    return out


def _run(as_json: bool, quiet: bool, work):
    """Run ``work(progress)`` with progress bars, turning library errors and Ctrl-C into exit codes."""
    try:
        with render.RichProgress(enabled=not quiet and not as_json) as progress:
            return work(progress)
    except MmerError as err:
        _fail(err, as_json)
    except KeyboardInterrupt:
        raise typer.Exit(interrupted(as_json, "partial outputs were removed; checkpoints are kept")) from None


@stage_command
def align(
    base: Base,
    data: Data,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the projector pack.")],
    checkpoint_dir: CheckpointDir = None,
    *,
    flags: StageFlags,
) -> None:
    """Stage a: train the new modality's projector with the whole LLM frozen; writes a projector-only pack."""
    from mmer.extend import align as align_stage
    from mmer.extend import load_base, load_data, write_pack
    from mmer.extend.distributed import barrier, is_main_process
    from mmer.extend.pack import check_output

    def work(progress):
        check_output(output, flags.overwrite, protect=[base, data, checkpoint_dir])
        rec = flags.recipe_for("align")
        model, report = align_stage(
            load_base(base),
            load_data(data),
            projector_options=rec.projector,
            options=rec.align,
            checkpoint_dir=checkpoint_dir,
            resume=flags.resume,
            progress=progress,
        )
        if is_main_process():  # under a multi-process launch, one process writes
            write_pack(
                model,
                output,
                modality=rec.extend.modality,
                training={"align": report.to_dict()},
                recipe=rec.to_dict(),
                overwrite=flags.overwrite,
                protect=[base, data, checkpoint_dir],
            )
        barrier()
        return report.to_dict()

    report = _run(flags.json_out, flags.quiet, work)
    _finish(
        {"output": str(output), "reports": {"align": report}},
        flags.json_out,
        [*_report_lines({"align": report}), f"projector pack written to {output}"],
    )


@stage_command
def probe(
    base: Base,
    data: Data,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the probe result (JSON).")],
    projector: Projector = None,
    stats_data: Annotated[
        Path | None, typer.Option(help="Statistics set S_e (default: a held-out share of DATA).")
    ] = None,
    fraction: Annotated[float | None, typer.Option(help="Share p of the MoE layers to extend (0.5).")] = None,
    stats_samples: StatsSamples = None,
    routing_tokens: RoutingTokens = None,
    checkpoint_dir: CheckpointDir = None,
    *,
    flags: StageFlags,
) -> None:
    """Stage b: tune only the routers, score each layer by its change of routing (d_j), pick the top p."""
    from mmer.extend import MoExtendModel, load_data, run_probe

    def work(progress):
        if output.exists() and not flags.overwrite:
            raise OutputExistsError(f"{output}: already exists", file=str(output), hint="pass --overwrite")
        rec = flags.recipe_for("probe")
        selection = _selection(rec, fraction=fraction, stats_samples=stats_samples, routing_tokens=routing_tokens)
        model, lm = _aligned(base, projector)
        result = run_probe(
            model or MoExtendModel(lm),
            load_data(data),
            rec.probe,
            selection,
            stats_data=None if stats_data is None else load_data(stats_data),
            checkpoint_dir=checkpoint_dir,
            resume=flags.resume,
            progress=progress,
        )
        result.save(output)
        return result

    result = _run(flags.json_out, flags.quiet, work)
    summary = {
        "output": str(output),
        "selected": result.selected,
        "scores": {str(k): v for k, v in result.scores.items()},
    }
    lines = [f"layer {k}: d = {v:.4g}{'  ← extend' if k in result.selected else ''}" for k, v in result.scores.items()]
    _finish(summary, flags.json_out, [*lines, f"chosen layers {result.selected}; probe result written to {output}"])


def _parse_layers(value: str | None) -> str | tuple[int, ...] | None:
    if value is None or value in ("extender", "all"):
        return value
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            f"--layers {value!r} is not extender, all or a comma-separated list",
            key="layers",
            hint="e.g. --layers 1,3",
        ) from None


@stage_command
def train(
    base: Base,
    data: Data,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the extension pack.")],
    layers: Annotated[
        str | None, typer.Option(help="extender (paper: the probe's choice), all, or a list such as 1,3.")
    ] = None,
    probe_result: Annotated[
        Path | None, typer.Option("--probe", help="A probe result from `mmer extend probe` (else it runs here).")
    ] = None,
    projector: Projector = None,
    stats_data: Annotated[Path | None, typer.Option(help="Statistics set S_e for the probe.")] = None,
    stats_samples: StatsSamples = None,
    routing_tokens: RoutingTokens = None,
    modality: Annotated[str | None, typer.Option(help="Name of the new modality (vision).")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Keep every stage's resumable checkpoints here.")] = None,
    *,
    flags: StageFlags,
) -> None:
    """Stages b″ and c (running a and b first when needed): add experts, train only them, write the pack."""
    from mmer.extend import ProbeResult, load_data, run_moextend
    from mmer.extend.options import replace_options
    from mmer.extend.pack import check_output

    def work(progress):
        check_output(output, flags.overwrite, protect=[base, data, projector, probe_result, stats_data, workdir])
        rec = flags.recipe_for("finetune")
        changes = {"layers": _parse_layers(layers), "modality": modality}
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:
            rec = dataclasses.replace(rec, extend=replace_options(rec.extend, "extend", changes))
        rec = dataclasses.replace(
            rec, selection=_selection(rec, stats_samples=stats_samples, routing_tokens=routing_tokens)
        )
        model, lm = _aligned(base, projector)
        result = run_moextend(
            lm,
            load_data(data),
            output,
            rec,
            projector_model=model,
            probe=None if probe_result is None else ProbeResult.load(probe_result),
            stats_data=None if stats_data is None else load_data(stats_data),
            workdir=workdir,
            resume=flags.resume,
            overwrite=flags.overwrite,
            progress=progress,
        )
        return result.to_dict()

    summary = _run(flags.json_out, flags.quiet, work)
    lines = _report_lines(summary["reports"])
    lines.append(f"extended layers {summary['layers']} (new experts copied from {summary['sources']})")
    lines.append(f"extension pack written to {output}")
    _finish(summary, flags.json_out, lines)


@extend_app.command()
def inspect(
    pack: Annotated[Path, typer.Argument(help="An extension pack directory.")],
    json_out: JsonOut = False,
) -> None:
    """Show what a pack holds: base, extended layers, source experts, scores, calibration, training."""
    from mmer.extend import read_pack_manifest

    try:
        manifest = read_pack_manifest(pack)
    except MmerError as err:
        _fail(err, json_out)
    if json_out:
        render.print_json({"ok": True, **manifest})
        return
    base = manifest["base"]
    lines = [
        f"pack {pack}: modality {manifest['modality']!r}, stage {manifest['stage']}, "
        f"format {manifest['format_version']}",
        f"base: {base['architecture']} ({base['model_type']}, {base['dtype']}), {base['num_hidden_layers']} layers, "
        f"sha256 {base['sha256'][:16]}…",
    ]
    for entry in manifest["layers"]:
        score = "" if entry.get("score") is None else f", d = {entry['score']:.4g}"
        lines.append(
            f"  layer {entry['layer']}: {entry['base_experts']} → {entry['base_experts'] + entry['new_experts']} "
            f"experts, copied from {entry['source_experts']}{score}"
        )
    if manifest.get("calibration"):
        lines.append(f"calibration: {manifest['calibration']['form']} (hidden {manifest['calibration']['hidden']})")
    if manifest.get("projector"):
        p = manifest["projector"]
        lines.append(f"projector: {p['kind']} from {p['in_features']} features, placeholder id {p['placeholder_id']}")
    lines.append(f"tensors: {manifest['tensors']['parameters']:,} parameters in {manifest['tensors']['file']}")
    _finish({}, False, lines)


@extend_app.command("eval")
def evaluate(
    base: Base,
    data: Data,
    pack: Annotated[
        Path | None, typer.Option(help="Evaluate with this pack on the base (else the base alone).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 8,
    json_out: JsonOut = False,
) -> None:
    """Mean next-token loss and accuracy on DATA's labelled tokens (forgetting: compare with and without --pack)."""
    from mmer.extend import MoExtendModel, load_base, load_data, load_extension_pack
    from mmer.extend import evaluate as evaluate_model

    try:
        model = load_extension_pack(base, pack) if pack is not None else MoExtendModel(load_base(base))
        metrics = evaluate_model(model, load_data(data), batch_size)
    except MmerError as err:
        _fail(err, json_out)
    summary = {"pack": None if pack is None else str(pack), **metrics}
    line = f"loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.2%} over {metrics['tokens']:,} tokens"
    _finish(summary, json_out, [line + ("" if pack is None else f" with {pack}")])


@extend_app.command()
def demo(
    workdir: Annotated[
        Path | None,
        typer.Option(help="Where to write the tiny MoE model, data, recipe and pack (default: a temp dir)."),
    ] = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Build a tiny Mixtral and data for a made-up modality, run align, probe and train on them, evaluate the pack."""
    import tempfile

    from mmer.extend.demo import run_extend_demo

    root = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="mmer-extend-demo-"))
    if not json_out and not quiet:
        render.err_console.print(f"building a tiny Mixtral and its data in {root} ...", markup=False)
    summary = _run(json_out, quiet, lambda progress: run_extend_demo(root, progress))
    files, held_out, text = summary["files"], summary["held_out"], summary["text"]
    root = Path(summary["pack"]).parent
    lines = [
        *_report_lines(summary["reports"]),
        f"extended layers {summary['layers']} (new experts copied from {summary['sources']})",
        f"held-out samples of the new modality: loss {held_out['loss']:.4f}, accuracy {held_out['accuracy']:.1%}",
        f"text alone (forgetting): loss {text['base']['loss']:.4f} on the base, {text['pack']['loss']:.4f} with "
        "the pack",
        f"extension pack written to {summary['pack']}",
        "",
        "next:",
        f"  mmer extend inspect {summary['pack']}",
        f"  mmer extend eval {files['base']} {files['held_out']} --pack {summary['pack']}",
        f"  mmer extend train {files['base']} {files['train']} --recipe {files['recipe']} -o {root / 'pack2'}",
    ]
    _finish(summary, json_out, lines)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(extend_app, name="extend")
