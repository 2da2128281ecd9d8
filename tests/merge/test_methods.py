"""Specifies mmer/merge/methods.py: TIES sign election, disjoint mean, the ``ties`` method and the registry.

Symbols are the paper's (TIES, arXiv 2306.01708 §3; docs/method.md §2): γ = sgn(Σᵢ τᵢ);
τ* = α · mean{τᵢ : τᵢ ≠ 0, sgn(τᵢ) = γ}.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from mmer.config import ZERO_SIGN_RULES
from mmer.merge.methods import METHODS, SignCensus, disjoint_mean, elect_sign, register_method, tie_sign, ties


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _dyadic_task_vectors(n_models: int, numel: int, seed: int) -> list[torch.Tensor]:
    """Multiples of 1/8 in [-8, 8] with many zeros: every partial sum is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    taus = []
    for _ in range(n_models):
        tau = torch.randint(-64, 65, (numel,), generator=g).float() / 8
        tau[torch.rand(numel, generator=g) < 0.3] = 0.0
        taus.append(tau)
    return taus


def _float_task_vectors(n_models: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    taus = []
    for _ in range(n_models):
        tau = torch.randn(shape, generator=g) * torch.pow(10.0, torch.randint(-6, 2, shape, generator=g).float())
        tau[torch.rand(shape, generator=g) < 0.2] = 0.0
        taus.append(tau)
    return taus


# ------------------------------------------------------------------------------------------ elect_sign


@pytest.mark.parametrize(
    ("taus", "expected"),
    [
        # γ = sgn(Σ τᵢ): one large value beats two small opposite ones (3 − 1 − 1 = 1 > 0)
        ([[3.0], [-1.0], [-1.0]], [1.0]),
        ([[-3.0], [1.0], [1.0]], [-1.0]),
        # the majority of models does not decide, the mass does: 0.5 + 0.5 − 2 < 0
        ([[0.5], [0.5], [-2.0]], [-1.0]),
        # zeros carry no mass
        ([[0.0], [0.0], [-1e-6]], [-1.0]),
        ([[2.0, -1.0, 0.0, 4.0]], [1.0, -1.0, 0.0, 1.0]),
    ],
)
def test_elect_sign_picks_the_sign_of_the_sum_of_the_task_vectors(
    taus: list[list[float]], expected: list[float]
) -> None:
    assert torch.equal(elect_sign([_t(t) for t in taus]), _t(expected))


@pytest.mark.parametrize(
    ("zero_sign", "expected"),
    [
        # Σ = [1, 0, 0, 0, 1]: TIES Algorithm 1 keeps sgn(0) = 0
        ("zero", [1.0, 0.0, 0.0, 0.0, 1.0]),
        # mergekit's convention: γ = +1 where Σ is exactly 0
        ("positive", [1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_elect_sign_where_the_sum_is_exactly_zero_follows_the_zero_sign_rule(
    zero_sign: str, expected: list[float]
) -> None:
    taus = [
        _t([3.0, -1.0, 0.0, 2.0, 1.0]),
        _t([-1.0, -1.0, 0.0, -2.0, 0.0]),
        _t([-1.0, 2.0, 0.0, 0.0, 0.0]),
    ]
    assert torch.equal(elect_sign(taus, zero_sign), _t(expected))


@pytest.mark.parametrize(("majority", "expected"), [(-1, [1.0, -1.0, -1.0, -1.0, 1.0]), (1, [1.0] * 5)])
def test_elect_sign_gives_a_zero_sum_the_majority_sign_it_is_handed(majority: int, expected: list[float]) -> None:
    taus = [_t([3.0, -1.0, 0.0, 2.0, 1.0]), _t([-1.0, -1.0, 0.0, -2.0, 0.0]), _t([-1.0, 2.0, 0.0, 0.0, 0.0])]
    assert torch.equal(elect_sign(taus, "majority", majority), _t(expected))


def test_the_majority_rule_refuses_to_elect_before_the_majority_is_counted() -> None:
    with pytest.raises(ValueError, match="needs the model-wide majority sign"):
        elect_sign([_t([1.0]), _t([-1.0])], "majority")
    with pytest.raises(ValueError, match="needs the model-wide majority sign"):
        ties([_t([1.0]), _t([-1.0])], zero_sign="majority", majority=0)


def test_elect_sign_refuses_an_unknown_zero_sign_rule() -> None:
    with pytest.raises(ValueError, match="unknown zero_sign rule 'negative'"):
        elect_sign([_t([0.0])], "negative")


def test_tie_sign_is_the_one_place_each_zero_sign_rule_is_defined() -> None:
    assert [tie_sign(rule, 1) for rule in ZERO_SIGN_RULES] == [0.0, 1.0, 1.0]
    assert tie_sign("majority", -1) == -1.0


@pytest.mark.parametrize(
    ("gamma", "positive", "negative", "majority"),
    [
        ([1.0, -1.0, -1.0, 0.0, 0.0], 1, 2, -1),
        ([1.0, 1.0, -1.0, 0.0], 2, 1, 1),
        # a tied count: the reference code keeps γ = 0 and its disjoint merge then keeps the negative τᵢ, so −1
        ([1.0, -1.0, 0.0], 1, 1, -1),
        ([0.0, 0.0], 0, 0, -1),
        ([float("nan"), 1.0], 1, 0, 1),  # a sum that is not a number elects neither sign
    ],
)
def test_a_sign_census_counts_elected_signs_and_names_the_majority(gamma, positive, negative, majority) -> None:
    census = SignCensus.of(_t(gamma))
    assert (census.positive, census.negative, census.majority) == (positive, negative, majority)
    assert census.to_dict() == {"positive": positive, "negative": negative, "majority_sign": majority}


def test_censuses_of_parts_add_up_to_the_census_of_the_whole() -> None:
    parts = [_t([1.0, -1.0, 0.0]), _t([-1.0, -1.0]), _t([1.0])]
    total = SignCensus()
    for part in parts:
        total = total + SignCensus.of(part)
    assert total == SignCensus.of(torch.cat(parts)) == SignCensus(2, 3)


# ------------------------------------------------------------------------------------------ disjoint_mean


@pytest.mark.parametrize(
    ("taus", "gamma", "expected"),
    [
        # entry 0: 2 and 4 agree with γ=+1 (the 0 is not counted) → 3;
        # entry 1: nobody is non-zero → 0;
        # entry 2: −1 and −3 agree with γ=−1, the disagreeing 4 is dropped → −2
        ([[2.0, 0.0, 4.0], [4.0, 0.0, -1.0], [0.0, 0.0, -3.0]], [1.0, 1.0, -1.0], [3.0, 0.0, -2.0]),
        # zeros are never counted: mean of {6}, not of {6, 0, 0}
        ([[6.0], [0.0], [0.0]], [1.0], [6.0]),
        # no entry agrees with γ → 0
        ([[-1.0], [-2.0]], [1.0], [0.0]),
        # γ = 0 (sum exactly 0): no non-zero entry has sign 0 → 0
        ([[1.0], [-1.0]], [0.0], [0.0]),
        # one agreeing entry is taken as is
        ([[-0.75], [5.0], [0.0]], [-1.0], [-0.75]),
    ],
)
def test_disjoint_mean_averages_only_the_non_zero_entries_that_agree_with_gamma(
    taus: list[list[float]], gamma: list[float], expected: list[float]
) -> None:
    assert torch.equal(disjoint_mean([_t(t) for t in taus], _t(gamma)), _t(expected))


# ------------------------------------------------------------------------------------------ ties end to end

_TAU_1 = [1.0, -2.0, 0.5, 0.0, 3.0, -1.0]
_TAU_2 = [3.0, 1.0, -0.5, 0.0, -1.0, 1.0]
_TAU_3 = [-1.0, -2.0, 0.0, 0.0, -1.0, 0.0]
# Σ = [3, −3, 0, 0, 1, 0]


@pytest.mark.parametrize(
    ("alpha", "zero_sign", "expected"),
    [
        # γ = [+, −, 0, 0, +, 0]; disjoint means: (1+3)/2, (−2−2)/2, 0 (γ=0), 0 (all zero), 3/1 (−1, −1 dropped), 0
        (1.0, "zero", [2.0, -2.0, 0.0, 0.0, 3.0, 0.0]),
        # α scales τ*
        (0.5, "zero", [1.0, -1.0, 0.0, 0.0, 1.5, 0.0]),
        (2.0, "zero", [4.0, -4.0, 0.0, 0.0, 6.0, 0.0]),
        # γ = +1 where Σ = 0: entry 2 keeps 0.5, entry 3 has nobody non-zero, entry 5 keeps τ₂ = 1
        (1.0, "positive", [2.0, -2.0, 0.5, 0.0, 3.0, 1.0]),
        (0.5, "positive", [1.0, -1.0, 0.25, 0.0, 1.5, 0.5]),
        # majority −1 where Σ = 0: entry 2 keeps −0.5, entry 3 has nobody non-zero, entry 5 keeps τ₁ = −1
        (1.0, "majority", [2.0, -2.0, -0.5, 0.0, 3.0, -1.0]),
    ],
)
def test_ties_merges_three_models_by_sign_election_and_disjoint_mean_scaled_by_alpha(
    alpha: float, zero_sign: str, expected: list[float]
) -> None:
    majority = -1 if zero_sign == "majority" else None
    out = ties([_t(_TAU_1), _t(_TAU_2), _t(_TAU_3)], alpha=alpha, zero_sign=zero_sign, majority=majority)
    assert torch.equal(out, _t(expected))


def test_ties_drops_entries_whose_sign_disagrees_with_the_elected_sign() -> None:
    # γ = + (4 − 1 − 1 = 2): the two −1 are dropped, not averaged in: τ* = 4, not 2/3
    out = ties([_t([4.0]), _t([-1.0]), _t([-1.0])])
    assert torch.equal(out, _t([4.0]))


def test_ties_keeps_the_shape_of_the_task_vectors() -> None:
    taus = [torch.ones(2, 3, 4), -torch.ones(2, 3, 4) * 0.5, torch.zeros(2, 3, 4)]
    out = ties(taus)
    assert out.shape == (2, 3, 4)
    assert torch.equal(out, torch.ones(2, 3, 4))  # γ = +: the mean of {1} is 1


@pytest.mark.parametrize("zero_sign", ["zero", "positive"])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_ties_of_all_zero_task_vectors_is_all_zero(zero_sign: str, alpha: float) -> None:
    out = ties([torch.zeros(5, 3) for _ in range(3)], alpha=alpha, zero_sign=zero_sign)
    assert torch.equal(out, torch.zeros(5, 3))


# ------------------------------------------------------------------------------------------ registry properties


# Methods for which a property below holds only up to float rounding, or not at all, by design (each says why);
# tests/merge/test_subspace.py states what they do instead.
NOT_ITS_OWN_TASK_VECTOR = {
    "tsv_m": "rebuilds τ from its singular vectors: equal to float32 rounding",
    "iso_c": "flattens τ's spectrum: one model comes back with every singular value set to their mean",
    "iso_cts": "flattens the spectrum as iso_c does",
}
INCREMENTAL_MEAN = {  # a tensor that is not a matrix is averaged incrementally, as the authors' code does
    "tsv_m": "mean += (τᵢ − mean)/(i+1): another order rounds differently",
    "iso_cts": "as tsv_m",
}
LAPACK_THREADS = {  # SVDs and matrix products through LAPACK/BLAS, whose blocking follows the thread count
    "tsv_m": "SVD",
    "iso_c": "SVD",
    "iso_cts": "SVD",
    "cart": "SVD",
    "wudi": "batched matmul in each Adam step",
}


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(NOT_ITS_OWN_TASK_VECTOR)))
@pytest.mark.parametrize("seed", [0, 1])
def test_a_single_model_merged_alone_reproduces_its_task_vector_exactly(name: str, seed: int) -> None:
    (tau,) = _float_task_vectors(1, (64, 33), seed)
    out = METHODS[name].merge([tau], alpha=1.0, zero_sign="zero")
    assert out.dtype == torch.float32
    assert torch.equal(out, tau)


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(INCREMENTAL_MEAN)))
@pytest.mark.parametrize("zero_sign", ["zero", "positive"])
def test_merging_does_not_depend_on_the_order_of_the_models(name: str, zero_sign: str) -> None:
    # multiples of 1/8 make every sum exact, so any permutation must give the same bits
    taus = _dyadic_task_vectors(4, 2000, seed=3)
    reference = METHODS[name].merge(taus, alpha=1.0, zero_sign=zero_sign)
    for perm in itertools.permutations(range(4)):
        out = METHODS[name].merge([taus[i] for i in perm], alpha=1.0, zero_sign=zero_sign)
        assert torch.equal(out, reference), perm


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merging_general_floats_in_another_model_order_differs_only_by_float_rounding(name: str) -> None:
    # float32 addition is not associative, so other orders may differ by rounding: at most a few ulps of the
    # magnitudes summed (Σ|τᵢ|), which bounds methods that add opposite signs (average, task arithmetic) too
    taus = _float_task_vectors(3, (5000,), seed=4)
    scale = torch.stack(taus).abs().sum(0)
    reference = METHODS[name].merge(taus, alpha=1.0, zero_sign="zero")
    for perm in itertools.permutations(range(3)):
        out = METHODS[name].merge([taus[i] for i in perm], alpha=1.0, zero_sign="zero")
        assert torch.all((out - reference).abs() <= 1e-6 * scale + 1e-12), perm


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merging_is_bit_identical_across_runs_and_thread_counts(name: str, restore_threads: None) -> None:
    """Every method gives the same bits on every run; an elementwise one also whatever the thread count. A method
    that goes through LAPACK (SVDs) or BLAS products is bit-identical at a given thread count and machine, and
    within float32 rounding of it at another (docs/method.md §8.1)."""
    taus = _float_task_vectors(3, (256, 384), seed=5)  # large enough for intra-op parallelism
    kwargs = {"alpha": 0.7, "zero_sign": "zero", "iterations": 3}
    torch.set_num_threads(1)
    one_thread = METHODS[name].merge(taus, **kwargs)
    one_thread_again = METHODS[name].merge(taus, **kwargs)
    torch.set_num_threads(2)
    two_threads = METHODS[name].merge(taus, **kwargs)
    two_threads_again = METHODS[name].merge(taus, **kwargs)
    assert torch.equal(one_thread, one_thread_again) and torch.equal(two_threads, two_threads_again)
    if name in LAPACK_THREADS:  # rounding, amplified only by the spectrum's conditioning: 1e-5 of the norm here
        assert float((one_thread - two_threads).norm()) <= 1e-4 * float(one_thread.norm())
    else:
        assert torch.equal(one_thread, two_threads)


def test_the_registry_holds_ties_with_trimming() -> None:
    method = METHODS["ties"]
    assert method.name == "ties"
    assert method.fn is ties
    assert method.uses_trim is True
    assert method.summary


@pytest.fixture
def scratch_method_name() -> Iterator[str]:
    name = "test-scratch-method"
    assert name not in METHODS
    yield name
    METHODS.pop(name, None)


def test_registering_a_new_method_makes_it_available_by_name(scratch_method_name: str) -> None:
    @register_method(scratch_method_name, accepts=("alpha",), summary="sum")
    def summed(taus, *, alpha=1.0):
        return alpha * torch.stack(list(taus)).sum(0)

    assert METHODS[scratch_method_name].fn is summed
    assert METHODS[scratch_method_name].uses_trim is False


def test_registering_a_name_twice_raises_key_error_and_keeps_the_first(scratch_method_name: str) -> None:
    original = METHODS["ties"]
    with pytest.raises(KeyError, match="'ties' is already registered"):
        register_method("ties", accepts=(), summary="impostor")(lambda taus: taus[0])
    assert METHODS["ties"] is original

    register_method(scratch_method_name, accepts=(), summary="first")(lambda taus: taus[0])
    with pytest.raises(KeyError):
        register_method(scratch_method_name, accepts=(), summary="second")(lambda taus: taus[1])
    assert METHODS[scratch_method_name].summary == "first"
