"""The streaming pass tune runs itself: thresholds for every K, then each point's τ* (a point is a (K, α) pair)
merged once (or the checkpoint's read), written to scratch when candidates need it, and ``recon`` scored for
every candidate as the slots go by, since its cost is the reads every candidate shares.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mmer.engine import count_majority, find_thresholds, read_slot, tau_dtype
from mmer.engine.trim_warnings import trim_warnings
from mmer.io.reader import CheckpointReader
from mmer.io.writer import PlannedTensor, ShardedWriter
from mmer.merge.error import error_l1, relative_error, tau_l1
from mmer.merge.masks import MASKS, rebuild_weight
from mmer.merge.slot import mask_source, merge_slot
from mmer.plan import MergePlan, resolve_variant
from mmer.progress import ProgressSink
from mmer.tune.candidates import CandidateInputs, Point
from mmer.tune.scores import Scorer


@dataclass
class Sweep:
    inputs: dict[tuple[str, Point], CandidateInputs]
    recon: list[dict[str, Any]]
    warnings: list[str]
    untrimmed: bool  # some model's global trim threshold was 0 at some K < 1: that K trimmed nothing


def sweep(
    plan: MergePlan,
    points: list[Point],
    lambdas: list[float],
    tuned: list[str],
    scorer: Scorer,
    reuse: tuple[str, Point] | None,
    scratch: Path,
    progress: ProgressSink,
) -> Sweep:
    """Global thresholds for every K (two shared passes), then one shared pass that merges each point's τ* (or
    reads the checkpoint's), writes it to ``scratch`` when candidates need it, and scores ``recon`` for every
    candidate. Nothing runs that the score does not need; points that share a K share its thresholds."""
    options = plan.recipe.options
    device = torch.device(options.device)
    variants = {
        (k, a): resolve_variant(replace(plan.recipe, options=replace(options, k=k, alpha=a))) for k, a in points
    }
    thresholds = find_thresholds(plan, list(variants.values()), progress)
    variants = dict(zip(variants, count_majority(plan, list(variants.values()), thresholds, progress), strict=True))
    per_model = {p: thresholds.get(v.threshold_key) if v.needs_global_threshold else None for p, v in variants.items()}
    reuse_point = reuse[1] if reuse is not None and reuse[1] in points else None
    tau_dirs = {reuse_point: reuse[0]} if reuse_point is not None else {}  # type: ignore[index]
    to_write = [p for p in points if p != reuse_point] if scorer.per_candidate else []
    recon = not scorer.per_candidate
    labels = [m.label for m in plan.models]
    merged = plan.merged_slots
    rule = MASKS[options.mask]
    error = {(m, p, lam): 0.0 for m in tuned for p in points for lam in lambdas}
    kept = dict.fromkeys(error, 0)
    norm = dict.fromkeys(tuned, 0.0)
    if to_write or recon:
        writers = {}
        for point in to_write:
            directory = scratch / f"tau_star_k{point[0]:g}_a{point[1]:g}"
            directory.mkdir()
            writers[point] = ShardedWriter(
                directory,
                [PlannedTensor(s.name, tau_dtype(plan, s.dtype), s.shape) for s in merged],
                options.shard_size,
                metadata={"format": "mmer-tau-star/1"},
            )
            tau_dirs[point] = str(directory)
        stored_reader = CheckpointReader(reuse[0]) if reuse_point is not None else None  # type: ignore[index]
        stage = "tune: τ* per (K, α)" + (" + recon" if recon else "")
        progress.start(stage, sum(s.nbytes for s in merged) * (1 + len(labels)))
        try:
            for slot in merged:
                base, raw = read_slot(plan, slot.name, device)
                base_dev = base.to(device)
                for point in points:
                    variant = variants[point]
                    if point == reuse_point:
                        stored = stored_reader.get(slot.name).to(device)  # type: ignore[union-attr]
                    else:
                        dtype = tau_dtype(plan, slot.dtype)
                        stored = merge_slot(raw, variant, slot.name, dtype, per_model[point]).stored
                    if point in writers:
                        writers[point].write(slot.name, stored)
                    if not recon:
                        continue
                    effective = stored.float()
                    for i, label in enumerate(labels):
                        if label not in tuned:
                            continue
                        threshold = per_model[point][i] if per_model[point] else None
                        src = mask_source(raw[i], variant, i, slot.name, threshold)
                        for lam in lambdas:
                            mask = rule.fn(src, effective, lam)
                            rebuilt = rebuild_weight(base_dev, stored, mask)
                            error[(label, point, lam)] += error_l1(rebuilt, base=base_dev, tau=raw[i])
                            kept[(label, point, lam)] += int(mask.sum())
                for i, label in enumerate(labels):
                    if label in tuned:
                        norm[label] += tau_l1(raw[i])
                progress.advance(stage, slot.nbytes * (1 + len(labels)))
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        finally:
            progress.end(stage)
            if stored_reader is not None:
                stored_reader.close()
    inputs = {}
    for i, m in enumerate(plan.models):
        if m.label not in tuned:
            continue
        for point in points:
            if point not in tau_dirs:
                continue
            inputs[(m.label, point)] = CandidateInputs(
                base_dir=str(plan.base.path),
                model_dir=str(m.path),
                modality=m.label,
                index=i,
                tau_dir=tau_dirs[point],
                threshold=per_model[point][i] if per_model[point] else None,
                variant=variants[point],
                slots=tuple(plan.slots),
                private=tuple(plan.private[m.label]),
                device=options.device,
            )
    results = []
    if recon:
        total = plan.merged_numel
        for (m, point, lam), err in error.items():
            rel = relative_error(err, norm[m])
            results.append(
                {
                    "modality": m,
                    "k": point[0],
                    "alpha": point[1],
                    "lambda": lam,
                    "score": -rel,
                    "seconds": 0.0,
                    "details": {"rel_l1": rel, "density": kept[(m, point, lam)] / total if total else 0.0},
                }
            )
    warnings = []
    ks = sorted({k for k, _ in points})
    first = {k: next(p for p in points if p[0] == k) for k in ks}  # thresholds depend on K alone
    for k in ks:  # the trim warnings a merge at each K would give (DARE's own zeros are not the models')
        context = f"K={k:g}: " if len(ks) > 1 else ""
        trimmed = per_model[first[k]] if variants[first[k]].dare == 0 else None
        found = trim_warnings(labels, trimmed, k, norm if recon else None, context)
        warnings += [w for w in found if w not in warnings]  # an all-zero τᵢ is said once, not per K
    untrimmed = any(k < 1 and per_model[first[k]] and 0.0 in per_model[first[k]] for k in ks)
    return Sweep(inputs, results, warnings, untrimmed)
