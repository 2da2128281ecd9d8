"""Specifies :func:`mmer.merge.slot.mask_source`: one model's τᵢ as its mask sees it, the same rule
:func:`mmer.merge.slot.merge_slot` applies to all models at once (``tune`` rebuilds one modality at a time)."""

from __future__ import annotations

import pytest
import torch

from mmer.merge.masks import MASKS
from mmer.merge.slot import Variant, mask_source, merge_slot
from mmer.merge.trim import tensor_threshold


def _variant(**overrides: object) -> Variant:
    fields: dict[str, object] = {
        "method": "ties",
        "mask": "mmer",
        "k": 0.5,
        "alpha": 1.0,
        "trim_scope": "per-tensor",
        "trim_count": "reference",
        "zero_sign": "zero",
        "elect_on": "raw",
        "aggregate": "mean",
        "mask_source": "trimmed",
        "dare": 0.0,
        "dare_seed": 0,
        "lambdas": (0.6, 1.2, 0.9),
        "weights": None,
    }
    fields.update(overrides)
    return Variant(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"trim_scope": "global"},
        {"dare": 0.5, "dare_seed": 7},
        {"dare": 0.5, "dare_seed": 7, "trim_scope": "global"},
        {"mask_source": "raw"},
        {"k": 1.0},
    ],
    ids=["per-tensor trim", "global trim", "DARE then trim", "DARE then global trim", "raw source", "no trim"],
)
def test_each_models_mask_from_its_own_mask_source_is_the_mask_merge_slot_makes(overrides):
    g = torch.Generator().manual_seed(3)
    raw = [torch.randn(6, 5, generator=g) for _ in range(3)]
    variant = _variant(**overrides)
    # any per-model threshold will do: one taken from the tensor itself stands in for the global pass
    thresholds = [float(tensor_threshold(t, variant.k)) if variant.needs_global_threshold else None for t in raw]
    merged = merge_slot(raw, variant, "layer.weight", torch.float32, thresholds)
    for i, tau in enumerate(raw):
        source = mask_source(tau, variant, i, "layer.weight", thresholds[i])
        mask = MASKS[variant.mask].fn(source, merged.stored.float(), variant.lambdas[i])
        assert torch.equal(mask, merged.masks[i])  # type: ignore[index]
