"""Stage b, the Extender's probe: tune only the routers briefly, see which layers' routing moves, restore them.

The router-tuned model κ′ is only a measuring device (§1): the final model keeps κ's routers. Instead of a
throw-away copy of the whole model, the routers' weights (L × m × D, small) are saved, tuned in place, measured
and put back bit for bit, even when training fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmer.errors import ConfigError
from mmer.extend.data import ExtendData
from mmer.extend.extension import router_parameters, set_trainable
from mmer.extend.modality import MoExtendModel
from mmer.extend.options import ProbeOptions, TrainOptions
from mmer.extend.routing import RoutingCounts, collect_routing_counts
from mmer.extend.selection import layer_scores, select_layers
from mmer.extend.training import TrainReport, train
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
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


def run_probe(
    model: MoExtendModel,
    data: ExtendData,
    train_options: TrainOptions,
    options: ProbeOptions,
    *,
    stats_data: ExtendData | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: ProgressSink | None = None,
) -> ProbeResult:
    """Measure κ, tune the routers on the rest of the data for ``train_options.steps``, measure κ′, restore.

    Args:
        model: the aligned model κ (base LM + projector), not yet extended.
        data: S_t; when ``stats_data`` is not given, ``options.stats_fraction`` of it is held out as S_e.
        train_options: the router tuning (paper: 1,000 steps; code: lr 1e-3).
        options: p and the statistics split.
    """
    progress = progress or NULL_PROGRESS
    if stats_data is None:
        data, stats_data = data.split(options.stats_fraction, train_options.seed)
    batch = train_options.batch_size
    progress.note(f"probe: routing statistics of κ on {len(stats_data)} samples")
    before = collect_routing_counts(model, stats_data.in_order(batch, model_device(model)))
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
        after = collect_routing_counts(model, stats_data.in_order(batch, model_device(model)))
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
