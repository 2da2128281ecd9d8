"""Subspace merge methods (TSV-M, Iso-C, Iso-CTS, WUDI): hand-computed cases, and their place in the registry.

Parity with the authors' code (FusionBench's copies) is in tests/peers/test_fusion_bench_subspace_parity.py.
"""

from __future__ import annotations

import pytest
import torch

import mmer
from mmer.config import MergeOptions, ModelSpec, Recipe
from mmer.errors import ConfigError
from mmer.merge import subspace
from mmer.merge.methods import METHODS


def diag(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=torch.float32))


# Two tasks whose weight changes live in orthogonal subspaces (rows and columns): nothing interferes.
ORTHOGONAL = [diag(3.0, 1.0, 0.0, 0.0), diag(0.0, 0.0, 2.0, 0.5)]


def test_tsv_m_of_tasks_in_orthogonal_subspaces_is_their_sum():
    """Each task keeps its top 4/2 = 2 singular triplets, which together are already orthonormal."""
    torch.testing.assert_close(subspace.tsv_m(ORTHOGONAL), diag(3.0, 1.0, 2.0, 0.5), rtol=0, atol=1e-6)


def test_tsv_m_of_one_task_is_that_task():
    tau = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(subspace.tsv_m([tau]), tau, rtol=0, atol=1e-5)


def test_tsv_m_keeps_only_each_tasks_top_rank_over_n_singular_directions():
    """Rank 6, three tasks: each keeps its top 2 directions. Task 1's third (0.2 along e5) is dropped, although
    task 3 moves along e5 too: τ* there is task 3's 1.5, not the sum 1.7 that task arithmetic would give."""
    three = [diag(3, 1, 0, 0, 0.2, 0), diag(0, 0, 2, 0.5, 0, 0), diag(0, 0, 0, 0, 1.5, 0.7)]
    torch.testing.assert_close(subspace.tsv_m(three), diag(3, 1, 2, 0.5, 1.5, 0.7), rtol=0, atol=1e-6)


def test_tsv_m_weights_scale_each_task_before_its_svd():
    g = torch.Generator().manual_seed(7)
    taus = [torch.randn(6, 4, generator=g) for _ in range(2)]
    weighted = METHODS["tsv_m"].merge(taus, weights=(2.0, 0.5))
    assert torch.equal(weighted, subspace.tsv_m([2.0 * taus[0], 0.5 * taus[1]]))


def test_iso_c_flattens_the_spectrum_of_the_sum():
    """Σ τᵢ = diag(4, 2): singular values 4 and 2, their mean 3, same singular vectors."""
    torch.testing.assert_close(subspace.iso_c([diag(3.0, 1.0), diag(1.0, 1.0)]), diag(3.0, 3.0), rtol=0, atol=1e-6)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    g = torch.Generator().manual_seed(2)
    taus = [torch.randn(8, 6, generator=g) for _ in range(3)]
    torch.testing.assert_close(subspace.iso_cts(taus, common_space=1.0), subspace.iso_c(taus), rtol=1e-5, atol=1e-5)


def test_iso_cts_gives_every_direction_it_keeps_the_same_singular_value():
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(8, 6, generator=g) for _ in range(2)]
    values = torch.linalg.svdvals(subspace.iso_cts(taus, common_space=0.5))
    torch.testing.assert_close(values, torch.full_like(values, float(values.mean())), rtol=1e-5, atol=1e-5)


def test_cart_adds_each_tasks_top_deviation_from_the_mean():
    """τ̄ = diag(2, 1.5, 0); deviations (4, −1.5, 0), (−2, 3, 0), (−2, −1.5, 0) keep their largest direction
    each at rank 1 (0.3 of 3): (4, 0, 0) + (0, 3, 0) + (−2, 0, 0) = (2, 3, 0); τ* = τ̄ + α·that."""
    taus = [diag(6, 0, 0), diag(0, 4.5, 0), diag(0, 0, 0)]
    got = METHODS["cart"].merge(taus, alpha=0.5, rank_fraction=0.3)
    torch.testing.assert_close(got, diag(3.0, 3.0, 0.0), rtol=0, atol=1e-6)


def test_cart_at_full_rank_is_the_mean_task_vector_whatever_alpha():
    """The centred deviations sum to 0, so keeping all of them adds nothing: weight averaging."""
    g = torch.Generator().manual_seed(5)
    taus = [torch.randn(5, 4, generator=g) for _ in range(3)]
    got = METHODS["cart"].merge(taus, alpha=1.7, rank_fraction=1.0)
    torch.testing.assert_close(got, torch.stack(taus).mean(0), rtol=1e-5, atol=1e-5)


def _wudi_as_written(taus: list[torch.Tensor], iterations: int) -> torch.Tensor:
    """The objective as the paper and its code write it: Σᵢ ‖(τ* − τᵢ)τᵢᵀ‖² / ‖τᵢ‖², rows × rows products."""
    tvs = torch.stack(taus)
    merged = torch.nn.Parameter(tvs.sum(0))
    optimizer = torch.optim.Adam([merged], lr=1e-5)
    norms = tvs.reshape(len(taus), -1).norm(dim=-1).square()
    for _ in range(iterations):
        loss = ((merged.unsqueeze(0) - tvs) @ tvs.transpose(1, 2)).square().div(norms[:, None, None]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


def test_wudi_on_a_tall_matrix_minimises_the_same_objective_through_column_grams():
    """A vocabulary-shaped matrix (more rows than columns) takes ⟨DᵀD, τᵢᵀτᵢ⟩ instead of ‖Dτᵢᵀ‖²: the same
    objective and gradients without a rows × rows product, so the same Adam steps to float32 rounding."""
    g = torch.Generator().manual_seed(6)
    taus = [torch.randn(40, 6, generator=g) * 1e-2 for _ in range(2)]
    torch.testing.assert_close(subspace.wudi(taus, iterations=50), _wudi_as_written(taus, 50), rtol=1e-4, atol=1e-7)


def test_wudi_leaves_the_sum_of_non_interfering_tasks_where_it_starts():
    """(τ* − τᵢ)τᵢᵀ = τⱼτᵢᵀ = 0 when the tasks' rows are orthogonal: the loss is 0 at Σ τᵢ, so Adam stays there."""
    torch.testing.assert_close(subspace.wudi(ORTHOGONAL, iterations=25), diag(3.0, 1.0, 2.0, 0.5), rtol=0, atol=0)


def test_wudi_moves_towards_each_tasks_own_projection_when_tasks_interfere():
    g = torch.Generator().manual_seed(4)
    taus = [torch.randn(6, 5, generator=g) * 1e-3 for _ in range(2)]
    loss = lambda t: sum(float(((t - x) @ x.T).square().sum() / x.square().sum()) for x in taus)  # noqa: E731
    start = loss(taus[0] + taus[1])
    assert loss(subspace.wudi(taus, iterations=200)) < start


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "cart", "wudi"])
def test_a_task_that_left_a_matrix_untouched_gives_a_finite_merge(method):
    taus = [diag(3.0, 1.0, 0.5, 0.25), torch.zeros(4, 4)]
    assert torch.isfinite(METHODS[method].merge(taus, iterations=5)).all()  # each method takes what it reads


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "cart", "wudi"])
def test_a_tensor_that_is_not_a_matrix_is_averaged(method):
    norms = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])]
    torch.testing.assert_close(METHODS[method].merge(norms), torch.tensor([2.0, 2.0, 2.0]))


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "cart", "wudi"])
def test_subspace_methods_are_registered_as_whole_tensor_methods_without_trim_or_dare(method):
    registered = METHODS[method]
    assert not registered.elementwise and not registered.uses_trim
    assert "dare" not in registered.accepts and "alpha" in registered.accepts


def test_alpha_scales_the_merged_task_vector():
    torch.testing.assert_close(
        METHODS["iso_c"].merge([diag(3.0, 1.0), diag(1.0, 1.0)], alpha=0.5), diag(1.5, 1.5), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(("method", "option"), [("tsv_m", {"common_space": 0.5}), ("iso_c", {"iterations": 10})])
def test_an_option_of_another_subspace_method_is_refused_by_name(method, option):
    from mmer.plan import check_registries

    recipe = Recipe(ModelSpec("base"), (ModelSpec("v", modality="vision"),), MergeOptions(method=method, **option))
    with pytest.raises(ConfigError) as info:
        check_registries(recipe)
    assert next(iter(option)) in info.value.message


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_common_space_out_of_range_is_refused(value):
    with pytest.raises(ConfigError) as info:
        MergeOptions(method="iso_cts", common_space=value)
    assert info.value.key == "common_space"


@pytest.mark.parametrize("method", ["iso_cts", "cart"])
def test_a_subspace_merge_streams_whole_slots_and_masks_on_top(demo_models, tmp_path, method):
    """Through the whole pipeline: τ* of a slot is the method applied to the slot's task vectors, and the MMER
    masks are computed against that τ* (the question mmer compare can ask: do masks help a stronger merge?)."""
    from mmer.config import build_recipe

    recipe = build_recipe(list(demo_models.specs), method=method, mask="mmer")
    out = tmp_path / "out"
    mmer.run_merge(recipe, out)
    with mmer.load_decoupled(out) as ckpt:
        slot = next(s for s in ckpt.merged_slots if len(s.shape) == 2)
        base = ckpt.base_tensor(slot.name).float()
        taus = []
        for spec in recipe.models:
            from mmer.io.reader import CheckpointReader

            with CheckpointReader(spec.model) as reader:
                name = next(n for n in reader.tensors if n.endswith(slot.name.removeprefix("model.")))
                taus.append(reader.get(name).float()[: base.shape[0]] - base)
        want = METHODS[method].merge(taus).to(ckpt.tau_star(slot.name).dtype)
        torch.testing.assert_close(ckpt.tau_star(slot.name), want, rtol=0, atol=0)
        assert ckpt.mask("vision", slot.name).any()
