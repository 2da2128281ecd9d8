"""Specifies mmer/merge/masks.py (MMER Eq. 3 and the reconstruction θ̂ᵢ = θ_base + mᵢ∘τ*) and check_finite.

Eq. 3: mᵢ = [sgn(τᵢ) = sgn(τ*) ≠ 0] ∧ [|τᵢ| ≥ λ·0.5·|τ*|], inclusive; λ = 1 is the ℓ1-optimal mask of Eq. 2.
"""

from __future__ import annotations

import pytest
import torch

from mmer.errors import NonFiniteError
from mmer.merge.masks import MASKS, mmer_mask, rebuild_weight
from mmer.merge.methods import ties
from mmer.merge.task_vectors import check_finite


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ mmer_mask golden


@pytest.mark.parametrize(
    ("tau_i", "tau_star", "lam", "expected"),
    [
        (-2.0, 4.0, 0.5, False),  # sign conflict → 0 whatever the magnitude
        (2.0, -4.0, 0.0, False),  # sign conflict → 0 even with λ = 0
        (0.5, 4.0, 0.5, False),  # 0.5 < 0.5·0.5·4 = 1 → 0
        (1.0, 4.0, 0.5, True),  # exactly at λ·0.5·|τ*| = 1 → 1 (inclusive ≥)
        (2.0, 4.0, 1.0, True),  # exactly at 0.5·|τ*| with λ = 1 → 1
        (1.75, 4.0, 1.0, False),  # just below 0.5·|τ*| = 2 → 0
        (6.0, 4.0, 0.5, True),  # larger than τ* itself → 1
        (-2.0, -8.0, 0.5, True),  # negative, exactly at 0.25·8 = 2 → 1
        (-1.5, -8.0, 0.5, False),  # negative, below 2 → 0
        (0.0, 4.0, 0.5, False),  # trimmed τᵢ = 0: sgn 0 ≠ sgn τ* → 0
        (0.0, 0.0, 0.5, False),  # τ* = 0 → 0 (mmer's convention: nothing to keep)
        (1.0, 0.0, 0.5, False),  # τ* = 0 → 0 even though |τᵢ| ≥ 0
        (-1.0, 0.0, 0.0, False),  # τ* = 0 → 0 even with λ = 0
        (3.0, 4.0, 1.5, True),  # λ > 1 raises the bar: 3 ≥ 1.5·0.5·4 = 3 → 1
        (2.5, 4.0, 1.5, False),  # 2.5 < 3 → 0
    ],
)
def test_mmer_mask_follows_eq_3_entry_by_entry(tau_i: float, tau_star: float, lam: float, expected: bool) -> None:
    mask = mmer_mask(_t([tau_i]), _t([tau_star]), lam)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [expected]


def test_mmer_mask_of_a_vector_with_one_rule_per_entry() -> None:
    # λ = 0.5: the bar is 0.25·|τ*| = 1 for |τ*| = 4 and 2 for |τ*| = 8
    tau_star = _t([4.0, 4.0, 4.0, 4.0, 0.0, 0.0, -8.0, -8.0, 4.0, -4.0])
    tau_i = _t([-2.0, 0.5, 1.0, 6.0, 0.0, 1.0, -2.0, -1.5, 0.0, 3.0])
    # conflict, below, at, above, τ*=0, τ*=0, at, below, τᵢ=0, conflict
    expected = [False, False, True, True, False, False, True, False, False, False]
    assert mmer_mask(tau_i, tau_star, 0.5).tolist() == expected


@pytest.mark.parametrize("lam", [0.0, 1e-6])
def test_a_single_model_with_lambda_near_zero_keeps_exactly_its_non_zero_entries(lam: float) -> None:
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(40, 25, generator=g) * torch.pow(10.0, torch.randint(-5, 3, (40, 25), generator=g).float())
    tau[torch.rand(40, 25, generator=g) < 0.3] = 0.0
    tau_star = ties([tau])
    assert torch.equal(mmer_mask(tau, tau_star, lam), tau != 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_with_lambda_one_the_mask_is_the_l1_optimal_choice_wherever_that_choice_is_unique(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 20000
    tau_star = torch.randn(n, generator=g)
    tau_star[torch.rand(n, generator=g) < 0.1] = 0.0
    # τᵢ = u·τ* with u around the decision point 0.5, of both signs, plus independent noise and exact zeros
    u = torch.rand(n, generator=g) * 3 - 1
    u[torch.rand(n, generator=g) < 0.1] = 0.5  # exact ties: not unique, skipped below
    tau_i = u * tau_star
    noisy = torch.rand(n, generator=g) < 0.3
    tau_i[noisy] = torch.randn(int(noisy.sum()), generator=g)
    tau_i[torch.rand(n, generator=g) < 0.05] = 0.0

    # Eq. 2 per coordinate, in float64 (exact for these float32 inputs): cost of m = 1 and of m = 0
    cost_keep = (tau_star.double() - tau_i.double()).abs()
    cost_drop = tau_i.double().abs()
    unique = cost_keep != cost_drop
    optimal = cost_keep < cost_drop

    mask = mmer_mask(tau_i, tau_star, 1.0)
    assert unique.sum() > n // 2 and optimal[unique].any() and (~optimal[unique]).any()
    assert torch.equal(mask[unique], optimal[unique])


@pytest.mark.parametrize("name", sorted(n for n, rule in MASKS.items() if not rule.single_model_output))
def test_every_mask_rule_returns_a_bool_tensor_of_the_task_vector_shape(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    tau_i, tau_star = torch.randn(2, 3, 7, generator=g)
    mask = MASKS[name].fn(tau_i, tau_star, 0.9)
    assert mask.dtype == torch.bool
    assert mask.shape == (3, 7)


def test_the_mask_registry_holds_mmer() -> None:
    assert MASKS["mmer"].fn is mmer_mask


# -------------------------------------------------------------------------- Table 5's ablations, golden

# One entry per case of Eq. 3 (λ = 0.5: the magnitude bar λ·0.5·|τ*| is 1 for |τ*| = 4 and 2 for |τ*| = 8):
#                  conflict  below   at    above  τ*=0  τ*=0  at(−)  below(−) τᵢ=0  big conflict
_ABLATION_STAR = [4.0, 4.0, 4.0, 4.0, 0.0, 0.0, -8.0, -8.0, 4.0, -4.0]
_ABLATION_TAU = [-2.0, 0.5, 1.0, 6.0, 0.0, 1.0, -2.0, -1.5, 0.0, 3.0]


def test_the_sign_only_ablation_keeps_every_entry_whose_sign_agrees_with_tau_star() -> None:
    """MMER Table 5, Eq. 3's first test alone: [sgn(τᵢ) = sgn(τ*)], still 0 where τ* = 0 or τᵢ = 0."""
    expected = [False, True, True, True, False, False, True, True, False, False]
    assert MASKS["sign_only"].fn(_t(_ABLATION_TAU), _t(_ABLATION_STAR), 0.5).tolist() == expected


def test_the_sign_only_ablation_is_exact_where_the_product_of_tiny_values_underflows() -> None:
    # 1e-30 · 1e-30 underflows to 0 in float32, but the signs still agree
    assert MASKS["sign_only"].fn(_t([1e-30, -1e-30]), _t([1e-30, -1e-30]), 0.0).tolist() == [True, True]


@pytest.mark.parametrize(
    ("lam", "expected"),
    [
        # |τᵢ| ≥ λ·0.5·|τ*| whatever the signs: the conflicting −2 and 3 are kept (mmer drops them), τ* = 0 is not
        (0.5, [True, False, True, True, False, False, True, False, False, True]),
        # λ = 1: bars 2 and 4; the conflicting −2 is exactly at its bar (inclusive) and 3 above it: both kept
        (1.0, [True, False, False, True, False, False, False, False, False, True]),
        # λ = 0: every entry where τ* ≠ 0, even a trimmed τᵢ = 0
        (0.0, [True, True, True, True, False, False, True, True, True, True]),
    ],
)
def test_the_magnitude_only_ablation_keeps_every_entry_large_enough_whatever_its_sign(lam, expected) -> None:
    """MMER Table 5, Eq. 3's second test alone: [|τᵢ| ≥ λ·0.5·|τ*|], 0 where τ* = 0 (this module's convention)."""
    assert MASKS["magnitude_only"].fn(_t(_ABLATION_TAU), _t(_ABLATION_STAR), lam).tolist() == expected


@pytest.mark.parametrize("lam", [0.3, 0.9, 1.4])
def test_mmer_s_mask_is_exactly_both_ablations_at_once(lam: float) -> None:
    g = torch.Generator().manual_seed(4)
    tau_i, tau_star = torch.randn(2, 5000, generator=g).round(decimals=1)  # many ties and exact zeros
    both = MASKS["sign_only"].fn(tau_i, tau_star, lam) & MASKS["magnitude_only"].fn(tau_i, tau_star, lam)
    assert torch.equal(both, mmer_mask(tau_i, tau_star, lam))


def test_the_ablations_take_what_their_half_of_eq_3_reads_and_pair_with_any_method() -> None:
    assert MASKS["sign_only"].accepts == {"mask_source"} and MASKS["sign_only"].default_lambda is None
    assert MASKS["magnitude_only"].accepts == {"lambda", "mask_source"}
    assert MASKS["magnitude_only"].default_lambda == MASKS["mmer"].default_lambda
    assert MASKS["sign_only"].pairs_with is None and MASKS["magnitude_only"].pairs_with is None
    assert not MASKS["sign_only"].rescaled and not MASKS["magnitude_only"].rescaled


# ---------------------------------------------------------------------------------------- rebuild_weight

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _base_and_tau_star(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(31, 17, generator=g).to(dtype)
    tau_star = torch.randn(31, 17, generator=g) * 1e-2
    tau_star[torch.rand(31, 17, generator=g) < 0.2] = 0.0
    return base, tau_star


@pytest.mark.parametrize("dtype", _DTYPES)
def test_rebuild_weight_with_an_all_ones_mask_gives_base_plus_tau_star(dtype: torch.dtype) -> None:
    base, tau_star = _base_and_tau_star(dtype)
    out = rebuild_weight(base, tau_star, torch.ones(base.shape, dtype=torch.bool))
    assert out.dtype == dtype
    assert torch.equal(out, (base.float() + tau_star).to(dtype))


def test_rebuild_weight_with_an_all_ones_mask_in_float32_is_exactly_the_sum() -> None:
    base, tau_star = _base_and_tau_star(torch.float32)
    assert torch.equal(rebuild_weight(base, tau_star, torch.ones(base.shape, dtype=torch.bool)), base + tau_star)


@pytest.mark.parametrize("dtype", _DTYPES)
def test_rebuild_weight_with_an_all_zeros_mask_gives_the_base_back(dtype: torch.dtype) -> None:
    base, tau_star = _base_and_tau_star(dtype)
    out = rebuild_weight(base, tau_star, torch.zeros(base.shape, dtype=torch.bool))
    assert out.dtype == dtype
    assert torch.equal(out, base)


def test_rebuild_weight_adds_tau_star_only_where_the_mask_is_set() -> None:
    # θ̂ = θ_base + m∘τ*
    base = _t([1.0, 2.0, 3.0, -1.0])
    tau_star = _t([0.5, -1.0, 2.0, 0.25])
    mask = torch.tensor([True, False, True, False])
    assert torch.equal(rebuild_weight(base, tau_star, mask), _t([1.5, 2.0, 5.0, -1.0]))


@pytest.mark.parametrize("dtype", _DTYPES)
def test_rebuild_weight_returns_the_dtype_asked_for_or_else_the_base_dtype(dtype: torch.dtype) -> None:
    base, tau_star = _base_and_tau_star(dtype)
    mask = tau_star > 0
    assert rebuild_weight(base, tau_star, mask).dtype == dtype
    wide = rebuild_weight(base, tau_star, mask, dtype=torch.float32)
    assert wide.dtype == torch.float32
    assert torch.equal(wide, base.float() + torch.where(mask, tau_star, 0.0))


# ------------------------------------------------------------------------------------------ check_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_raises_non_finite_error_naming_the_tensor_and_the_file(bad: float) -> None:
    tensor = _t([1.0, bad, 2.0, bad])
    with pytest.raises(NonFiniteError) as info:
        check_finite(tensor, file="shards/model-00002.safetensors", name="model.layers.3.mlp.up_proj.weight")
    err = info.value
    assert err.file == "shards/model-00002.safetensors"
    assert err.tensor == "model.layers.3.mlp.up_proj.weight"
    assert "shards/model-00002.safetensors" in err.message
    assert "'model.layers.3.mlp.up_proj.weight'" in err.message
    assert "holds 2 NaN/inf value(s)" in err.message
    assert err.hint


@pytest.mark.parametrize("dtype", _DTYPES)
def test_check_finite_catches_non_finite_values_in_half_precision(dtype: torch.dtype) -> None:
    with pytest.raises(NonFiniteError):
        check_finite(torch.tensor([0.0, float("nan")], dtype=dtype), file="f", name="t")


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor([1.0, -3e38, 1e-45, 0.0]),
        torch.tensor([1, 2, 3]),
        torch.empty(0),
        torch.tensor(5.0),
    ],
)
def test_check_finite_accepts_finite_and_integer_tensors(tensor: torch.Tensor) -> None:
    check_finite(tensor, file="f", name="t")
