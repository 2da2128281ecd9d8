"""The fused kernel reproduces the eager engine bit for bit wherever it claims to apply.

``merge.one_pass`` is only an accelerator: ``merge_slot`` defines the result. Every case here builds bf16 inputs,
runs both, and compares τ* as stored, every packed mask byte, the kept counts and (to float tolerance) Σ|τᵢ|.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmer.checkpoint import bits
from mmer.merge import one_pass
from mmer.merge.methods import SignCensus
from mmer.merge.slot import Variant, count_signs, merge_slot
from mmer.merge.trim import rank_to_threshold

pytest.importorskip("numba")


def variant(**overrides) -> Variant:
    fields = dict(
        method="ties",
        mask="mmer",
        k=0.8,
        alpha=1.0,
        trim_scope="global",
        trim_count="reference",
        zero_sign="zero",
        elect_on="raw",
        aggregate="mean",
        mask_source="trimmed",
        dare=0.0,
        dare_seed=0,
        lambdas=(0.9, 0.9, 0.9),
    )
    fields.update(overrides)
    return Variant(**fields)


def inputs(
    kind: str, numel: int, n: int = 3, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=g) * 0.05).to(dtype)
    thetas = []
    for i in range(n):
        if kind == "gaussian":
            delta = torch.randn(numel, generator=g) * 1e-3
        elif kind == "quantised":  # few distinct deltas: many ties, many exact zeros, opposite signs
            delta = torch.randint(-2, 3, (numel,), generator=g).float() * 2.0**-9
        elif kind == "sparse":  # most entries untouched, as in real full fine-tunes
            delta = torch.randn(numel, generator=g) * 1e-2 * (torch.rand(numel, generator=g) < 0.1)
        elif kind == "extreme":  # huge and tiny magnitudes, subnormal-sized deltas
            delta = torch.randn(numel, generator=g) * 10.0 ** torch.randint(-30, 3, (numel,), generator=g).float()
        else:
            raise ValueError(kind)
        theta = (base.float() + delta).to(dtype)
        if i == n - 1:
            theta[: numel // 7] = base[: numel // 7]  # a stretch where one model did not move at all
        thetas.append(theta)
    return base, thetas


def global_thresholds(base, thetas, k, count="reference"):
    out = []
    for theta in thetas:
        mags = (theta.float() - base.float()).abs()
        rank = rank_to_threshold(mags.numel(), k, count)
        out.append(None if rank == 0 else float(mags.kthvalue(rank).values))
    return out


def eager(base, thetas, v, thresholds, store_dtype):
    taus = torch.stack([t.float() - base.float() for t in thetas])
    result = merge_slot(taus, v, "w", store_dtype, thresholds if v.uses_trim else None)
    return result.stored, [bits.pack(m) for m in result.masks], [int(m.sum()) for m in result.masks], taus


CASES = [
    ("gaussian", {}),
    ("quantised", {}),
    ("sparse", {}),
    ("extreme", {}),
    ("quantised", {"zero_sign": "positive"}),
    ("gaussian", {"k": 1.0}),
    ("gaussian", {"k": 0.3, "lambdas": (0.0, 1.0, 1.7)}),
    ("sparse", {"alpha": 0.7, "lambdas": (0.5, None, 1.2)}),
    ("quantised", {"k": 0.6, "trim_count": "exact"}),
    # zero_sign majority, once counted: quantised deltas make many exact Σ = 0 among non-zero τᵢ
    ("quantised", {"zero_sign": "majority", "census": SignCensus(positive=1, negative=9)}),
    ("quantised", {"zero_sign": "majority", "census": SignCensus(positive=9, negative=1), "k": 1.0}),
    # Table 5's ablations: each half of MMER's mask
    ("quantised", {"mask": "sign_only"}),
    ("gaussian", {"mask": "magnitude_only", "lambdas": (0.0, 0.9, 1.7)}),
    ("extreme", {"mask": "magnitude_only"}),
    ("extreme", {"mask": "sign_only", "k": 1.0}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("store_native", [True, False], ids=["tau-native", "tau-f32"])
@pytest.mark.parametrize("numel", [13, 8 * one_pass.BLOCK + 5], ids=["tiny-ragged", "multi-block"])
@pytest.mark.parametrize(
    "kind,overrides", CASES, ids=[f"{k}-{'-'.join(map(str, o.values())) or 'default'}" for k, o in CASES]
)
def test_the_fused_kernel_equals_the_eager_engine_bit_for_bit(kind, overrides, numel, dtype, store_native):
    v = variant(**overrides)
    store_dtype = dtype if store_native else torch.float32
    base, thetas = inputs(kind, numel, dtype=dtype)
    thresholds = global_thresholds(base, thetas, v.k, v.trim_count) if v.uses_trim else None
    assert one_pass.supports(v, [base.dtype] * 4, store_dtype, torch.device("cpu"))
    stored, packed, ones, taus = eager(base, thetas, v, thresholds, store_dtype)
    got = one_pass.merge_chunk(base, thetas, v, thresholds, store_dtype)
    assert got.stored.dtype == stored.dtype
    assert torch.equal(got.stored.view(torch.uint8), stored.reshape(-1).contiguous().view(torch.uint8))
    for mine, theirs in zip(got.packed, packed, strict=True):
        assert torch.equal(mine, theirs)
    assert got.ones == ones
    expected_l1 = [float(t.abs().double().sum()) for t in taus]
    assert got.l1 == pytest.approx(expected_l1, rel=1e-9)


def test_the_majority_rule_changes_the_merge_on_tied_inputs() -> None:
    """Not vacuous: on the quantised inputs the two majorities give different τ* and masks."""
    base, thetas = inputs("quantised", 4096)
    results = [
        one_pass.merge_chunk(base, thetas, variant(zero_sign="majority", census=c), None, torch.bfloat16)
        for c in (SignCensus(1, 9), SignCensus(9, 1))
    ]
    assert not torch.equal(results[0].stored.view(torch.int16), results[1].stored.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["gaussian", "quantised", "sparse", "extreme"])
@pytest.mark.parametrize("k", [0.8, 0.3, 1.0])
@pytest.mark.parametrize("numel", [13, 3 * one_pass.BLOCK + 9], ids=["tiny-ragged", "multi-block"])
def test_the_sign_census_kernel_counts_what_the_eager_engine_elects(kind, k, numel, dtype):
    v = variant(zero_sign="majority", k=k)
    base, thetas = inputs(kind, numel, seed=3, dtype=dtype)
    thresholds = global_thresholds(base, thetas, k) if v.uses_trim else None
    taus = torch.stack([t.float() - base.float() for t in thetas])
    assert one_pass.counts_signs(v)
    got, l1 = one_pass.census_chunk(base, thetas, thresholds)
    assert got == count_signs(taus, v, "w", thresholds)
    assert got.positive + got.negative > 0
    assert l1 == pytest.approx([float(t.abs().double().sum()) for t in taus], rel=1e-9)


@pytest.mark.parametrize(
    "change",
    [{"dare": 0.1}, {"trim_scope": "per-tensor"}, {"weights": (1.0, 2.0, 1.0), "elect_on": "weighted"}],
)
def test_the_census_kernel_leaves_dare_per_tensor_trims_and_weighted_elections_to_the_eager_engine(change):
    assert not one_pass.counts_signs(variant(zero_sign="majority", **change))
    assert one_pass.counts_signs(variant(zero_sign="majority", weights=(1.0, 2.0, 1.0)))  # raw election


@pytest.mark.parametrize(
    "change",
    [
        {"method": "average"},
        {"mask": "tall"},
        {"aggregate": "sum"},
        {"dare": 0.1},
        {"trim_scope": "per-tensor"},
        {"mask_source": "raw"},
        {"weights": (1.0, 2.0, 1.0)},
    ],
)
def test_anything_else_is_left_to_the_eager_engine(change):
    assert not one_pass.supports(variant(**change), [torch.bfloat16] * 4, torch.bfloat16, torch.device("cpu"))


def test_other_dtypes_or_devices_are_left_to_the_eager_engine():
    v = variant()
    assert not one_pass.supports(v, [torch.float32] * 4, torch.float32, torch.device("cpu"))
    assert not one_pass.supports(v, [torch.bfloat16] * 3 + [torch.float16], torch.bfloat16, torch.device("cpu"))
    assert not one_pass.supports(v, [torch.bfloat16] * 4, torch.float16, torch.device("cpu"))
    assert not one_pass.supports(v, [torch.bfloat16] * 4, torch.bfloat16, torch.device("cuda"))


def test_mmer_fused_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("MMER_FUSED", "0")
    one_pass._kernel.cache_clear()
    try:
        assert not one_pass.supports(variant(), [torch.bfloat16] * 4, torch.bfloat16, torch.device("cpu"))
    finally:
        monkeypatch.delenv("MMER_FUSED")
        one_pass._kernel.cache_clear()


def test_a_variant_is_a_plain_dataclass_the_kernel_reads_by_field():
    assert {f.name for f in dataclasses.fields(Variant)} >= {"method", "mask", "aggregate", "mask_source", "weights"}


def test_float16_patterns_decode_and_round_exactly_as_torch_converts_them():
    """Every one of the 65,536 float16 patterns widens like torch's cast (NaN aside), and float32 values around
    every float16 rounding boundary, subnormals and overflow included, narrow like it."""
    import numpy as np

    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    halves = torch.from_numpy(patterns.view(np.int16)).view(torch.float16)
    finite = torch.isfinite(halves).numpy()
    widened = one_pass._decode(patterns, True)
    assert np.array_equal(widened[finite].view(np.uint32), halves.float().numpy()[finite].view(np.uint32))
    g = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            halves.float()[torch.from_numpy(finite)],
            (torch.randn(200000, generator=g) * 10.0 ** torch.randint(-9, 6, (200000,), generator=g)).float(),
            torch.tensor([65504.0, 65519.99, 65520.0, 1e6, -1e6, 2.0**-24, 2.0**-25, 3 * 2.0**-26, -(2.0**-26)]),
        ]
    )
    narrowed = one_pass._encode_half(values.numpy())
    assert np.array_equal(narrowed, values.half().numpy().view(np.uint16))
