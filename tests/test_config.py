"""Specifies mmer/config.py: strict loading of model specs and recipes, ranges, sizes and overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mmer.config import (
    MergeOptions,
    ModelSpec,
    Recipe,
    load_recipe,
    load_spec,
    options_from_dict,
    override_options,
    parse_size,
    spec_from_dict,
)
from mmer.errors import ConfigError

BASE = ModelSpec(model="lmsys/vicuna-7b-v1.5")
VISION = ModelSpec(model="models/vision", modality="vision")
AUDIO = ModelSpec(model="models/audio", modality="audio", lambda_=0.7)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ unknown keys


def test_an_unknown_key_in_a_model_yaml_names_the_file_the_key_and_the_closest_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "vision.yaml", "model: models/vision\nmodality: vision\nlamda: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    err = info.value
    assert err.file == str(path)
    assert err.key == "lamda"
    assert "'lamda'" in err.message
    assert err.hint == "did you mean 'lambda'?"
    assert "did you mean 'lambda'?" in str(err)


def test_the_message_of_an_unknown_key_error_names_the_yaml_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "audio.yaml", "model: models/audio\nmodality: audio\nlamda: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert str(path) in info.value.message


@pytest.mark.parametrize(
    ("text", "key", "closest"),
    [
        ("options:\n  lamda: 0.5\n", "lamda", "lambda"),
        ("options:\n  trim-scope: global\n", "trim-scope", "trim_scope"),
        ("option:\n  k: 0.5\n", "option", "options"),
        ("base:\n  model: b\n  revison: main\n", "revison", "revision"),
        ("models:\n  - model: m\n    modalty: vision\n", "modalty", "modality"),
    ],
)
def test_an_unknown_key_in_a_recipe_names_the_file_the_key_and_the_closest_key(
    tmp_path: Path, text: str, key: str, closest: str
) -> None:
    path = _write(tmp_path, "recipe.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.file == str(path)
    assert info.value.key == key
    assert info.value.hint == f"did you mean {closest!r}?"


def test_an_unknown_key_with_no_close_match_lists_the_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        spec_from_dict({"model": "m", "zzzzzz": 1})
    assert info.value.hint == "valid: dare, k, lambda, modality, model, revision, weight"


# ------------------------------------------------------------------------------------------ wrong types


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"model": "m", "lambda": True}, "lambda", "got a boolean"),
        ({"model": "m", "lambda": "0.9"}, "lambda", "got str"),
        ({"model": 123}, "model", "got int"),
        ({"model": "m", "modality": 5}, "modality", "got int"),
    ],
)
def test_a_model_spec_with_a_wrong_type_is_refused(data: dict, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        spec_from_dict(data, file="spec.yaml")
    assert info.value.key == key
    assert info.value.file == "spec.yaml"


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"k": "0.8"}, "k", "got str"),
        ({"k": True}, "k", "got a boolean"),
        ({"lambda": True}, "lambda", "got a boolean"),
        ({"alpha": [1.0]}, "alpha", "got list"),
        ({"shard_size": 1.5}, "shard_size", "got float"),
        ({"shard_size": True}, "shard_size", "got a boolean"),
        ({"allow_nonfinite": 1}, "allow_nonfinite", "got int"),
        ({"hash_inputs": "no"}, "hash_inputs", "got str"),
        ({"method": 3}, "method", "got int"),
    ],
)
def test_options_with_a_wrong_type_are_refused(data: dict, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        options_from_dict(data, file="recipe.yaml")
    assert info.value.key == key
    assert info.value.file == "recipe.yaml"


def test_a_string_k_in_a_recipe_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "recipe.yaml", "options:\n  k: '0.8'\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert (info.value.key, info.value.file) == ("k", str(path))


@pytest.mark.parametrize("text", ["- model: m\n", "just a string\n", "42\n"])
def test_a_model_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, "spec.yaml", text)
    with pytest.raises(ConfigError, match="must be a mapping") as info:
        load_spec(path)
    assert info.value.file == str(path)


@pytest.mark.parametrize("text", ["", "modality: vision\n"])
def test_a_model_yaml_without_a_model_key_is_refused(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, "spec.yaml", text)
    with pytest.raises(ConfigError, match="no `model` key") as info:
        load_spec(path)
    assert info.value.key == "model"


def test_a_yaml_that_does_not_parse_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_spec(path)
    assert info.value.file == str(path)
    assert str(path) in info.value.message


@pytest.mark.parametrize("loader", [load_spec, load_recipe])
def test_a_missing_yaml_file_is_a_config_error_naming_it(tmp_path: Path, loader) -> None:
    path = tmp_path / "nowhere" / "vision.yaml"
    with pytest.raises(ConfigError, match="no such file") as info:
        loader(path)
    assert info.value.file == str(path)
    assert str(path) in info.value.message


def test_a_model_yaml_is_read_into_a_model_spec(tmp_path: Path) -> None:
    path = _write(tmp_path, "vision.yaml", "model: org/llava\nrevision: abc123\nmodality: vision\nlambda: 1\n")
    assert load_spec(path) == ModelSpec(model="org/llava", revision="abc123", modality="vision", lambda_=1.0)


# ------------------------------------------------------------------------------------------ ranges


@pytest.mark.parametrize("k", [0.0, -0.1, 1.0000001, 2.0, float("nan"), float("inf")])
def test_k_outside_zero_exclusive_to_one_inclusive_is_refused(k: float) -> None:
    with pytest.raises(ConfigError, match="k = .* is out of range") as info:
        MergeOptions(k=k)
    assert info.value.key == "k"


@pytest.mark.parametrize("k", [1e-9, 0.01, 0.8, 1.0])
def test_k_inside_zero_exclusive_to_one_inclusive_is_accepted(k: float) -> None:
    assert MergeOptions(k=k).k == k


@pytest.mark.parametrize("text", ["k: 0\n", "k: 1.5\n", "k: .nan\n", "k: -1\n"])
def test_k_out_of_range_in_a_recipe_file_is_refused_naming_the_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, "recipe.yaml", "options:\n  " + text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert (info.value.key, info.value.file) == ("k", str(path))


@pytest.mark.parametrize("lam", [-0.1, -1e-12, float("nan"), float("inf"), float("-inf")])
def test_lambda_negative_or_not_finite_is_refused_in_options_and_in_model_specs(lam: float) -> None:
    with pytest.raises(ConfigError, match="λ must be a finite number ≥ 0") as info:
        MergeOptions(lambda_=lam)
    assert info.value.key == "lambda"
    with pytest.raises(ConfigError) as info:
        spec_from_dict({"model": "m", "modality": "vision", "lambda": lam}, file="vision.yaml")
    assert (info.value.key, info.value.file) == ("lambda", "vision.yaml")


@pytest.mark.parametrize("text", ["lambda: -0.5\n", "lambda: .nan\n", "lambda: .inf\n"])
def test_lambda_out_of_range_in_a_model_yaml_is_refused_naming_the_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, "vision.yaml", "model: m\nmodality: vision\n" + text)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert (info.value.key, info.value.file) == ("lambda", str(path))


@pytest.mark.parametrize("lam", [0.0, 0.9, 1.0, 3.0])
def test_lambda_zero_or_above_is_accepted(lam: float) -> None:
    assert MergeOptions(lambda_=lam).lambda_ == lam
    assert spec_from_dict({"model": "m", "modality": "v", "lambda": lam}).lambda_ == lam


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_alpha_zero_negative_or_not_finite_is_refused(alpha: float) -> None:
    with pytest.raises(ConfigError) as info:
        MergeOptions(alpha=alpha)
    assert info.value.key == "alpha"


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("trim_scope", "pertensor", "did you mean 'per-tensor'?"),
        ("zero_sign", "positiv", "did you mean 'positive'?"),
        ("mask_source", "trim", "did you mean 'trimmed'?"),
        ("vocab_policy", "shared_rows", "did you mean 'shared-rows'?"),
        ("delta_dtype", "fp32", "valid: base, float32"),
        ("base_storage", "ref", "valid: copy, reference"),
    ],
)
def test_an_option_outside_its_choices_is_refused_with_the_closest_choice(field: str, value: str, hint: str) -> None:
    with pytest.raises(ConfigError, match="is not one of") as info:
        MergeOptions(**{field: value})
    assert info.value.key == field
    assert info.value.hint == hint


def test_a_shard_size_below_one_kibibyte_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        MergeOptions(shard_size=1023)
    assert info.value.key == "shard_size"
    assert MergeOptions(shard_size=1024).shard_size == 1024


# ------------------------------------------------------------------------------------------ modality names


@pytest.mark.parametrize(
    "name", ["Vision", "1vision", "_vision", "vision ocr", "vi.sion", "visión", "", "a" * 65, "vision/ocr"]
)
def test_a_bad_modality_name_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="is not a valid name") as info:
        spec_from_dict({"model": "m", "modality": name}, file="spec.yaml")
    assert (info.value.key, info.value.file) == ("modality", "spec.yaml")


@pytest.mark.parametrize("name", ["vision", "vision_ocr", "audio-2", "a", "a" * 64])
def test_a_good_modality_name_is_accepted(name: str) -> None:
    assert spec_from_dict({"model": "m", "modality": name}).modality == name


def test_a_modality_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "vision.yaml", 'model: m\nmodality: "vision\\n"\n')
    with pytest.raises(ConfigError):
        load_spec(path)


# ------------------------------------------------------------------------------------------ Recipe


def test_a_recipe_refuses_two_models_with_the_same_modality() -> None:
    twin = ModelSpec(model="models/vision-ocr", modality="vision")
    with pytest.raises(ConfigError, match="modality 'vision' is given twice") as info:
        Recipe(BASE, (VISION, twin))
    assert info.value.key == "modality"
    assert "'models/vision'" in info.value.message and "'models/vision-ocr'" in info.value.message


def test_a_recipe_refuses_a_base_that_has_a_modality() -> None:
    with pytest.raises(ConfigError, match="base model .* has a modality") as info:
        Recipe(ModelSpec(model="b", modality="text"), (VISION,))
    assert info.value.key == "modality"


def test_a_recipe_refuses_an_empty_list_of_models() -> None:
    with pytest.raises(ConfigError, match="no fine-tuned models"):
        Recipe(BASE, ())


def test_a_recipe_refuses_a_fine_tuned_model_without_a_modality() -> None:
    with pytest.raises(ConfigError, match="has no modality") as info:
        Recipe(BASE, (VISION, ModelSpec(model="models/anon")))
    assert info.value.key == "modality"


def test_lambda_for_prefers_the_model_override_over_the_default() -> None:
    recipe = Recipe(BASE, (VISION, AUDIO), MergeOptions(lambda_=0.85))
    assert recipe.lambda_for("audio") == 0.7
    assert recipe.lambda_for("vision") == 0.85


# ------------------------------------------------------------------------------------------ parse_size


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("5GB", 5_000_000_000),
        ("500MB", 500_000_000),
        ("2GiB", 2 * 1024**3),
        ("1KiB", 1024),
        ("3MiB", 3 * 1024**2),
        ("1TB", 10**12),
        ("10 kb", 10_000),
        ("2gib", 2 * 1024**3),
        ("5G", 5_000_000_000),
        (" 7B ", 7),
        ("1048576", 1_048_576),
        ("1.5GB", 1_500_000_000),
        (123, 123),
    ],
)
def test_parse_size_reads_decimal_and_binary_units_and_plain_byte_counts(value: int | str, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["five", "", "GB", "5XB", "-5GB", "5GBs", "1e9", "5 GB B", "0x10"])
def test_parse_size_refuses_a_string_that_is_not_a_size(value: str) -> None:
    with pytest.raises(ConfigError, match="is not a size") as info:
        parse_size(value)
    assert info.value.key == "shard_size"


@pytest.mark.parametrize(("value", "size"), [("4.1GB", 4_100_000_000), ("2.01MB", 2_010_000), ("1.001KB", 1001)])
def test_parse_size_of_a_decimal_size_is_exact(value: str, size: int) -> None:
    assert parse_size(value) == size


# ------------------------------------------------------------------------------------------ load_recipe


def test_a_recipe_file_with_only_options_gives_no_base_and_no_models(tmp_path: Path) -> None:
    path = _write(tmp_path, "recipe.yaml", "options:\n  k: 0.6\n  lambda: 0.7\n  shard_size: 2GiB\n  alpha: 1\n")
    base, models, options = load_recipe(path)
    assert base is None
    assert models == ()
    assert options == MergeOptions(k=0.6, lambda_=0.7, shard_size=2 * 1024**3, alpha=1.0)
    assert isinstance(options.alpha, float)


def test_an_empty_recipe_file_gives_the_default_options(tmp_path: Path) -> None:
    assert load_recipe(_write(tmp_path, "recipe.yaml", "")) == (None, (), MergeOptions())


def test_a_full_recipe_file_is_read_into_its_parts(tmp_path: Path) -> None:
    text = (
        "base:\n  model: lmsys/vicuna-7b-v1.5\n"
        "models:\n  - model: models/vision\n    modality: vision\n"
        "  - model: models/audio\n    modality: audio\n    lambda: 0.7\n"
        "options:\n  trim_scope: per-tensor\n"
        "mmer_version: 0.1.0\nformat_version: '1.0'\n"
    )
    base, models, options = load_recipe(_write(tmp_path, "recipe.yaml", text))
    assert base == BASE
    assert models == (VISION, AUDIO)
    assert options == MergeOptions(trim_scope="per-tensor")


# ------------------------------------------------------------------------------------------ override_options


def test_override_options_with_only_none_leaves_the_options_as_they_are() -> None:
    options = MergeOptions(k=0.6, alpha=0.5)
    assert override_options(options, k=None, alpha=None, lambda_=None) is options
    assert override_options(options) is options


def test_override_options_applies_the_values_that_are_not_none() -> None:
    options = MergeOptions(k=0.6, alpha=0.5, trim_scope="per-tensor")
    out = override_options(options, k=0.9, alpha=None, lambda_=0.3, trim_scope=None)
    assert out == dataclasses.replace(options, k=0.9, lambda_=0.3)
    assert (out.alpha, out.trim_scope) == (0.5, "per-tensor")


def test_override_options_checks_the_new_values() -> None:
    with pytest.raises(ConfigError) as info:
        override_options(MergeOptions(), k=1.5)
    assert info.value.key == "k"


def test_override_options_with_false_overrides_a_true_flag() -> None:
    assert override_options(MergeOptions(hash_inputs=True), hash_inputs=False).hash_inputs is False


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(BASE, (VISION,)),
        Recipe(
            ModelSpec(model="org/base", revision="1e3"),
            (
                ModelSpec(model="yes", revision="0123", modality="vision", lambda_=0.0),
                ModelSpec(model="models/audio", modality="audio-2", lambda_=1.25),
                ModelSpec(model="models/point", modality="point_cloud"),
            ),
            MergeOptions(
                method="ties",
                mask="mmer",
                k=0.6,
                alpha=0.5,
                lambda_=0.8,
                trim_scope="per-tensor",
                zero_sign="positive",
                mask_source="raw",
                vocab_policy="strict",
                delta_dtype="float32",
                base_storage="reference",
                device="cuda:1",
                shard_size=123_456_789,
                allow_nonfinite=True,
                hash_inputs=False,
            ),
        ),
    ],
)
def test_a_recipe_written_to_yaml_loads_back_equal(tmp_path: Path, recipe: Recipe) -> None:
    path = _write(tmp_path, "recipe.yaml", recipe.to_yaml())
    base, models, options = load_recipe(path)
    assert Recipe(base, models, options) == recipe
