"""A fine-tune's config must agree with the base's wherever the model nests its text config, and no model may take
the base's role through its modality name."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import component_state, write_model
from test_pipeline import recipe_for

import mmer
from mmer.config import RESERVED_MODALITY_NAMES, MergeOptions, ModelSpec, Recipe, load_spec
from mmer.errors import CheckpointFormatError, ConfigError, IncompatibleBaseError
from mmer.plan import find_text_config
from mmer.synthetic import TINY_LLAMA

VISION_TOWER = {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 64, "num_hidden_layers": 5}


def model_with_config(tiny_models, tmp_path: Path, config: dict | list) -> Path:
    return write_model(tmp_path / "vision", tiny_models["vision"], "hf_legacy", component_state(11), config=config)


def text(**changes) -> dict:
    return dict(TINY_LLAMA) | changes


# ------------------------------------------------------------------------------- text config, wherever it is


@pytest.mark.parametrize(
    "config,where",
    [
        (
            {"model_type": "omni", "thinker_config": {"text_config": text(rms_norm_eps=1e-6)}},
            "thinker_config.text_config",
        ),
        ({"model_type": "vila", "llm_cfg": text(rms_norm_eps=1e-6)}, "llm_cfg"),
        ({"model_type": "x", "vision_config": VISION_TOWER, "llm_cfg": text(rms_norm_eps=1e-6)}, "llm_cfg"),
        ({"model_type": "llava", "text_config": text(rms_norm_eps=1e-6)}, "text_config"),
    ],
    ids=["thinker_config.text_config", "llm_cfg", "beside_a_vision_tower", "text_config"],
)
def test_a_differing_rms_norm_eps_is_caught_under_any_key(tiny_models, tmp_path, config, where):
    model = model_with_config(tiny_models, tmp_path, config)
    with pytest.raises(IncompatibleBaseError, match="rms_norm_eps = 1e-06 but the base has 1e-05") as info:
        mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": model}), tmp_path / "out", dry_run=True)
    assert info.value.key == f"{where}.rms_norm_eps"
    assert info.value.file == str(model / "config.json") and info.value.hint


def test_a_differing_rope_theta_under_an_unknown_key_is_caught(tiny_models, tmp_path):
    model = model_with_config(tiny_models, tmp_path, {"backbone": {"decoder": text(rope_theta=1e6)}})
    with pytest.raises(IncompatibleBaseError, match="rope_theta"):
        mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": model}), tmp_path / "out", dry_run=True)


def test_a_text_config_of_other_dimensions_is_refused_by_the_dimension_under_a_known_key(tiny_models, tmp_path):
    model = model_with_config(tiny_models, tmp_path, {"llm_config": text(hidden_size=32, num_attention_heads=8)})
    with pytest.raises(IncompatibleBaseError, match="hidden_size = 32") as info:
        mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": model}), tmp_path / "out", dry_run=True)
    assert info.value.key == "llm_config.hidden_size"


def test_an_agreeing_text_config_under_an_unknown_key_merges_without_a_warning(tiny_models, tmp_path):
    model = model_with_config(tiny_models, tmp_path, {"thinker_config": {"text_config": text()}})
    report = mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": model}), tmp_path / "out", dry_run=True)
    assert not [w for w in report.warnings if "config" in w]


def test_a_config_with_no_text_config_at_all_is_merged_with_a_warning(tiny_models, tmp_path):
    model = model_with_config(tiny_models, tmp_path, {"model_type": "mystery", "vision_config": VISION_TOWER})
    report = mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": model}), tmp_path / "out", dry_run=True)
    assert any("no text config with the base's dimensions" in w for w in report.warnings)


def test_the_vision_tower_is_not_taken_for_the_text_config_when_only_its_width_agrees():
    config = {"vision_config": VISION_TOWER, "language_model": text()}
    assert find_text_config(config, dict(TINY_LLAMA)) == ("language_model", config["language_model"])


def test_without_a_reference_the_known_keys_and_then_the_root_are_taken():
    assert find_text_config({"text_config": text(), "hidden_size": 99}) == ("text_config", text())
    assert find_text_config(text()) == ("", text())
    vision_only = {"vision_config": VISION_TOWER}
    assert find_text_config(vision_only) == find_text_config(vision_only, text()) == ("", vision_only)


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"config"', "{" * 200 + "}" * 200, '{"a": 1e999}'])
def test_a_config_json_that_is_not_a_plain_json_object_is_refused_naming_the_file(tiny_models, tmp_path, content):
    model = model_with_config(tiny_models, tmp_path, {})
    (model / "config.json").write_text(content)
    with pytest.raises(CheckpointFormatError, match="config.json") as info:
        mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": model}), tmp_path / "out", dry_run=True)
    assert info.value.file == str(model / "config.json") and info.value.hint


# ------------------------------------------------------------------------------------ modality names


@pytest.mark.parametrize("name", RESERVED_MODALITY_NAMES)
def test_a_reserved_modality_name_is_refused_in_a_recipe_built_in_python(name):
    with pytest.raises(ConfigError, match=f"modality '{name}' is a reserved name") as info:
        Recipe(ModelSpec("base"), (ModelSpec("m", modality=name),), MergeOptions())
    assert info.value.key == "modality" and "vision" in info.value.hint


def test_a_modality_named_base_is_refused_in_a_spec_file(tmp_path):
    path = tmp_path / "vision.yaml"
    path.write_text("model: org/llava\nmodality: base\n")
    with pytest.raises(ConfigError, match="the base's own label") as info:
        load_spec(path)
    assert (info.value.file, info.value.key) == (str(path), "modality")


@pytest.mark.parametrize("name", ["../../x", "/abs", "Vision", "a" * 65, ""])
def test_a_modality_name_outside_the_format_is_refused_in_a_recipe_built_in_python(name):
    with pytest.raises(ConfigError, match="is not a valid name"):
        Recipe(ModelSpec("base"), (ModelSpec("m", modality=name),))


def test_a_modality_named_base_cannot_reach_a_merge(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="reserved"):
        recipe_for(tiny_models["base_dir"], {"base": tiny_models["vision_dir"]})
