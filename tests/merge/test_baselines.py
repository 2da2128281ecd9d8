"""Specifies the baselines of mmer/merge: methods ``average``, ``task_arithmetic``, ``ties`` (weights, elect_on,
aggregate), ``emr``; masks ``tall`` and ``emr``; DARE (mmer/merge/dare.py); the trim count rule; one slot
through :func:`mmer.merge.slot.merge_slot`.

Expected values are literals worked out by hand from the formulas of docs/method.md §2, §2.1, §3 and §8 (TIES
arXiv 2306.01708, TALL masks arXiv 2405.07813, EMR-Merging arXiv 2405.17461); each case names its formula. Every
input is a small multiple of a power of two, so float32 holds every intermediate exactly and ``torch.equal`` is
fair.
"""

from __future__ import annotations

import pytest
import torch
from test_methods import NOT_ITS_OWN_TASK_VECTOR

from mmer.merge.dare import dare, dare_seed
from mmer.merge.masks import MASKS, emr_mask, mmer_mask, rebuild_weight, tall_mask
from mmer.merge.methods import METHODS, average, emr, task_arithmetic, ties
from mmer.merge.slot import Variant, merge_slot
from mmer.merge.trim import tensor_threshold, trim


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _variant(method: str, mask: str = "none", n: int = 1, **overrides: object) -> Variant:
    """A fully resolved variant with no trim, no DARE and α = 1 unless overridden."""
    fields: dict[str, object] = {
        "method": method,
        "mask": mask,
        "k": 1.0,
        "alpha": 1.0,
        "trim_scope": "per-tensor",
        "trim_count": "reference",
        "zero_sign": "zero",
        "elect_on": "raw",
        "aggregate": "mean",
        "mask_source": "trimmed",
        "dare": 0.0,
        "dare_seed": 0,
        "lambdas": (MASKS[mask].default_lambda,) * n,
        "weights": None,
    }
    fields.update(overrides)
    return Variant(**fields)  # type: ignore[arg-type]


def _random_taus(n: int, shape: tuple[int, ...], seed: int, zeros: float = 0.3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    taus = []
    for _ in range(n):
        tau = torch.randn(shape, generator=g) * 0.02
        tau[torch.rand(shape, generator=g) < zeros] = 0.0
        taus.append(tau)
    return taus


# ================================================================================================= average


def test_average_unweighted_is_the_plain_mean_of_the_task_vectors() -> None:
    # NaiveMC: τ* = (1/n) Σ τᵢ → ((1+3)/2, (2−2)/2, (−4+0)/2)
    taus = [_t([1.0, 2.0, -4.0]), _t([3.0, -2.0, 0.0])]
    assert torch.equal(average(taus), _t([2.0, 0.0, -2.0]))


def test_average_weighted_divides_the_weighted_sum_by_the_sum_of_the_weights() -> None:
    # τ* = Σ wᵢτᵢ / Σ wᵢ with w = (1, 3): ((1+9)/4, (2−6)/4, (−4+0)/4) = (2.5, −1, −1)
    taus = [_t([1.0, 2.0, -4.0]), _t([3.0, -2.0, 0.0])]
    assert torch.equal(average(taus, weights=(1.0, 3.0)), _t([2.5, -1.0, -1.0]))


def test_average_scales_by_alpha() -> None:
    # τ* = α · mean τᵢ with α = 0.5: 0.5 · (2, 0, −2)
    taus = [_t([1.0, 2.0, -4.0]), _t([3.0, -2.0, 0.0])]
    assert torch.equal(average(taus, alpha=0.5), _t([1.0, 0.0, -1.0]))


# ========================================================================================= task arithmetic


def test_task_arithmetic_is_alpha_times_the_sum() -> None:
    # τ* = α Σ τᵢ with α = 0.5: 0.5 · (4, 0, −4)
    taus = [_t([1.0, 2.0, -4.0]), _t([3.0, -2.0, 0.0])]
    assert torch.equal(task_arithmetic(taus, alpha=0.5), _t([2.0, 0.0, -2.0]))


def test_task_arithmetic_weighted_is_alpha_times_the_weighted_sum() -> None:
    # τ* = α Σ wᵢτᵢ with w = (1, 3), α = 0.5: 0.5 · (1+9, 2−6, −4+0) = (5, −2, −2)
    taus = [_t([1.0, 2.0, -4.0]), _t([3.0, -2.0, 0.0])]
    assert torch.equal(task_arithmetic(taus, weights=(1.0, 3.0), alpha=0.5), _t([5.0, -2.0, -2.0]))


def test_task_arithmetic_defaults_to_alpha_0_3_in_the_registry_and_the_others_to_1() -> None:
    assert METHODS["task_arithmetic"].default_alpha == 0.3
    assert METHODS["average"].default_alpha == 1.0
    assert METHODS["ties"].default_alpha == 1.0
    assert METHODS["emr"].default_alpha == 1.0
    assert METHODS["ties"].uses_trim
    assert not any(METHODS[m].uses_trim for m in ("average", "task_arithmetic", "emr"))


# ==================================================================================================== TIES


def test_ties_with_weights_elects_on_raw_or_weighted_task_vectors_with_different_results() -> None:
    # τ = (2, −1), w = (1, 4).
    # raw (TIES paper, PEFT): γ = sgn(2 − 1) = +; only τ₁ agrees → Σ wᵢτᵢ / Σ wᵢ over agreeing = 1·2 / 1 = 2
    # weighted (mergekit): γ = sgn(1·2 + 4·(−1)) = sgn(−2) = −; only τ₂ agrees → 4·(−1) / 4 = −1
    taus = [_t([2.0]), _t([-1.0])]
    assert torch.equal(ties(taus, weights=(1.0, 4.0), elect_on="raw"), _t([2.0]))
    assert torch.equal(ties(taus, weights=(1.0, 4.0), elect_on="weighted"), _t([-1.0]))


def test_ties_weighted_disjoint_mean_divides_by_the_weights_of_the_agreeing_models() -> None:
    # τ = (3, 1, −2), w = (1, 2, 4): raw γ = sgn(3 + 1 − 2) = +; agreeing τ₁, τ₂ →
    # mean: (1·3 + 2·1) / (1 + 2) = 5/3; sum: 1·3 + 2·1 = 5
    taus = [_t([3.0]), _t([1.0]), _t([-2.0])]
    assert torch.equal(ties(taus, weights=(1.0, 2.0, 4.0), aggregate="mean"), _t([5.0]) / 3.0)
    assert torch.equal(ties(taus, weights=(1.0, 2.0, 4.0), aggregate="sum"), _t([5.0]))
    # weighted election: γ = sgn(3 + 2 − 8) = −; only τ₃ agrees → mean 4·(−2)/4 = −2, sum 4·(−2) = −8
    assert torch.equal(ties(taus, weights=(1.0, 2.0, 4.0), elect_on="weighted"), _t([-2.0]))
    assert torch.equal(ties(taus, weights=(1.0, 2.0, 4.0), elect_on="weighted", aggregate="sum"), _t([-8.0]))


def test_ties_aggregate_mean_divides_by_the_agreeing_count_and_sum_does_not() -> None:
    # column 0: γ = sgn(3 + 1 − 2) = +, agreeing 3, 1 → mean 2, sum 4
    # column 1: γ = sgn(−1 + 2 + 0) = +, agreeing 2 → mean 2, sum 2 (the zero is not counted)
    # column 2: γ = sgn(−1 − 3 + 0.5) = −, agreeing −1, −3 → mean −2, sum −4
    taus = [_t([3.0, -1.0, -1.0]), _t([1.0, 2.0, -3.0]), _t([-2.0, 0.0, 0.5])]
    assert torch.equal(ties(taus, aggregate="mean"), _t([2.0, 2.0, -2.0]))
    assert torch.equal(ties(taus, aggregate="sum"), _t([4.0, 2.0, -4.0]))
    # α scales the result: 0.5 · mean
    assert torch.equal(ties(taus, aggregate="mean", alpha=0.5), _t([1.0, 1.0, -1.0]))


def test_ties_zero_sign_rule_decides_an_exactly_zero_sum() -> None:
    # Σ τᵢ = 2 − 2 = 0: "zero" → γ = 0, nothing agrees, τ* = 0; "positive" (mergekit) → γ = +, τ* = 2
    taus = [_t([2.0]), _t([-2.0])]
    assert torch.equal(ties(taus, zero_sign="zero"), _t([0.0]))
    assert torch.equal(ties(taus, zero_sign="positive"), _t([2.0]))


def test_ties_refuses_an_unknown_election_rule() -> None:
    with pytest.raises(ValueError, match="elect_on"):
        ties([_t([1.0])], elect_on="median")


# ===================================================================================================== EMR


def test_emr_unified_vector_takes_the_largest_agreeing_magnitude_with_the_elected_sign() -> None:
    # γ = +1 where Σ τᵢ > 0 else −1 (a zero sum counts as negative); τ_uni = γ · max{|τᵢ| : τᵢ·γ > 0}
    taus = [
        _t([3.0, -1.0, 0.0, 2.0, 3.0]),
        _t([-1.0, -4.0, 0.0, -2.0, 3.0]),
        _t([0.0, 2.0, 0.0, 0.0, -5.0]),
    ]
    expected = _t(
        [
            3.0,  # Σ = 2 > 0 → +; agreeing 3 → 3
            -4.0,  # Σ = −3 → −; agreeing −1, −4 → −4
            0.0,  # Σ = 0 → −; nothing agrees → 0
            -2.0,  # Σ = 2 − 2 = 0 counts as negative → −; agreeing −2 → −2 (TIES' "positive" rule would give +2)
            3.0,  # Σ = 1 → +; agreeing 3, 3 → 3, the disagreeing |−5| is larger but not taken
        ]
    )
    assert torch.equal(emr(taus), expected)


def test_emr_unified_vector_scales_by_alpha() -> None:
    taus = [_t([3.0, -1.0]), _t([1.0, -4.0])]
    assert torch.equal(emr(taus, alpha=0.5), _t([1.5, -2.0]))


# ============================================================================================ mask rules


@pytest.mark.parametrize(
    ("tau_i", "tau_star", "lam", "expected"),
    [
        # TALL: mᵢ = |τᵢ| > λ·|τ* − τᵢ|, strict
        (1.0, 2.0, 1.0, False),  # 1 > 1·|2 − 1| = 1? no: equality is rejected (strict >)
        (1.25, 2.0, 1.0, True),  # 1.25 > 0.75
        (1.0, 2.0, 0.5, True),  # 1 > 0.5·1 = 0.5
        (0.5, 4.0, 0.125, True),  # 0.5 > 0.125·|4 − 0.5| = 0.4375
        (0.25, 4.0, 0.125, False),  # 0.25 > 0.125·3.75 = 0.46875? no
        (-1.0, 1.0, 0.25, True),  # opposite sign: 1 > 0.25·|1 − (−1)| = 0.5 → kept (MMER rejects it)
        (-1.0, 1.0, 1.0, False),  # opposite sign at λ = 1: 1 > 2? no
        (0.0, 1.0, 0.5, False),  # τᵢ = 0: 0 > 0.5 · 1? no
        (0.0, 0.0, 0.5, False),  # 0 > 0? no (strict)
        (2.0, 0.0, 0.5, True),  # τ* = 0: 2 > 0.5·2 = 1 → kept (TALL keeps it; rebuild_weight adds 0 there anyway)
        (3.0, 3.0, 0.4, True),  # τᵢ = τ*: 3 > 0
    ],
)
def test_tall_mask_follows_its_strict_rule_entry_by_entry(
    tau_i: float, tau_star: float, lam: float, expected: bool
) -> None:
    assert bool(tall_mask(_t([tau_i]), _t([tau_star]), lam).item()) is expected


def test_tall_accepts_an_opposite_sign_entry_below_lambda_one_where_mmer_does_not() -> None:
    # τᵢ = −1, τ* = 1: TALL at λ = 0.25: |−1| = 1 > 0.25·|1 + 1| = 0.5 → 1; MMER: sign conflict → 0 at any λ
    tau_i, tau_star = _t([-1.0]), _t([1.0])
    assert tall_mask(tau_i, tau_star, 0.25).tolist() == [True]
    assert mmer_mask(tau_i, tau_star, 0.25).tolist() == [False]
    assert mmer_mask(tau_i, tau_star, 0.0).tolist() == [False]


def test_tall_is_strict_where_mmer_is_inclusive_at_lambda_one() -> None:
    # τᵢ = 1, τ* = 2: TALL 1 > |2 − 1| = 1 → 0; MMER 1 ≥ 1·0.5·2 = 1 → 1 (the ℓ1 tie goes to MMER's "keep")
    assert tall_mask(_t([1.0]), _t([2.0]), 1.0).tolist() == [False]
    assert mmer_mask(_t([1.0]), _t([2.0]), 1.0).tolist() == [True]


def test_emr_mask_is_sign_agreement_only() -> None:
    # Mᵢ = [τᵢ·τ* > 0]: magnitude does not matter, zeros on either side are 0
    tau_i = _t([0.001, -5.0, 2.0, 0.0, 1.0, -1.0])
    tau_star = _t([8.0, -0.5, -2.0, 3.0, 0.0, 0.0])
    assert emr_mask(tau_i, tau_star, 0.0).tolist() == [True, True, False, False, False, False]
    # λ is unused
    assert torch.equal(emr_mask(tau_i, tau_star, 7.0), emr_mask(tau_i, tau_star, 0.0))


def test_mask_registry_flags_tall_as_raw_and_emr_as_rescaled() -> None:
    assert MASKS["tall"].uses_raw and not MASKS["tall"].rescaled
    assert MASKS["tall"].default_lambda == 0.4
    assert MASKS["emr"].rescaled and not MASKS["emr"].uses_raw
    assert not MASKS["mmer"].uses_raw and not MASKS["mmer"].rescaled
    assert MASKS["none"].single_model_output and MASKS["none"].fn is None


def test_emr_rescaler_through_merge_slot_is_the_ratio_of_mean_magnitudes() -> None:
    # τ₁ = (4, −2, 0, 2), τ₂ = (−2, −2, 2, 2); Σ = (2, −4, 2, 4) → γ = (+, −, +, +)
    # τ_uni = (4, −2, 2, 2); M₁ = (1, 1, 0, 1), M₂ = (0, 1, 1, 1)
    # s₁ = mean|τ₁| / mean|M₁∘τ_uni| = (8/4) / (8/4) = 1;  s₂ = (8/4) / (6/4) = 4/3
    taus = [_t([4.0, -2.0, 0.0, 2.0]), _t([-2.0, -2.0, 2.0, 2.0])]
    result = merge_slot(taus, _variant("emr", "emr", n=2), "w", torch.float32)
    assert torch.equal(result.stored, _t([4.0, -2.0, 2.0, 2.0]))
    assert [m.tolist() for m in result.masks] == [[True, True, False, True], [False, True, True, True]]
    assert result.scale_num == [2.0, 2.0]
    assert result.scale_den == [2.0, 1.5]


# ============================================================================================= identities


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(NOT_ITS_OWN_TASK_VECTOR)))
@pytest.mark.parametrize("seed", [0, 1])
def test_each_method_merging_one_model_returns_its_task_vector(name: str, seed: int) -> None:
    (tau,) = _random_taus(1, (6, 5), seed)
    assert torch.equal(METHODS[name].merge([tau], weights=None, alpha=1.0), tau)
    # a weight on the single model changes nothing where the method normalises by it (or elects with it)
    if name in ("average", "ties"):
        assert torch.equal(METHODS[name].merge([tau], weights=(2.0,), alpha=1.0, elect_on="weighted"), tau)


def _identity_combinations() -> list[tuple[str, str]]:
    methods = sorted(set(METHODS) - set(NOT_ITS_OWN_TASK_VECTOR))
    combos = [(method, mask) for method in methods for mask in ("mmer", "tall", "none")]
    return [*combos, ("emr", "emr")]


@pytest.mark.parametrize(("method", "mask"), _identity_combinations())
def test_each_method_and_mask_rebuild_a_single_model_exactly(method: str, mask: str) -> None:
    """One model: τ* = τ, the mask keeps exactly its non-zero entries (mmer at its default λ = 0.9 ≤ 2, tall
    since |τ| > λ·0, emr since τ² > 0), and θ_base + m∘τ* gives θ back."""
    (tau,) = _random_taus(1, (8, 4), seed=3)
    base = torch.randn(8, 4, generator=torch.Generator().manual_seed(9))
    result = merge_slot([tau], _variant(method, mask), "model.layers.0.mlp.up_proj.weight", torch.float32)
    assert torch.equal(result.stored, tau)
    if MASKS[mask].single_model_output:
        assert result.masks is None
        assert torch.equal(rebuild_weight(base, result.stored, None), base + tau)
    else:
        assert torch.equal(result.masks[0], tau != 0)
        assert torch.equal(rebuild_weight(base, result.stored, result.masks[0]), base + tau)


def test_ties_with_k_below_one_merging_one_model_returns_its_trimmed_task_vector() -> None:
    tau = _t([0.5, -4.0, 1.0, 3.0, -2.0])
    # per-tensor reference trim with K = 0.4: ⌊5·0.4⌋ = 2 → keep |τ| ≥ the 3rd smallest magnitude (2)
    result = merge_slot([tau], _variant("ties", "mmer", k=0.4), "w", torch.float32)
    assert torch.equal(result.stored, _t([0.0, -4.0, 0.0, 3.0, -2.0]))
    assert result.masks[0].tolist() == [False, True, False, True, True]


def test_emr_rescaler_of_a_single_model_is_one() -> None:
    """The rescaler is summed over a model's tensors: Σₙ mean|τₙ| / Σₙ mean|Mₙ∘τ_uniₙ| = 1 for one model."""
    tensors = {f"t{i}": t for i, t in enumerate(_random_taus(4, (7, 3), seed=5))}
    num = den = 0.0
    for name, tau in tensors.items():
        result = merge_slot([tau], _variant("emr", "emr"), name, torch.float32)
        assert torch.equal(result.stored, tau)
        assert torch.equal(result.masks[0], tau != 0)
        num += result.scale_num[0]
        den += result.scale_den[0]
    assert num > 0
    assert num / den == 1.0


# ==================================================================================================== DARE


def test_dare_with_p_zero_returns_the_task_vector_itself() -> None:
    (tau,) = _random_taus(1, (10, 10), seed=0)
    assert dare(tau, 0.0, seed=123, model_index=0, name="w") is tau


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties"])
def test_merge_slot_with_dare_p_zero_equals_the_method_without_dare(method: str) -> None:
    taus = _random_taus(3, (12, 6), seed=1)
    plain = merge_slot(taus, _variant(method, "mmer", n=3, k=0.5), "w", torch.float32)
    for seed in (0, 7, 2**31):
        with_p0 = merge_slot(taus, _variant(method, "mmer", n=3, k=0.5, dare=0.0, dare_seed=seed), "w", torch.float32)
        assert torch.equal(with_p0.stored, plain.stored)
        for a, b in zip(with_p0.masks, plain.masks, strict=True):
            assert torch.equal(a, b)


def test_dare_with_the_same_seed_is_identical_across_calls() -> None:
    (tau,) = _random_taus(1, (64, 32), seed=2, zeros=0.0)
    first = dare(tau, 0.5, seed=42, model_index=1, name="model.layers.0.mlp.up_proj.weight")
    second = dare(tau.clone(), 0.5, seed=42, model_index=1, name="model.layers.0.mlp.up_proj.weight")
    assert torch.equal(first, second)
    assert dare_seed(42, 1, "x") == dare_seed(42, 1, "x")


def test_dare_masks_through_merge_slot_are_identical_for_the_same_seed() -> None:
    taus = _random_taus(2, (32, 16), seed=3)
    variant = _variant("ties", "mmer", n=2, k=0.8, dare=0.3, dare_seed=11)
    a = merge_slot(taus, variant, "model.layers.1.self_attn.q_proj.weight", torch.float32)
    b = merge_slot([t.clone() for t in taus], variant, "model.layers.1.self_attn.q_proj.weight", torch.float32)
    assert torch.equal(a.stored, b.stored)
    for x, y in zip(a.masks, b.masks, strict=True):
        assert torch.equal(x, y)
    # and DARE did something: the result is not the one without it
    plain = merge_slot(
        taus, _variant("ties", "mmer", n=2, k=0.8), "model.layers.1.self_attn.q_proj.weight", torch.float32
    )
    assert not torch.equal(a.stored, plain.stored)


def _kept(tau: torch.Tensor, p: float, seed: int, index: int, name: str) -> torch.Tensor:
    return dare(tau, p, seed, index, name) != 0


def test_dare_mask_changes_with_the_seed_the_tensor_name_and_the_model_index() -> None:
    tau = torch.ones(64, 64)
    reference = _kept(tau, 0.5, 0, 0, "a.weight")
    assert not torch.equal(_kept(tau, 0.5, 1, 0, "a.weight"), reference)  # another seed
    assert not torch.equal(_kept(tau, 0.5, 0, 0, "b.weight"), reference)  # another tensor
    assert not torch.equal(_kept(tau, 0.5, 0, 1, "a.weight"), reference)  # another model position
    assert len({dare_seed(0, 0, "a.weight"), dare_seed(1, 0, "a.weight"), dare_seed(0, 1, "a.weight")}) == 3


@pytest.mark.parametrize("p", [0.75, 0.5, 0.3])
def test_dare_scales_the_kept_entries_by_one_over_one_minus_p_and_zeros_the_rest(p: float) -> None:
    (tau,) = _random_taus(1, (40, 40), seed=4, zeros=0.0)
    out = dare(tau, p, seed=5, model_index=0, name="w")
    kept = out != 0
    assert 0 < int(kept.sum()) < tau.numel()
    assert torch.equal(out[kept], tau[kept] / (1.0 - p))
    if p == 0.75:  # 1/(1 − 0.75) = 4 exactly
        assert torch.equal(out[kept], tau[kept] * 4)
    assert out.dtype == tau.dtype and out.shape == tau.shape


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_drops_about_a_fraction_p_of_a_large_tensor(p: float) -> None:
    tau = torch.ones(1000, 1000)
    dropped = float((dare(tau, p, seed=0, model_index=0, name="big") == 0).float().mean())
    # binomial std at n = 10⁶ is ≤ 0.0005; the bound is 20× that
    assert abs(dropped - p) < 0.01


def test_dare_refuses_p_of_one() -> None:
    with pytest.raises(ValueError, match="< 1"):
        dare(torch.ones(3), 1.0, 0, 0, "w")


# ============================================================================================ trim count


@pytest.mark.parametrize(
    ("k", "exact", "reference"),
    [
        (0.35, 3, 4),  # ⌊10·0.35⌋ = 3: exact keeps 3, reference keeps 3 + 1
        (0.5, 5, 6),
        (0.05, 1, 1),  # ⌊0.5⌋ = 0: exact keeps max(1, 0) = 1, reference keeps 0 + 1
        (0.99, 9, 10),  # ⌊9.9⌋ = 9
        (1.0, 10, 10),  # K = 1 keeps everything either way
    ],
)
def test_trim_count_exact_keeps_floor_d_k_and_reference_one_more_on_distinct_magnitudes(
    k: float, exact: int, reference: int
) -> None:
    tau = _t([0.5, -1.0, 1.5, -2.0, 2.5, -3.0, 3.5, -4.0, 4.5, -5.0])
    order = tau.abs().argsort(descending=True)
    for count, expected in (("exact", exact), ("reference", reference)):
        kept = trim(tau, tensor_threshold(tau, k, count)) != 0
        assert int(kept.sum()) == expected, count
        # the kept entries are the largest magnitudes
        assert set(order[:expected].tolist()) == set(kept.nonzero().flatten().tolist())


def test_trim_count_through_merge_slot_per_tensor() -> None:
    tau = _t([0.5, -1.0, 1.5, -2.0, 2.5, -3.0, 3.5, -4.0, 4.5, -5.0])
    exact = merge_slot([tau], _variant("ties", k=0.35, trim_count="exact"), "w", torch.float32)
    ref = merge_slot([tau], _variant("ties", k=0.35, trim_count="reference"), "w", torch.float32)
    assert torch.equal(exact.stored, _t([0, 0, 0, 0, 0, 0, 0, -4.0, 4.5, -5.0]))
    assert torch.equal(ref.stored, _t([0, 0, 0, 0, 0, 0, 3.5, -4.0, 4.5, -5.0]))
