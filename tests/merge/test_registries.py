"""Specifies the registries' declarations (mmer/merge/methods.py, masks.py) and the rules that follow from them:
an option a recipe sets must apply to the chosen method and mask rule (mmer/plan.py ``check_registries``), a
default never counts as set, ``mmer compare`` may share options across variants, and the fused kernel covers a
variant only where it declares every option the variant's method and rule take (mmer/merge/one_pass.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmer.config import MergeOptions, ModelSpec, Recipe
from mmer.errors import ConfigError
from mmer.merge import one_pass
from mmer.merge.masks import MASK_OPTIONS, MASKS
from mmer.merge.methods import METHOD_OPTIONS, METHODS, SUBSPACE_OPTIONS, SignCensus, register_method
from mmer.plan import check_registries, resolve_variant


def _recipe(weights: tuple[float | None, float | None] = (None, None), lam: float | None = None, **options) -> Recipe:
    models = tuple(
        ModelSpec(f"models/{m}", modality=m, weight=w, lambda_=lam if m == "vision" else None)
        for m, w in zip(("vision", "audio"), weights, strict=True)
    )
    return Recipe(ModelSpec("models/base"), models, MergeOptions(**options))


def _refusal(**kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        check_registries(_recipe(**kwargs))
    return info.value


# ------------------------------------------------------------------------------------------- declarations


def test_every_method_and_mask_rule_declares_only_known_options() -> None:
    for method in METHODS.values():
        assert method.accepts <= set(METHOD_OPTIONS), method.name
    for rule in MASKS.values():
        assert rule.accepts <= set(MASK_OPTIONS), rule.name


def test_ties_takes_every_option_but_the_subspace_ones_and_the_averaging_methods_take_weights_and_dare() -> None:
    assert METHODS["ties"].accepts == set(METHOD_OPTIONS) - set(SUBSPACE_OPTIONS)
    for name in ("average", "task_arithmetic"):
        assert METHODS[name].accepts == {"alpha", "weights", "dare", "dare_seed"}
        assert not METHODS[name].uses_trim
    assert METHODS["emr"].accepts == {"alpha"}


def test_the_none_mask_is_declared_as_a_rule_whose_output_is_one_merged_model() -> None:
    none = MASKS["none"]
    assert none.single_model_output and none.fn is None and none.accepts == frozenset()
    assert [name for name, rule in MASKS.items() if rule.single_model_output] == ["none"]


def test_a_rule_takes_lambda_exactly_when_it_has_a_default_lambda() -> None:
    for rule in MASKS.values():
        assert ("lambda" in rule.accepts) == (rule.default_lambda is not None), rule.name


def test_a_rule_that_compares_with_the_raw_task_vectors_takes_no_mask_source() -> None:
    assert MASKS["tall"].uses_raw and "mask_source" not in MASKS["tall"].accepts
    assert "mask_source" in MASKS["mmer"].accepts


def test_a_method_declaring_an_unknown_option_or_half_a_trim_is_refused_at_registration() -> None:
    with pytest.raises(ValueError, match="unknown options"):
        register_method("test-bogus-option", accepts=("alpha", "temperature"), summary="x")
    with pytest.raises(ValueError, match="trims"):
        register_method("test-half-trim", accepts=("k",), summary="x")
    with pytest.raises(ValueError, match="declares how it elects"):
        register_method("test-zero-sign", accepts=("zero_sign",), summary="x")
    assert not {"test-bogus-option", "test-half-trim", "test-zero-sign"} & set(METHODS)


def test_a_method_is_handed_the_majority_sign_only_when_it_takes_zero_sign() -> None:
    taus = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])]
    options = {"alpha": 1.0, "zero_sign": "majority", "majority": -1, "aggregate": "sum"}
    assert torch.equal(METHODS["average"].merge(taus, alpha=1.0, majority=-1), torch.tensor([2.0, 0.0]))
    # ties: Σ = 0 in the second entry elects the majority sign −1, and the agreeing −2 is summed
    assert torch.equal(METHODS["ties"].merge(taus, **options), torch.tensor([4.0, -2.0]))


def test_a_method_is_handed_only_the_options_it_declares() -> None:
    taus = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])]
    everything = {"weights": None, "alpha": 1.0, "zero_sign": "positive", "elect_on": "weighted", "aggregate": "sum"}
    assert torch.equal(METHODS["average"].merge(taus, **everything), torch.tensor([2.0, 0.0]))
    # ties reads them: Σ = 0 in the second entry elects γ = +1 (positive), and the agreeing 2 is summed
    assert torch.equal(METHODS["ties"].merge(taus, **everything), torch.tensor([4.0, 2.0]))


# ---------------------------------------------------------------------------------------- plan validation


@pytest.mark.parametrize(
    ("options", "option", "owner"),
    [
        ({"method": "average", "aggregate": "sum"}, "aggregate", "method average"),
        ({"method": "task_arithmetic", "elect_on": "weighted"}, "elect_on", "method task_arithmetic"),
        ({"method": "average", "zero_sign": "positive"}, "zero_sign", "method average"),
        ({"method": "average", "k": 0.5}, "k", "method average"),
        ({"method": "task_arithmetic", "trim_scope": "per-tensor"}, "trim_scope", "method task_arithmetic"),
        ({"method": "average", "trim_count": "exact"}, "trim_count", "method average"),
        ({"method": "emr", "mask": "emr", "dare": 0.2}, "dare", "method emr"),
        ({"method": "emr", "mask": "emr", "dare_seed": 3}, "dare_seed", "method emr"),
        ({"mask": "none", "lambda_": 0.5}, "lambda", "mask rule none"),
        ({"method": "emr", "mask": "emr", "lambda_": 0.5}, "lambda", "mask rule emr"),
        ({"mask": "sign_only", "lambda_": 0.5}, "lambda", "mask rule sign_only"),
        ({"method": "average", "zero_sign": "majority"}, "zero_sign", "method average"),
        ({"mask": "tall", "mask_source": "raw"}, "mask_source", "mask rule tall"),
        ({"mask": "none", "mask_source": "raw"}, "mask_source", "mask rule none"),
    ],
)
def test_an_option_that_does_not_apply_to_the_method_or_mask_rule_is_refused_naming_both_and_the_fix(
    options, option, owner
) -> None:
    err = _refusal(**options)
    assert str(err).startswith(f"{option} = ") and f"does not apply to {owner}: " in str(err)
    assert err.key == option
    assert err.hint and err.hint.startswith("remove ") and "that takes it: " in err.hint


def test_the_refusal_names_the_methods_that_do_take_the_option() -> None:
    assert _refusal(method="average", aggregate="sum").hint.endswith("a method that takes it: ties")
    assert _refusal(method="emr", mask="emr", dare=0.2).hint.endswith("average, task_arithmetic, ties")
    assert _refusal(mask="none", lambda_=0.5).hint.endswith("a mask rule that takes it: magnitude_only, mmer, tall")


def test_per_model_weights_count_as_set_options() -> None:
    err = _refusal(weights=(2.0, None), method="emr", mask="emr")
    assert err.key == "weight" and "weight:" in err.hint
    check_registries(_recipe(weights=(1.0, 1.0), method="emr", mask="emr"))  # weight 1 is the default


def test_a_model_spec_lambda_is_unused_by_a_rule_without_lambda_and_the_plan_says_so() -> None:
    from mmer.plan import unused_lambdas

    # A spec describes a model and is reused with every rule: its λ is not an option the user set for this merge.
    check_registries(_recipe(lam=0.7, mask="none", method="average"))
    assert unused_lambdas(_recipe(lam=0.7, mask="emr", method="emr")) == [
        "λ from the model specs (vision=0.7) is not used: mask rule emr has no λ"
    ]
    assert unused_lambdas(_recipe(lam=0.7)) == []  # mmer's rule takes it
    assert _refusal(mask="none", method="average", lambda_=0.7).key == "lambda"  # the recipe's own λ is refused


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_options_at_their_defaults_never_count_as_set(method, mask) -> None:
    rule = MASKS[mask]
    if rule.pairs_with is not None and method not in rule.pairs_with:
        pytest.skip("an unpaired combination")
    check_registries(_recipe(method=method, mask=mask, alpha=1.0))  # α applies to every method


@pytest.mark.parametrize(("method", "mask"), [("average", "none"), ("emr", "emr"), ("task_arithmetic", "tall")])
def test_the_recipe_mmer_writes_lists_every_option_and_still_reloads_and_plans(tiny_models, tmp_path, method, mask):
    import mmer
    from mmer.config import build_recipe

    models = (ModelSpec(str(tiny_models["vision_dir"]), modality="vision"),)
    recipe = Recipe(ModelSpec(str(tiny_models["base_dir"])), models, MergeOptions(method=method, mask=mask))
    mmer.run_merge(recipe, tmp_path / "out")
    written = (tmp_path / "out" / "mmer_recipe.yaml").read_text()
    assert "aggregate:" in written and "elect_on:" in written and "mask_source:" in written
    check_registries(build_recipe(recipe_file=tmp_path / "out" / "mmer_recipe.yaml"))


def test_a_mask_rule_defined_on_one_method_only_is_refused_with_another_naming_the_pair() -> None:
    err = _refusal(method="ties", mask="emr")
    assert str(err).startswith("mask emr with method ties: ") and err.key == "mask"
    assert err.hint == "use --method emr --mask emr"


def test_an_unknown_mask_rule_lists_the_declared_ones_including_none() -> None:
    err = _refusal(mask="bogus")
    assert err.key == "mask" and "none (one merged model)" in err.hint and "mmer" in err.hint


def test_options_shared_by_several_variants_need_not_apply_to_each_but_dare_and_weights_must() -> None:
    from mmer.compare import SHARED_OPTIONS

    check_registries(_recipe(method="average", mask="none", k=0.5, lambda_=0.7), shared=SHARED_OPTIONS)
    with pytest.raises(ConfigError, match="dare"):
        check_registries(_recipe(method="emr", mask="emr", dare=0.3), shared=SHARED_OPTIONS)
    with pytest.raises(ConfigError, match="weights"):
        check_registries(_recipe(weights=(2.0, None), method="emr", mask="emr"), shared=SHARED_OPTIONS)


# ----------------------------------------------------------------------------------------- fused coverage


def _supports(**options) -> bool:
    variant = resolve_variant(_recipe(**options))
    return one_pass.supports(variant, [torch.bfloat16] * 2, torch.bfloat16, torch.device("cpu"))


@pytest.fixture
def kernel_present(monkeypatch):
    monkeypatch.setattr(one_pass, "reads", lambda dtypes, device: True)


def test_the_kernel_declares_a_value_rule_for_every_option_its_method_and_mask_rule_take() -> None:
    taken = METHODS[one_pass.KERNEL_METHOD].accepts.union(*(MASKS[m].accepts for m in one_pass.KERNEL_MASKS))
    assert taken <= set(one_pass.KERNEL_COVERS)


@pytest.mark.usefixtures("kernel_present")
def test_the_kernel_covers_the_default_variant_and_falls_back_on_any_value_it_does_not_implement() -> None:
    assert _supports()
    assert _supports(zero_sign="positive")
    assert _supports(elect_on="weighted")  # without weights it elects on Σ τᵢ, as raw does
    assert not _supports(weights=(2.0, None), elect_on="weighted")
    assert not _supports(aggregate="sum")
    assert not _supports(mask_source="raw")
    assert not _supports(dare=0.1)
    assert not _supports(trim_scope="per-tensor")
    assert _supports(trim_scope="per-tensor", k=1.0)  # nothing to trim
    assert not _supports(method="average")
    assert not _supports(mask="tall")
    assert _supports(mask="sign_only") and _supports(mask="magnitude_only")  # Table 5's ablations


@pytest.mark.usefixtures("kernel_present")
def test_the_kernel_takes_the_majority_rule_once_the_census_is_counted() -> None:
    variant = resolve_variant(_recipe(zero_sign="majority"))
    assert not one_pass.supports(variant, [torch.bfloat16] * 2, torch.bfloat16, torch.device("cpu"))
    counted = replace(variant, census=SignCensus(positive=5, negative=7))
    assert one_pass.supports(counted, [torch.bfloat16] * 2, torch.bfloat16, torch.device("cpu"))


@pytest.mark.usefixtures("kernel_present")
def test_an_option_the_method_gains_that_the_kernel_does_not_declare_falls_back_to_the_eager_path(monkeypatch):
    ties = METHODS["ties"]
    monkeypatch.setitem(METHODS, "ties", replace(ties, accepts=ties.accepts | {"temperature"}))
    assert not _supports()
