"""Stage b, the Extender's probe: tune only the routers briefly, see which layers' routing moves, restore them.

The router-tuned model κ′ is only a measuring device (§1): the final model keeps κ's routers. Instead of a
throw-away copy of the whole model, the routers' weights (L × m × D, small) are saved, tuned in place, measured
and put back bit for bit, even when training fails.

The statistics set S_e has a fixed size (the paper's 10k samples, capped for small data, docs/moextend.md §2)
and the counts cover every real token or, as the authors' code counts them, the prompt's only. On several
processes each counts its share of S_e and the integer counts are summed, so all choose the same layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmer.errors import ConfigError
from mmer.extend.block import ExtendedMoeBlock
from mmer.extend.data import ExtendDataset
from mmer.extend.distributed import all_reduce_sum, barrier, ensure_process_group, is_main_process, rank_and_world
from mmer.extend.extension import router_parameters, set_trainable
from mmer.extend.families import block_shape, decoder_layers
from mmer.extend.losses import IGNORE_INDEX
from mmer.extend.modality import MoExtendModel
from mmer.extend.options import ProbeOptions, TrainOptions
from mmer.extend.routing import RoutingCounts, collect_routing_counts, layer_top_k
from mmer.extend.selection import layer_scores, select_layers
from mmer.extend.training import TrainReport, make_accelerator, train
from mmer.io.jsonfile import read_json_file
from mmer.progress import NULL_PROGRESS, ProgressSink

PROBE_FORMAT = "mmer-moextend-probe/1"


@dataclass
class ProbeResult:
    """Routing statistics before (κ) and after (κ′) router tuning, the layer scores d_j and the chosen layers."""

    before: RoutingCounts
    after: RoutingCounts
    scores: dict[int, float]
    selected: list[int]
    fraction: float
    report: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROBE_FORMAT,
            "fraction": self.fraction,
            "selected": self.selected,
            "scores": {str(k): v for k, v in sorted(self.scores.items())},
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "training": self.report,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], file: str | None = None) -> ProbeResult:
        if not isinstance(data, dict) or data.get("format") != PROBE_FORMAT:
            raise ConfigError(
                f"{file or 'probe result'}: not an mmer probe result (format {PROBE_FORMAT!r} expected)",
                file=file,
                key="format",
                hint="write it with `mmer extend probe`",
            )
        try:
            return cls(
                RoutingCounts.from_dict(data["before"]),
                RoutingCounts.from_dict(data["after"]),
                {int(k): float(v) for k, v in data["scores"].items()},
                [int(i) for i in data["selected"]],
                float(data["fraction"]),
                data.get("training"),
            )
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
            raise ConfigError(
                f"{file or 'probe result'}: not a valid probe result ({type(err).__name__}: {str(err)[:120]})",
                file=file,
                hint="write it again with `mmer extend probe`",
            ) from None

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (on the main process only; the others wait until it is there)."""
        path = Path(path)
        if is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
            tmp.replace(path)
        barrier()
        return path

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such probe result", file=str(path), hint="check the --probe path")
        data = read_json_file(path, what="probe result", hint="pass what `mmer extend probe` wrote")
        return cls.from_dict(data, str(path))


def model_device(model: MoExtendModel) -> torch.device:
    return next(model.parameters()).device


def counted_tokens(batch: dict[str, torch.Tensor], tokens: str) -> dict[str, torch.Tensor]:
    """``batch`` with ``routing_mask`` set to the tokens the statistics count (``all`` or the ``prompt``'s)."""
    mask = batch.get("routing_mask", batch["attention_mask"]).bool()
    if tokens == "prompt":
        mask = mask & batch["attention_mask"].bool() & (batch["labels"] == IGNORE_INDEX)
    return batch | {"routing_mask": mask.long()}


def _expert_counts(lm: torch.nn.Module) -> dict[int, int]:
    """Experts per MoE layer (new ones included), for zero counts on a process with no share of S_e."""
    layers = decoder_layers(lm)
    return {
        i: layers[i].mlp.num_experts
        if isinstance(layers[i].mlp, ExtendedMoeBlock)
        else block_shape(layers[i].mlp, i).num_experts
        for i in layer_top_k(lm)
    }


def count_routing(
    model: MoExtendModel, data: ExtendDataset, batch_size: int, tokens: str = "all", what: str = "statistics"
) -> RoutingCounts:
    """Top-k selection counts of every MoE layer over ``data`` (this process's share, summed over processes).

    Raises a ConfigError when no token was counted (e.g. ``prompt`` on data where every token has a label).
    """
    ensure_process_group()
    rank, world = rank_and_world()
    batches = (counted_tokens(b, tokens) for b in data.in_order(batch_size, model_device(model), rank, world))
    counts = collect_routing_counts(model, batches)
    if world > 1:
        widths = _expert_counts(model.lm)
        local = [counts.counts.get(layer, torch.zeros(w, dtype=torch.float64)) for layer, w in widths.items()]
        summed = all_reduce_sum(torch.cat([torch.tensor([float(counts.tokens)], dtype=torch.float64), *local]))
        parts = summed[1:].split(list(widths.values()))
        counts = RoutingCounts(dict(zip(widths, parts, strict=True)), int(summed[0]))
    if counts.tokens == 0:
        raise ConfigError(
            f"{data.source}: the {what} counted no token (routing_tokens = {tokens})",
            file=data.source,
            key="routing_tokens",
            hint="use routing_tokens = all, or give the prompt tokens label -100 in the data"
            if tokens == "prompt"
            else "the statistics set needs real (attention_mask = 1) tokens",
        )
    return counts


def statistics_set(
    data: ExtendDataset, stats_data: ExtendDataset | None, options: ProbeOptions, seed: int
) -> tuple[ExtendDataset, ExtendDataset]:
    """(training data S_t, statistics set S_e): S_e is ``stats_samples`` of ``stats_data``, or held out of ``data``."""
    if stats_data is None:
        return data.split(options.stats_fraction, seed, options.stats_samples)
    return data, stats_data.sample(options.stats_samples, seed)


def run_probe(
    model: MoExtendModel,
    data: ExtendDataset,
    train_options: TrainOptions,
    options: ProbeOptions,
    *,
    stats_data: ExtendDataset | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: ProgressSink | None = None,
) -> ProbeResult:
    """Measure κ, tune the routers on the rest of the data for ``train_options.steps``, measure κ′, restore.

    Args:
        model: the aligned model κ (base LM + projector), not yet extended.
        data: S_t; when ``stats_data`` is not given, S_e is held out of it (``options.stats_samples``, at most
            ``options.stats_fraction`` of it).
        train_options: the router tuning (paper: 1,000 steps; code: lr 1e-3).
        options: p, the statistics set and which tokens it counts.
    """
    progress = progress or NULL_PROGRESS
    data, stats_data = statistics_set(data, stats_data, options, train_options.seed)
    batch = train_options.batch_size
    model.to(make_accelerator(train_options).device)  # S_e is counted where the probe trains
    if not is_main_process():  # one process reports for all
        progress = NULL_PROGRESS
    tokens = options.routing_tokens
    progress.note(f"probe: routing statistics of κ on {len(stats_data)} samples ({tokens} tokens)")
    before = count_routing(model, stats_data, batch, tokens, "statistics set S_e")
    routers = router_parameters(model)
    saved = {name: p.detach().clone() for name, p in routers.items()}
    try:
        trainable = set_trainable(model, "probe")
        report: TrainReport = train(
            model,
            trainable,
            data,
            train_options,
            stage="probe",
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=progress,
        )
        progress.note(f"probe: routing statistics of κ′ on {len(stats_data)} samples")
        after = count_routing(model, stats_data, batch, tokens, "statistics set S_e")
    finally:
        with torch.no_grad():
            for name, p in routers.items():
                p.copy_(saved[name].to(p.device))
        for p in model.parameters():
            p.requires_grad_(False)
    scores = layer_scores(before, after, options.ddof)
    return ProbeResult(
        before, after, scores, select_layers(scores, options.fraction), options.fraction, report.to_dict()
    )
