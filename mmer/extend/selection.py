"""The Extender's choice (Eq. 4-8): which layers get new experts, and which expert each new one copies.

For each MoE layer j, r̄_j is the normalised top-k selection count of every expert on the statistics set, once
for κ (after alignment) and once for κ′ (after router-only tuning). The layer's score is the standard deviation
over experts of their difference, d_j = std_i(r̄^κ_ij − r̄^κ′_ij): a layer whose routing hardly moves when the
routers may adapt to the new modality does not need a new expert. The top ⌊p·L⌋ layers by d_j are extended
(L = the MoE layers; Qwen2-MoE's dense layers are never scored), ties going to the lower layer index.

The new expert copies the layer's most-used expert under κ′ (the code and the paper's introduction; Eq. 8's κ
superscript reads as a typo, kept as the ``source = "base"`` option).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from mmer.errors import ConfigError
from mmer.extend.routing import RoutingCounts


def layer_scores(before: RoutingCounts, after: RoutingCounts, ddof: int = 1) -> dict[int, float]:
    """d_j = std over experts of (r̄^κ_j − r̄^κ′_j), per MoE layer (Eq. 6)."""
    dist_before, dist_after = before.distribution(), after.distribution()
    if set(dist_before) != set(dist_after):
        raise ValueError(f"the two statistics cover different layers: {sorted(dist_before)} vs {sorted(dist_after)}")
    scores = {}
    for layer in sorted(dist_before):
        diff = dist_before[layer] - dist_after[layer]
        scores[layer] = float(torch.std(diff, correction=ddof)) if diff.numel() > ddof else 0.0
    return scores


def select_layers(scores: Mapping[int, float], fraction: float) -> list[int]:
    """The top ⌊p·L⌋ layers by score (at least one), ties to the lower index, returned in layer order."""
    n = max(1, math.floor(fraction * len(scores)))
    ranked = sorted(scores, key=lambda layer: (-scores[layer], layer))
    return sorted(ranked[:n])


def source_experts(
    counts: RoutingCounts | None,
    layers: Sequence[int],
    n_new: int,
    num_experts: Mapping[int, int],
    fixed: int | None = None,
) -> dict[int, list[int]]:
    """For every chosen layer, the experts the ``n_new`` new ones copy: the most used, or a ``fixed`` one."""
    out: dict[int, list[int]] = {}
    for layer in layers:
        m = num_experts[layer]
        if fixed is not None:
            if fixed >= m:
                raise ConfigError(
                    f"source_expert = {fixed}, but layer {layer} has only {m} experts (0-{m - 1})",
                    key="source_expert",
                    hint="choose an expert index every chosen layer has",
                )
            out[layer] = [fixed] * n_new
            continue
        if n_new > m:
            raise ConfigError(
                f"experts_per_layer = {n_new} new experts would copy {n_new} distinct experts, but layer {layer} "
                f"has {m}",
                key="experts_per_layer",
                hint=f"use at most {m} new experts per layer",
            )
        if counts is None or layer not in counts.counts:
            raise ValueError(f"no routing statistics for layer {layer}")
        out[layer] = counts.most_used(layer, n_new)
    return out
