"""Run several merge variants over the same inputs and measure how far each modality's model moves.

For every variant (method, DARE, mask rule) and modality: the relative ℓ1 reconstruction error
‖θ̂ᵢ − θᵢ‖₁ / ‖τᵢ‖₁ over the merged LLM tensors (0 = the fine-tuned LLM is rebuilt exactly; 1 = as far as
the base itself), and the mask density. θ̂ᵢ is rebuilt in the base's dtype exactly as a written checkpoint
would give it, and the difference is taken in float32 as (θ̂ᵢ − θ_base) − τᵢ.

Reads are shared: the task vectors of a slot are read once for all variants. Passes: two for the global trim
thresholds (all variants at once, see ``merge.trim``), one for EMR's rescalers when an EMR variant is asked
for (the rescaler is a whole-model ratio, needed before any error can be measured), one for the sign census when a
TIES variant gives zero sums the majority sign (``zero_sign: majority``), and one for the errors.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mmer.config import MergeOptions, Recipe
from mmer.engine import count_majority, find_thresholds, read_slot, tau_dtype
from mmer.engine.trim_warnings import trim_warnings
from mmer.errors import ConfigError
from mmer.io.report_files import save_figure
from mmer.merge.error import error_l1, relative_error, tau_l1
from mmer.merge.masks import MASK_OPTIONS, rebuild_weight
from mmer.merge.methods import METHOD_OPTIONS
from mmer.merge.slot import Variant, merge_slot
from mmer.plan import build_plan, check_registries, resolve_variant
from mmer.progress import NULL_PROGRESS, ProgressSink
from mmer.runtime import peak_rss_bytes

# The MMER paper's comparison (Tables 1-2): NaiveMC, TA, TIES, each with DARE, then the mask methods, then Table 5's
# ablations of MMER's mask (each of Eq. 3's two tests alone, on the same TIES τ*).
PAPER_VARIANTS = (
    "average/none",
    "task_arithmetic/none",
    "ties/none",
    "average+dare/none",
    "task_arithmetic+dare/none",
    "ties+dare/none",
    "task_arithmetic/tall",
    "emr/emr",
    "ties/mmer",
    "ties/sign_only",
    "ties/magnitude_only",
)
# Options the recipe and flags set for every variant at once: each applies to some variants, not to all. DARE is
# set per variant (``+dare``) and weights belong to the models, so those must apply to every variant.
SHARED_OPTIONS = frozenset(METHOD_OPTIONS + MASK_OPTIONS) - {"dare", "weights"}
DEFAULT_DARE = 0.5  # the paper does not give its DARE drop rate; 0.5 is DARE's own common setting

_VARIANT = re.compile(r"^(?P<method>[a-z_]+)(?P<dare>\+dare(?:=(?P<p>[0-9.]+))?)?(?:/(?P<mask>[a-z_]+))?$")


def parse_variant(text: str, options: MergeOptions) -> MergeOptions:
    """``METHOD[+dare[=P]][/MASK]`` on top of ``options``, e.g. ``ties+dare=0.3/none`` or ``ties/mmer``."""
    m = _VARIANT.match(text.strip())
    if not m:
        raise ConfigError(
            f"variant {text!r} is not METHOD[+dare[=P]][/MASK]",
            key="variant",
            hint="e.g. ties/mmer or average+dare/none",
        )
    dare = 0.0
    if m.group("dare"):
        dare = float(m.group("p")) if m.group("p") else (options.dare or DEFAULT_DARE)
    try:
        return replace(options, method=m.group("method"), mask=m.group("mask") or options.mask, dare=dare)
    except ConfigError as err:
        err.key = "variant"
        raise


@dataclass
class VariantResult:
    """One variant's outcome for every modality."""

    label: str
    rel_l1: dict[str, float]
    density: dict[str, float]
    scale: dict[str, float]
    recorded: dict[str, Any] = field(default_factory=dict)  # what the merge counted (zero_sign majority's census)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.label,
            "modalities": {
                m: {"rel_l1": self.rel_l1[m], "density": self.density[m], "scale": self.scale[m]} for m in self.rel_l1
            },
            **self.recorded,
        }


@dataclass
class CompareReport:
    modalities: list[str]
    results: list[VariantResult] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modalities": self.modalities,
            "variants": [r.to_dict() for r in self.results],
            "seconds": self.seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "warnings": self.warnings,
        }


def run_compare(
    recipe: Recipe, variants: list[str] | tuple[str, ...] = PAPER_VARIANTS, progress: ProgressSink | None = None
) -> CompareReport:
    """Measure every variant on ``recipe``'s models (the recipe's options are the base every variant edits)."""
    progress = progress or NULL_PROGRESS
    started = time.perf_counter()
    if not variants:
        raise ConfigError("no variants to compare", key="variant", hint=f"e.g. {', '.join(PAPER_VARIANTS[:3])}")
    recipes = []
    for text in variants:
        r = replace(recipe, options=parse_variant(text, recipe.options))
        check_registries(r, shared=SHARED_OPTIONS)
        recipes.append(r)
    plan = build_plan(recipe, shared=SHARED_OPTIONS)
    resolved: list[Variant] = [resolve_variant(r) for r in recipes]
    labels = [m.label for m in plan.models]
    device = torch.device(recipe.options.device)
    with plan:
        thresholds = find_thresholds(plan, resolved, progress)
        resolved = count_majority(plan, resolved, thresholds, progress)

        def slot_result(variant: Variant, name: str, raw: list[torch.Tensor], dtype: torch.dtype):
            key = thresholds.get(variant.threshold_key) if variant.needs_global_threshold else None
            return merge_slot(raw, variant, name, dtype, key)

        scales = {i: dict.fromkeys(labels, 1.0) for i in range(len(resolved))}
        rescaled = [i for i, v in enumerate(resolved) if v.rule.rescaled]
        slots = plan.merged_slots
        total = sum(s.nbytes for s in slots) * (1 + len(labels))
        if rescaled:
            num = {i: [0.0] * len(labels) for i in rescaled}
            den = {i: [0.0] * len(labels) for i in rescaled}
            progress.start("rescalers", total)
            for slot in slots:
                _, raw = read_slot(plan, slot.name, device)
                for i in rescaled:
                    result = slot_result(resolved[i], slot.name, raw, tau_dtype(plan, slot.dtype))
                    for j in range(len(labels)):
                        num[i][j] += result.scale_num[j]
                        den[i][j] += result.scale_den[j]
                progress.advance("rescalers", slot.nbytes * (1 + len(labels)))
            progress.end("rescalers")
            for i in rescaled:
                scales[i] = {label: num[i][j] / den[i][j] if den[i][j] else 1.0 for j, label in enumerate(labels)}

        error = {i: dict.fromkeys(labels, 0.0) for i in range(len(resolved))}
        kept = {i: dict.fromkeys(labels, 0) for i in range(len(resolved))}
        norm = dict.fromkeys(labels, 0.0)
        progress.start("compare", total)
        for slot in slots:
            base, raw = read_slot(plan, slot.name, device)
            base_dev = base.to(device)
            for j, label in enumerate(labels):
                norm[label] += tau_l1(raw[j])
            for i, variant in enumerate(resolved):
                result = slot_result(variant, slot.name, raw, tau_dtype(plan, slot.dtype))
                for j, label in enumerate(labels):
                    mask = None if result.masks is None else result.masks[j]
                    rebuilt = rebuild_weight(base_dev, result.stored, mask, scale=scales[i][label])
                    error[i][label] += error_l1(rebuilt, base=base_dev, tau=raw[j])
                    kept[i][label] += slot.numel if mask is None else int(mask.sum())
            progress.advance("compare", slot.nbytes * (1 + len(labels)))
            del base, base_dev, raw
        progress.end("compare")
    report = CompareReport(labels, warnings=list(plan.warnings))
    trims = sorted({v.threshold_key for v in resolved if v.needs_global_threshold and v.dare == 0})
    for key in trims or [(recipe.options.k,)]:  # a zero task vector is said once, trimmed or not
        own_k = key[4] if len(key) > 4 and key[4] else key[0]  # each model's own K (Variant.threshold_key)
        found = trim_warnings(labels, thresholds[key] if trims else None, own_k, norm)
        report.warnings += [w for w in found if w not in report.warnings]
    for i, variant in enumerate(resolved):
        report.results.append(
            VariantResult(
                variant.label,
                {label: relative_error(error[i][label], norm[label]) for label in labels},
                {label: kept[i][label] / plan.merged_numel if plan.merged_numel else 0.0 for label in labels},
                scales[i],
                variant.recorded(),
            )
        )
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def write_bar_chart(report: CompareReport, png: str | Path) -> Path:
    """Grouped bars: reconstruction error (left) and mask density (right), one bar per modality per variant."""
    from mmer.inspect import _pyplot

    plt = _pyplot()
    import numpy as np

    labels = [r.label for r in report.results]
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(report.modalities))
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.3 * len(labels) + 3), 4.2), constrained_layout=True)
    for panel, (title, key) in zip(
        axes,
        (("relative ℓ1 error ‖θ̂ᵢ − θᵢ‖₁ / ‖τᵢ‖₁ (lower is better)", "rel_l1"), ("mask density", "density")),
        strict=True,
    ):
        for j, modality in enumerate(report.modalities):
            values = [getattr(r, key)[modality] for r in report.results]
            panel.bar(x + (j - (len(report.modalities) - 1) / 2) * width, values, width, label=modality)
        panel.set_title(title, fontsize=9)
        panel.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    axes[0].legend(fontsize=8)
    try:
        return save_figure(fig, png, dpi=130)
    finally:
        plt.close(fig)
