"""mmer.extend.options: the paper's defaults, strict loading, and range checks that name the key."""

from __future__ import annotations

import pytest

from mmer.errors import ConfigError
from mmer.extend import (
    ExtendOptions,
    MoExtendRecipe,
    ProbeOptions,
    TrainOptions,
    load_moextend_recipe,
    recipe_from_dict,
)


def test_the_defaults_are_the_papers():
    recipe = MoExtendRecipe()
    assert (recipe.align.learning_rate, recipe.align.batch_size, recipe.align.epochs) == (1e-3, 256, 1.0)
    assert (recipe.probe.steps, recipe.probe.learning_rate) == (1000, 1e-3)
    assert (recipe.finetune.learning_rate, recipe.finetune.batch_size, recipe.finetune.aux_loss_coef) == (
        2e-5,
        128,
        0.001,
    )
    assert recipe.finetune.warmup_ratio == 0.03 and recipe.finetune.weight_decay == 0.0
    assert recipe.selection.fraction == 0.5
    extend = recipe.extend
    assert (extend.layers, extend.experts_per_layer, extend.router_init) == ("extender", 1, "copy")
    assert (extend.calibration, extend.calibration_hidden) == ("additive_mlp", 16)
    assert recipe.projector.kind == "mlp2x_gelu"


def test_a_recipe_file_sets_any_subset_of_any_section(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "probe:\n  steps: 20\nextend:\n  layers: [3, 1]\n  calibration: none\nselection:\n  fraction: 0.25\n"
    )
    recipe = load_moextend_recipe(path)
    assert recipe.probe.steps == 20 and recipe.probe.learning_rate == 1e-3  # the rest keeps the stage's defaults
    assert recipe.extend.layers == (1, 3) and recipe.extend.calibration == "none"
    assert recipe.selection.fraction == 0.25
    assert recipe.to_dict()["extend"]["layers"] == [1, 3]


@pytest.mark.parametrize(
    "data,key,hint",
    [
        ({"finetune": {"learnig_rate": 1e-4}}, "learnig_rate", "learning_rate"),
        ({"extned": {}}, "extned", "extend"),
        ({"extend": {"calibraton": "none"}}, "calibraton", "calibration"),
    ],
)
def test_unknown_keys_are_refused_with_the_closest_valid_one(data, key, hint):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(data, "r.yaml")
    assert info.value.key == key and hint in info.value.hint and info.value.file == "r.yaml"


@pytest.mark.parametrize(
    "build,key",
    [
        (lambda: TrainOptions(learning_rate=0), "learning_rate"),
        (lambda: TrainOptions(steps=0), "steps"),
        (lambda: TrainOptions(warmup_ratio=1.0), "warmup_ratio"),
        (lambda: TrainOptions(mixed_precision="fp8"), "mixed_precision"),
        (lambda: ProbeOptions(fraction=0.0), "fraction"),
        (lambda: ExtendOptions(layers="half"), "layers"),
        (lambda: ExtendOptions(layers=(1, 1)), "layers"),
        (lambda: ExtendOptions(layers=(-1,)), "layers"),
        (lambda: ExtendOptions(calibration="exotic"), "calibration"),
        (lambda: ExtendOptions(router_init="random"), "router_init"),
        (lambda: ExtendOptions(modality="Vision!"), "modality"),
        (lambda: ExtendOptions(experts_per_layer=0), "experts_per_layer"),
    ],
)
def test_values_out_of_range_are_refused_naming_the_key(build, key):
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.key == key


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("finetune", "learning_rate", "fast", "a number"),
        ("probe", "steps", 10.5, "an integer"),
        ("probe", "batch_size", True, "an integer"),
        ("extend", "train_projector", "yes", "true or false"),
        ("extend", "calibration", 3, "a string"),
        ("extend", "layers", 3, "extender, all or a list"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(section, key, value, expected):
    with pytest.raises(ConfigError, match=f"{section}.{key} must be {expected}") as info:
        recipe_from_dict({section: {key: value}})
    assert info.value.key == key


def test_a_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file") as info:
        load_moextend_recipe(tmp_path / "nope.yaml")
    assert info.value.file.endswith("nope.yaml")
