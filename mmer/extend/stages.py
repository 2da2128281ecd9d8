"""The three stages as calls, and all of them in a row (what ``mmer extend run`` does).

::

    model, _ = align(base_lm, data)                       # (a) projector only
    probe = run_probe(model, data, recipe.probe, ...)     # (b) router-only tuning → d_j → layers
    plan = plan_extension(model, recipe.extend, probe)    # (b″) layers and source experts
    report = finetune(model, data, plan, recipe)          # (c) new experts, router rows, calibration (+ projector)
    write_pack(model, "pack/", ...)                       # → load_extension_pack(base, "pack/")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmer.errors import ConfigError
from mmer.extend.data import ExtendDataset
from mmer.extend.distributed import barrier, ensure_process_group, is_main_process
from mmer.extend.extension import expected_new_parameter_count, extend_model, set_trainable
from mmer.extend.families import block_shape, moe_block, moe_layer_indices
from mmer.extend.modality import MoExtendModel, Projector
from mmer.extend.options import ExtendOptions, MoExtendRecipe, ProjectorOptions, TrainOptions
from mmer.extend.pack import check_output, write_pack
from mmer.extend.probe import ProbeResult, count_routing, run_probe
from mmer.extend.routing import RoutingCounts
from mmer.extend.selection import source_experts
from mmer.extend.training import TrainReport, train
from mmer.progress import NULL_PROGRESS, ProgressSink


def build_projector(lm: nn.Module, data: ExtendDataset, options: ProjectorOptions, seed: int) -> Projector:
    """A freshly initialised float32 projector (seeded) from the data's feature width to the LM's hidden size."""
    in_features = options.in_features or data.feature_dim
    if in_features is None:
        raise ConfigError(
            f"{data.source}: the data has no features, so there is no modality to project",
            file=data.source,
            tensor="features",
            hint="add encoder features to the data, or skip the align stage for a text-only task extension",
        )
    if data.feature_dim is not None and data.feature_dim != in_features:
        raise ConfigError(
            f"{data.source}: features are {data.feature_dim} wide but projector.in_features = {in_features}",
            file=data.source,
            key="in_features",
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = Projector(options.kind, in_features, int(lm.config.hidden_size))
    # float32 whatever the LM's dtype, like the new tensors: it trains, and its output is cast to the embeddings'.
    return projector.to(device=next(lm.parameters()).device, dtype=torch.float32)


def align(
    base_lm: nn.Module,
    data: ExtendDataset,
    *,
    projector_options: ProjectorOptions | None = None,
    options: TrainOptions | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: ProgressSink | None = None,
) -> tuple[MoExtendModel, TrainReport]:
    """Stage a: train a new projector with the whole LM frozen. Returns κ (base + projector) and the report."""
    from mmer.extend.options import ALIGN_DEFAULTS

    options = options or ALIGN_DEFAULTS
    projector = build_projector(base_lm, data, projector_options or ProjectorOptions(), options.seed)
    model = MoExtendModel(base_lm, projector, data.placeholder_id)
    trainable = set_trainable(model, "align")
    report = train(
        model, trainable, data, options, stage="align", checkpoint_dir=checkpoint_dir, resume=resume, progress=progress
    )
    for p in model.parameters():
        p.requires_grad_(False)
    return model, report


@dataclass
class ExtensionPlan:
    """Which layers get how many experts copied from which ones, and why (recorded in the pack)."""

    sources: dict[int, list[int]]
    method: str  # extender | all | explicit
    source_statistics: str  # tuned (κ′) | base (κ) | fixed
    probe: ProbeResult | None = None
    counts: RoutingCounts | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.sources)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "layers": self.layers,
            "sources": {str(k): v for k, v in sorted(self.sources.items())},
            "source_statistics": self.source_statistics,
        }
        if self.probe is not None:
            probe = self.probe.to_dict()
            out |= {"fraction": probe["fraction"], "scores": probe["scores"], "before": probe["before"]}
            out |= {"after": probe["after"], "probe_training": probe["training"]}
        elif self.counts is not None:
            out["before"] = self.counts.to_dict()
        return out


def plan_extension(
    model: MoExtendModel,
    options: ExtendOptions,
    probe: ProbeResult | None = None,
    stats_data: ExtendDataset | None = None,
    batch_size: int = 8,
    routing_tokens: str = "all",
) -> ExtensionPlan:
    """Layers (the probe's choice, all MoE layers or the given list) and the source experts of their new experts.

    Without a probe, the source experts are the most used on ``stats_data`` (counting ``routing_tokens``).
    """
    lm = model.lm
    moe = moe_layer_indices(lm)
    if options.layers == "extender":
        if probe is None:
            raise ConfigError(
                "layers = extender needs the probe's result",
                key="layers",
                hint="run the probe first (mmer extend probe), or give layers = all or a list",
            )
        layers, method = list(probe.selected), "extender"
    elif options.layers == "all":
        layers, method = moe, "all"
    else:
        layers, method = list(options.layers), "explicit"
    num_experts = {layer: block_shape(moe_block(lm, layer), layer).num_experts for layer in layers}
    counts, statistics = None, "fixed"
    if options.source_expert is None:
        if options.source == "tuned" or (options.source == "auto" and probe is not None):
            if probe is None:
                raise ConfigError(
                    "source = tuned needs the probe's κ′ statistics",
                    key="source",
                    hint="run the probe, or use source = base (or auto)",
                )
            counts, statistics = probe.after, "tuned"
        elif probe is not None:
            counts, statistics = probe.before, "base"
        else:
            if stats_data is None:
                raise ConfigError("choosing source experts needs data to count routing on", key="source")
            counts = count_routing(model, stats_data, batch_size, routing_tokens, "source-expert statistics")
            statistics = "base"
    sources = source_experts(counts, layers, options.experts_per_layer, num_experts, options.source_expert)
    return ExtensionPlan(sources, method, statistics, probe, counts if probe is None else None)


def finetune(
    model: MoExtendModel,
    data: ExtendDataset,
    plan: ExtensionPlan,
    recipe: MoExtendRecipe,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: ProgressSink | None = None,
) -> TrainReport:
    """Stages b″ and c: extend ``model`` in place as planned, then train only the new tensors (+ projector)."""
    options = recipe.extend
    extend_model(model, plan.sources, options, seed=recipe.finetune.seed)
    train_projector = options.train_projector and model.projector is not None
    trainable = set_trainable(model, "finetune", train_projector)
    expected = expected_new_parameter_count(model, train_projector)
    assert sum(p.numel() for p in trainable.values()) == expected, "trainable set differs from the new tensors"
    report = train(
        model,
        trainable,
        data,
        recipe.finetune,
        stage="finetune",
        aux_scale=options.aux_scale,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    return report


@dataclass
class MoExtendResult:
    """What a whole run produced: the trained model (in memory), its pack, and every stage's report."""

    model: MoExtendModel
    pack: Path
    plan: ExtensionPlan
    reports: dict[str, TrainReport]

    def to_dict(self) -> dict[str, Any]:
        return {
            "pack": str(self.pack),
            "layers": self.plan.layers,
            "sources": {str(k): v for k, v in self.plan.sources.items()},
            "reports": {k: v.to_dict() for k, v in self.reports.items()},
        }


def run_moextend(
    base_lm: nn.Module,
    data: ExtendDataset,
    output: str | Path,
    recipe: MoExtendRecipe | None = None,
    *,
    projector_model: MoExtendModel | None = None,
    probe: ProbeResult | None = None,
    stats_data: ExtendDataset | None = None,
    workdir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressSink | None = None,
) -> MoExtendResult:
    """All stages on ``base_lm`` (extended in place) → an extension pack at ``output``.

    Stage a runs when the data has features and no aligned ``projector_model`` is given; the probe runs when
    the layers are the Extender's and no ``probe`` result is given. ``workdir`` keeps each stage's resumable
    checkpoints (``align/``, ``probe/``, ``finetune/``).
    """
    recipe = recipe or MoExtendRecipe()
    progress = progress or NULL_PROGRESS
    check_output(output, overwrite)
    ensure_process_group()
    if not is_main_process():  # one process reports for all
        progress = NULL_PROGRESS
    reports: dict[str, TrainReport] = {}

    def stage_dir(name: str) -> Path | None:
        return None if workdir is None else Path(workdir) / name

    if projector_model is not None:
        model = projector_model
    elif data.has_features:
        model, reports["align"] = align(
            base_lm,
            data,
            projector_options=recipe.projector,
            options=recipe.align,
            checkpoint_dir=stage_dir("align"),
            resume=resume,
            progress=progress,
        )
    else:
        model = MoExtendModel(base_lm)
    if probe is None and recipe.extend.layers == "extender":
        probe = run_probe(
            model,
            data,
            recipe.probe,
            recipe.selection,
            stats_data=stats_data,
            checkpoint_dir=stage_dir("probe"),
            resume=resume,
            progress=progress,
        )
    counted = stats_data or data
    plan = plan_extension(
        model,
        recipe.extend,
        probe,
        counted.sample(recipe.selection.stats_samples, recipe.finetune.seed),
        recipe.finetune.batch_size,
        recipe.selection.routing_tokens,
    )
    progress.note(f"extending layers {plan.layers} (sources {plan.sources})")
    reports["finetune"] = finetune(
        model, data, plan, recipe, checkpoint_dir=stage_dir("finetune"), resume=resume, progress=progress
    )
    pack = Path(output)
    if is_main_process():  # every process holds the same model; one writes it
        pack = write_pack(
            model,
            output,
            modality=recipe.extend.modality,
            extend_options=recipe.extend,
            selection=plan.to_dict(),
            training={name: r.to_dict() for name, r in reports.items()},
            recipe=recipe.to_dict(),
            overwrite=overwrite,
        )
    barrier()
    return MoExtendResult(model, pack, plan, reports)
