"""How far one decoupled checkpoint is from another made from the same models (e.g. ``add`` with stand-ins vs the
exact re-merge): τ*, each mask, each rebuilt model and, with the originals, each one's reconstruction error."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmer.add.report import AddError
from mmer.checkpoint.decoupled import load_decoupled
from mmer.config import ModelSpec
from mmer.merge.error import error_l1, relative_error, tau_l1
from mmer.merge.masks import rebuild_weight
from mmer.plan import SourceModel, open_source


@dataclass
class GapReport:
    """How far one decoupled checkpoint is from another made from the same models (e.g. stand-in vs exact).

    ``tau_star_rel_l1`` is ‖τ*_b − τ*_a‖₁ / ‖τ*_a‖₁. Per modality: ``mask_agreement`` (share of equal mask bits
    over the merged parameters), the densities, ``rebuild_rel_l1`` = ‖θ̂ᵢ_b − θ̂ᵢ_a‖₁ / ‖τᵢ‖₁ and, when the
    original model is at hand, each checkpoint's own reconstruction error ‖θ̂ᵢ − θᵢ‖₁ / ‖τᵢ‖₁ (``error_a``,
    ``error_b``). Without the original, τᵢ in the denominators is a's reconstruction θ̂ᵢ_a − θ_base.
    """

    reference: str
    candidate: str
    tau_star_rel_l1: float
    modalities: dict[str, dict[str, float | None]]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def measure_gap(
    reference: str | Path, candidate: str | Path, originals: Mapping[str, str | Path] | None = None
) -> GapReport:
    """Compare ``candidate`` with ``reference`` (same base, same modalities) slot by slot.

    ``originals`` maps a modality to its fine-tuned model; by default each modality's manifest source is used
    when it is a local directory that still exists.
    """
    a, b = load_decoupled(reference), load_decoupled(candidate)
    opened: dict[str, SourceModel] = {}
    try:
        if a.is_single_model or b.is_single_model:
            raise AddError("measure_gap compares checkpoints with masks", hint="both must have τ* and masks")
        names = [n for n in a.modalities if n in b.manifest.modalities]
        for name in names:
            path = (originals or {}).get(name)
            if path is None and originals is None:
                src = a.modality(name).source
                path = src.model if src.commit is None and Path(src.model).is_dir() else None
            if path is not None:
                opened[name] = open_source(ModelSpec(str(path), modality=name))
        a_slots = {s.name for s in a.merged_slots}
        diff = norm = 0.0
        acc = {
            n: dict.fromkeys(("agree", "kept_a", "kept_b", "rebuild", "err_a", "err_b", "norm"), 0.0) for n in names
        }
        total = 0
        for slot in b.merged_slots:
            if slot.name not in a_slots:
                raise AddError(
                    f"{candidate}: slot {slot.name!r} is not merged in {reference}",
                    tensor=slot.name,
                    hint="compare two checkpoints of the same base and options",
                )
            base = a.base_tensor(slot.name).float()
            tau_a, tau_b = a.tau_star(slot.name), b.tau_star(slot.name)
            diff += float((tau_b.float() - tau_a.float()).abs().sum())
            norm += float(tau_a.float().abs().sum())
            numel = tau_a.numel()
            total += numel
            rows = base.shape[0] if base.dim() else None
            for name in names:
                ma, mb = a.mask(name, slot.name), b.mask(name, slot.name)
                r = acc[name]
                r["agree"] += numel - int((ma ^ mb).sum())
                r["kept_a"] += int(ma.sum())
                r["kept_b"] += int(mb.sum())
                ra = rebuild_weight(base, tau_a, ma, dtype=torch.float32, scale=a.modality(name).scale)
                rb = rebuild_weight(base, tau_b, mb, dtype=torch.float32, scale=b.modality(name).scale)
                r["rebuild"] += error_l1(rb, theta=ra)
                model = opened.get(name)
                if model is not None:
                    theta = model.reader.get(model.llm[slot.name].name).float()
                    theta = theta[:rows] if rows is not None and theta.dim() else theta
                    r["err_a"] += error_l1(ra, theta=theta)
                    r["err_b"] += error_l1(rb, theta=theta)
                    r["norm"] += tau_l1(theta=theta, base=base)
                else:
                    r["norm"] += tau_l1(theta=ra, base=base)
        out: dict[str, dict[str, float | None]] = {}
        for name in names:
            r = acc[name]
            known = name in opened
            out[name] = {
                "mask_agreement": r["agree"] / total if total else 1.0,
                "density_a": r["kept_a"] / total if total else 0.0,
                "density_b": r["kept_b"] / total if total else 0.0,
                "rebuild_rel_l1": relative_error(r["rebuild"], r["norm"]),
                "error_a": relative_error(r["err_a"], r["norm"]) if known else None,
                "error_b": relative_error(r["err_b"], r["norm"]) if known else None,
            }
        return GapReport(str(reference), str(candidate), diff / norm if norm else 0.0, out)
    finally:
        a.close()
        b.close()
        for m in opened.values():
            m.reader.close()
