"""Specifies mmer/mergekit_config.py: a mergekit config is read as the mmer recipe that computes the same merge,
and every key mmer cannot honour is refused by name with a fix.

The translations themselves are checked against mergekit's output in tests/peers/test_mergekit_config_parity.py;
here they are checked against what mergekit's code says each method does, without mergekit installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import cli
from safetensors.torch import load_file

from mmer.config import MergeOptions, build_recipe, config_kind, load_recipe, modality_for, read_config
from mmer.errors import ConfigError


def _config(tmp_path: Path, data: dict, name: str = "mergekit.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _ties(**overrides) -> dict:
    data = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/base"},
            {"model": "org/vision-ft", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "org/audio-ft", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }
    data.update(overrides)
    return data


def _refusal(tmp_path: Path, data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_recipe([_config(tmp_path, data)])
    err = info.value
    assert err.file and err.file.endswith("mergekit.yml")
    assert err.hint, "every refusal says what to do instead"
    return err


# --------------------------------------------------------------------------------------------- the shapes


def test_a_mergekit_config_is_told_from_a_recipe_and_a_spec_by_its_keys() -> None:
    assert config_kind(_ties()) == "mergekit"
    assert config_kind({"base": "org/base", "models": []}) == "recipe"
    assert config_kind({"options": {"k": 0.5}}) == "recipe"
    assert config_kind({"model": "org/vision", "modality": "vision"}) == "spec"


def test_mmer_merge_on_a_mergekit_config_no_longer_answers_unknown_key_models(tmp_path: Path) -> None:
    recipe = build_recipe([_config(tmp_path, _ties())])
    assert recipe.source is not None and recipe.source.kind == "mergekit"
    assert recipe.base.model == "org/base"
    assert [m.model for m in recipe.models] == ["org/vision-ft", "org/audio-ft"]  # the base entry is the base


# --------------------------------------------------------------------------------------- each method's map


def test_ties_maps_onto_mergekits_semantics_per_tensor_exact_trim_weighted_election_positive_zero_sign(
    tmp_path: Path,
) -> None:
    recipe = build_recipe([_config(tmp_path, _ties())])
    assert recipe.options == MergeOptions(
        method="ties",
        mask="none",
        k=0.5,
        alpha=1.0,
        trim_scope="per-tensor",
        trim_count="exact",
        elect_on="weighted",
        zero_sign="positive",
        aggregate="mean",
    )
    assert [m.weight for m in recipe.models] == [1.0, 0.5]


def test_ties_without_normalize_sums_the_agreeing_deltas_and_lambda_scales_tau_star(tmp_path: Path) -> None:
    recipe = build_recipe([_config(tmp_path, _ties(parameters={"normalize": False, "lambda": 0.7}))])
    assert recipe.options.aggregate == "sum"
    assert recipe.options.alpha == 0.7


def test_ties_without_density_keeps_every_entry_as_mergekit_does(tmp_path: Path) -> None:
    data = _ties(models=[{"model": "org/vision-ft", "parameters": {"weight": 1.0}}])
    assert build_recipe([_config(tmp_path, data)]).options.k == 1.0


def test_top_level_parameters_are_defaults_that_a_models_own_parameters_override(tmp_path: Path) -> None:
    data = _ties(
        models=[{"model": "org/a"}, {"model": "org/b", "parameters": {"weight": 2.0}}],
        parameters={"weight": 0.5, "density": 0.3},
    )
    recipe = build_recipe([_config(tmp_path, data)])
    assert [m.weight for m in recipe.models] == [0.5, 2.0]
    assert recipe.options.k == 0.3
    assert recipe.options.aggregate == "mean"  # ties normalizes by default


def test_dare_ties_drops_with_p_one_minus_density_does_not_trim_and_sums_by_default(tmp_path: Path) -> None:
    data = _ties(merge_method="dare_ties", parameters={})
    recipe = build_recipe([_config(tmp_path, data)])
    assert recipe.options.method == "ties"
    assert recipe.options.dare == 0.5 and recipe.options.k == 1.0
    assert recipe.options.aggregate == "sum"  # mergekit's dare_ties does not normalize by default
    assert any("expectation" in note for note in recipe.source.notes)


def test_different_densities_per_model_become_each_models_own_k_next_to_it(tmp_path: Path) -> None:
    data = _ties(
        models=[
            {"model": "org/a", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "org/b", "parameters": {"weight": 1.0, "density": 0.7}},
            {"model": "org/c", "parameters": {"weight": 1.0}},  # no density: mergekit keeps all of it
        ]
    )
    recipe = build_recipe([_config(tmp_path, data)])
    assert [m.k for m in recipe.models] == [0.5, 0.7, 1.0]
    assert recipe.ks == (0.5, 0.7, 1.0) and [m.dare for m in recipe.models] == [None] * 3
    assert (recipe.options.trim_scope, recipe.options.trim_count, recipe.options.k) == ("per-tensor", "exact", 1.0)


def test_dare_ties_with_different_densities_drops_each_model_at_its_own_p(tmp_path: Path) -> None:
    data = _ties(
        merge_method="dare_ties",
        models=[
            {"model": "org/a", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "org/b", "parameters": {"weight": 1.0, "density": 0.75}},
        ],
        parameters={},
    )
    recipe = build_recipe([_config(tmp_path, data)])
    assert [m.dare for m in recipe.models] == [0.5, 0.25] and recipe.options.dare == 0.0
    assert [m.k for m in recipe.models] == [None, None] and recipe.options.k == 1.0


def test_equal_densities_stay_one_merge_wide_value(tmp_path: Path) -> None:
    recipe = build_recipe([_config(tmp_path, _ties())])
    assert recipe.options.k == 0.5 and [m.k for m in recipe.models] == [None, None]


@pytest.mark.parametrize(("normalize", "method"), [(False, "task_arithmetic"), (True, "average")])
def test_task_arithmetic_is_alpha_times_the_weighted_sum_or_the_weighted_mean_when_normalized(
    tmp_path: Path, normalize: bool, method: str
) -> None:
    data = _ties(merge_method="task_arithmetic", parameters={"normalize": normalize, "lambda": 0.6})
    data["models"] = [
        {"model": "org/a", "parameters": {"weight": 1.0}},
        {"model": "org/b", "parameters": {"weight": 3}},
    ]
    recipe = build_recipe([_config(tmp_path, data)])
    assert (recipe.options.method, recipe.options.alpha, recipe.options.k) == (method, 0.6, 0.8)
    assert recipe.options.dare == 0.0
    assert [m.weight for m in recipe.models] == [1.0, 3.0]


def test_dare_linear_is_task_arithmetic_after_dare(tmp_path: Path) -> None:
    data = _ties(merge_method="dare_linear", parameters={"density": 0.8})
    data["models"] = [{"model": "org/a", "parameters": {"weight": 1.0}}]
    options = build_recipe([_config(tmp_path, data)]).options
    assert (options.method, options.dare, options.alpha) == ("task_arithmetic", pytest.approx(0.2), 1.0)


def test_linear_is_the_weighted_average_of_the_fine_tunes_or_counts_the_base_when_it_is_listed(
    tmp_path: Path,
) -> None:
    models = [{"model": "org/a", "parameters": {"weight": 1.0}}, {"model": "org/b", "parameters": {"weight": 3.0}}]
    data = {"merge_method": "linear", "base_model": "org/base", "models": models}
    options = build_recipe([_config(tmp_path, data)]).options
    assert (options.method, options.alpha) == ("average", 1.0)
    listed = {**data, "models": [{"model": "org/base", "parameters": {"weight": 2.0}}, *models]}
    options = build_recipe([_config(tmp_path, listed)]).options
    # (2·θ_base + θ_a + 3·θ_b) / 6 = θ_base + (τ_a + 3·τ_b) / 6
    assert (options.method, options.alpha) == ("task_arithmetic", pytest.approx(1 / 6))


def test_masks_are_off_unless_asked_for_and_a_flag_asks_for_them(tmp_path: Path) -> None:
    path = _config(tmp_path, _ties())
    assert build_recipe([path]).options.mask == "none"
    assert build_recipe([path], mask="mmer").options.mask == "mmer"


def test_a_revision_after_at_becomes_the_specs_revision_and_modalities_are_named_after_the_models(
    tmp_path: Path,
) -> None:
    data = _ties(
        models=[
            {"model": "Qwen/Qwen2.5-VL@abc123", "parameters": {"weight": 1.0}},
            {"model": "other/Qwen2.5-VL", "parameters": {"weight": 1.0}},
        ]
    )
    recipe = build_recipe([_config(tmp_path, data)])
    assert (recipe.models[0].model, recipe.models[0].revision) == ("Qwen/Qwen2.5-VL", "abc123")
    assert [m.modality for m in recipe.models] == ["qwen2_5-vl", "qwen2_5-vl-2"]


def test_modality_names_are_valid_unique_and_never_reserved() -> None:
    assert modality_for("/models/Base", []) == "base-2"
    assert modality_for("org/123-Vision", []) == "vision"
    assert modality_for("org/!!!", []) == "model"
    assert modality_for("a/x", ["x"]) == "x-2"


def test_load_recipe_reads_a_mergekit_config_for_library_users(tmp_path: Path) -> None:
    base, models, options = load_recipe(_config(tmp_path, _ties()))
    assert base is not None and base.model == "org/base"
    assert len(models) == 2 and options.method == "ties"


def test_the_translated_recipe_reads_back_as_the_same_recipe(tmp_path: Path) -> None:
    recipe = build_recipe([_config(tmp_path, _ties())])
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_compact_yaml(), encoding="utf-8")
    assert read_config(again).source.kind == "recipe"
    assert build_recipe([again]) == recipe


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("slices", [{"sources": [{"model": "org/a", "layer_range": [0, 4]}]}], "frankenmerge"),
        ("modules", {"text": {"models": [{"model": "org/a"}]}}, "per-module"),
        ("tokenizer", {"source": "union"}, "vocabulary"),
        ("chat_template", "chatml", "template"),
        ("tokenizer_source", "union", "tokenizer"),
        ("tokenizer_source", "org/other", "tokenizer"),
    ],
)
def test_mergekit_keys_mmer_cannot_honour_are_refused_by_name(tmp_path: Path, key, value, says) -> None:
    err = _refusal(tmp_path, _ties(**{key: value}))
    assert err.key == key
    assert key in err.message and says in err.message


def test_tokenizer_source_base_is_what_mmer_does_and_is_accepted(tmp_path: Path) -> None:
    assert build_recipe([_config(tmp_path, _ties(tokenizer_source="base"))]).options.method == "ties"


@pytest.mark.parametrize(("method", "hint"), [("slerp", "mergekit"), ("model_stock", "mergekit"), ("tiess", "ties")])
def test_a_method_mmer_does_not_have_is_refused_by_name(tmp_path: Path, method: str, hint: str) -> None:
    err = _refusal(tmp_path, _ties(merge_method=method))
    assert err.key == "merge_method" and method in err.message and hint in err.hint


def test_an_unknown_top_level_key_is_refused_with_the_closest_key(tmp_path: Path) -> None:
    err = _refusal(tmp_path, _ties(base_modle="org/base"))
    assert err.key == "base_modle" and "base_model" in err.hint


@pytest.mark.parametrize(
    ("parameters", "key", "says"),
    [
        ({"weight": [0.2, 0.8]}, "weight", "gradient"),
        ({"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.3}]}, "density", "filter"),
        ({"weight": -1.0}, "weight", "> 0"),
        ({"weight": 0}, "weight", "> 0"),
        ({"density": 1.5}, "density", "out of range"),
        ({"weight": "heavy"}, "weight", "number"),
        ({"epsilon": 0.1}, "epsilon", "not one"),
    ],
)
def test_a_parameter_mmer_cannot_honour_is_refused_by_name(tmp_path: Path, parameters, key, says) -> None:
    data = _ties(models=[{"model": "org/a", "parameters": {"weight": 1.0, **parameters}}])
    err = _refusal(tmp_path, data)
    assert err.key == key and says in err.message


def test_a_model_without_weight_is_refused_as_mergekit_refuses_it(tmp_path: Path) -> None:
    err = _refusal(tmp_path, _ties(models=[{"model": "org/a", "parameters": {"density": 0.5}}]))
    assert err.key == "weight" and "org/a" in err.message


def test_a_setting_for_the_whole_merge_given_on_one_model_is_refused(tmp_path: Path) -> None:
    err = _refusal(tmp_path, _ties(models=[{"model": "org/a", "parameters": {"weight": 1.0, "normalize": False}}]))
    assert err.key == "normalize" and "top-level" in err.hint


def test_density_on_task_arithmetic_is_refused_because_mergekit_ignores_it_too(tmp_path: Path) -> None:
    data = _ties(merge_method="task_arithmetic", parameters={})
    err = _refusal(tmp_path, data)
    assert err.key == "density" and "ignores" in err.hint


@pytest.mark.parametrize(("method", "rescale"), [("dare_ties", False), ("dare_linear", False), ("ties", True)])
def test_a_rescale_mmer_does_not_do_is_refused(tmp_path: Path, method: str, rescale: bool) -> None:
    err = _refusal(tmp_path, _ties(merge_method=method, parameters={"rescale": rescale}))
    assert err.key == "rescale"


def test_linear_without_normalize_is_refused_unless_the_weights_sum_to_one(tmp_path: Path) -> None:
    models = [{"model": "org/a", "parameters": {"weight": 0.5}}, {"model": "org/b", "parameters": {"weight": 1.0}}]
    data = {"merge_method": "linear", "base_model": "org/base", "models": models, "parameters": {"normalize": False}}
    err = _refusal(tmp_path, data)
    assert err.key == "normalize" and "1.5" in err.message
    models[1]["parameters"]["weight"] = 0.5
    options = build_recipe([_config(tmp_path, data)]).options
    assert (options.method, options.alpha) == ("task_arithmetic", 1.0)


def test_a_config_without_base_model_is_refused_with_the_fix(tmp_path: Path) -> None:
    data = _ties()
    del data["base_model"]
    err = _refusal(tmp_path, data)
    assert err.key == "base_model" and "base_model:" in err.hint


def test_a_lora_reference_is_refused(tmp_path: Path) -> None:
    err = _refusal(tmp_path, _ties(models=[{"model": "org/a+org/lora", "parameters": {"weight": 1.0}}]))
    assert "LoRA" in err.message and "merge_and_unload" in err.hint


def test_an_unknown_dtype_is_refused(tmp_path: Path) -> None:
    err = _refusal(tmp_path, _ties(dtype="float8"))
    assert err.key == "dtype"


# ------------------------------------------------------------------------------------------- the command


@pytest.fixture
def mergekit_file(tiny_models, tmp_path: Path) -> Path:
    """A mergekit TIES config over the tiny float32 models, paths relative to the config's directory."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("base", "vision", "audio"):
        (models / name).symlink_to(tiny_models[f"{name}_dir"], target_is_directory=True)
    data = _ties(
        base_model="models/base",
        models=[
            {"model": "models/base"},
            {"model": "models/vision", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "models/audio", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        dtype="float32",
    )
    return _config(tmp_path, data)


def test_dry_run_prints_the_equivalent_mmer_recipe_and_that_recipe_runs(mergekit_file: Path, tmp_path: Path) -> None:
    result = cli("merge", str(mergekit_file), "--dry-run")
    assert result.exit_code == 0, str(result)
    assert "is a mergekit config; mmer runs it as this recipe" in result.stdout
    printed = result.stdout.split("recipe:\n", 1)[1].split("\n\n", 1)[0]
    recipe = yaml.safe_load(printed)
    assert recipe["options"]["mask"] == "none" and recipe["options"]["trim_scope"] == "per-tensor"
    assert recipe["base"]["model"] == str(tmp_path.resolve() / "models" / "base")
    saved = tmp_path / "saved" / "recipe.yaml"
    saved.parent.mkdir()
    saved.write_text(printed, encoding="utf-8")
    assert build_recipe([saved]) == build_recipe([mergekit_file])


def test_dry_run_of_different_densities_prints_each_models_k_and_that_recipe_merges_the_same(
    mergekit_file: Path, tmp_path: Path
) -> None:
    data = yaml.safe_load(mergekit_file.read_text())
    data["models"][2]["parameters"]["density"] = 0.8
    mergekit_file.write_text(yaml.safe_dump(data))
    result = cli("merge", str(mergekit_file), "--dry-run")
    assert result.exit_code == 0, str(result)
    printed = result.stdout.split("recipe:\n", 1)[1].split("\n\n", 1)[0]
    assert [m["k"] for m in yaml.safe_load(printed)["models"]] == [0.5, 0.8]
    assert "per-model K: vision=0.5, audio=0.8" in result.stdout  # the plan says each model's K too
    saved = tmp_path / "recipe.yaml"
    saved.write_text(printed, encoding="utf-8")
    assert build_recipe([saved]) == build_recipe([mergekit_file])
    for name, source in (("from-mergekit", mergekit_file), ("from-recipe", saved)):
        assert cli("merge", str(source), "-o", str(tmp_path / name)).exit_code == 0
    ours, again = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("from-mergekit", "from-recipe"))
    assert all(torch.equal(ours[n], again[n]) for n in ours)


def test_a_mergekit_config_merges_and_says_so_under_json(mergekit_file: Path, tmp_path: Path) -> None:
    result = cli("merge", str(mergekit_file), "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, str(result)
    data = json.loads(result.stdout)
    assert data["ok"] and data["mergekit"]["recipe"]["options"]["method"] == "ties"
    assert any("argsort" in note for note in data["mergekit"]["notes"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_dtype_other_than_the_bases_is_refused_before_any_weight_is_read(mergekit_file: Path, tmp_path) -> None:
    data = yaml.safe_load(mergekit_file.read_text())
    data["dtype"] = "bfloat16"
    mergekit_file.write_text(yaml.safe_dump(data))
    result = cli("merge", str(mergekit_file), "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error["key"] == "dtype" and "float32" in error["message"]
    assert not (tmp_path / "out").exists()
