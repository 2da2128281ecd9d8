"""Specifies the single-file recipe as mmer's main config form: ``mmer merge recipe.yaml``, ``base: <id>``, and
relative paths resolved from the YAML that names them, with the older forms still working."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_runner import cli
from safetensors.torch import load_file

from mmer.config import ModelSpec, build_recipe, load_recipe, load_spec
from mmer.errors import ConfigError

RECIPE = """\
base: ../models/base
models:
  - model: ../models/vision
    modality: vision
  - model: ../models/audio
    modality: audio
    lambda: 0.7
options:
  k: 0.7
"""


@pytest.fixture
def project(tiny_models, tmp_path: Path) -> Path:
    """models/{base,vision,audio} and recipes/merge.yaml naming them relative to recipes/."""
    for name in ("base", "vision", "audio"):
        shutil.copytree(tiny_models[f"{name}_dir"], tmp_path / "models" / name)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "merge.yaml").write_text(RECIPE, encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    return tmp_path


def test_mmer_merge_recipe_yaml_merges_from_any_working_directory(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project / "elsewhere")
    result = cli("merge", "../recipes/merge.yaml", "-o", "out", "--json")
    assert result.exit_code == 0, str(result)
    report = result.json()
    assert [m["modality"] for m in report["modalities"]] == ["vision", "audio"]
    assert (project / "elsewhere" / "out" / "masks").is_dir()


def test_relative_model_paths_are_resolved_from_the_recipes_directory_not_the_working_directory(
    project: Path, monkeypatch
) -> None:
    monkeypatch.chdir(project / "elsewhere")
    base, models, options = load_recipe("../recipes/merge.yaml")
    assert base == ModelSpec(str(project.resolve() / "recipes" / ".." / "models" / "base"))
    assert Path(models[0].model).resolve() == (project / "models" / "vision").resolve()
    assert options.k == 0.7


def test_relative_paths_in_model_specs_are_resolved_from_each_specs_directory(project: Path, monkeypatch) -> None:
    specs = project / "specs"
    specs.mkdir()
    (specs / "base.yaml").write_text("model: ../models/base\n")
    (specs / "vision.yaml").write_text("model: ../models/vision\nmodality: vision\n")
    monkeypatch.chdir(project / "elsewhere")
    assert Path(load_spec("../specs/vision.yaml").model).resolve() == (project / "models" / "vision").resolve()
    result = cli("merge", "../specs/base.yaml", "../specs/vision.yaml", "-o", "out", "--json")
    assert result.exit_code == 0, str(result)


def test_a_path_that_exists_only_from_the_working_directory_is_refused_with_the_fix(project: Path, monkeypatch):
    """The file would mean another model from elsewhere: refused, not guessed at."""
    (project / "recipes" / "cwd.yaml").write_text("model: models/vision\nmodality: vision\n")
    monkeypatch.chdir(project)
    with pytest.raises(ConfigError) as info:
        load_spec("recipes/cwd.yaml")
    assert info.value.key == "model" and "resolved from the directory of the file" in info.value.message
    assert str((project / "models" / "vision").absolute()) in info.value.hint


def test_a_hub_id_stays_a_hub_id_and_a_missing_path_is_named_where_it_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "hub.yaml").write_text("model: org/name\nmodality: vision\n")
    (tmp_path / "missing.yaml").write_text("model: ./models/none\nmodality: vision\n")
    assert load_spec(tmp_path / "hub.yaml").model == "org/name"
    assert load_spec(tmp_path / "missing.yaml").model == str(tmp_path.resolve() / "models" / "none")


def test_base_shorthand_names_the_base_by_id(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("base: lmsys/vicuna-7b-v1.5\nmodels:\n  - {model: org/llava, modality: vision}\n")
    recipe = build_recipe([path])
    assert recipe.base == ModelSpec("lmsys/vicuna-7b-v1.5")
    assert recipe.source.kind == "recipe"
    path.write_text("base: 7\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.key == "base"


def test_the_old_forms_still_work_spec_files_and_recipe_with_spec_files(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    for name in ("base", "vision", "audio"):
        modality = "" if name == "base" else f"modality: {name}\n"
        (project / f"{name}.yaml").write_text(f"model: models/{name}\n{modality}")
    result = cli("merge", "base.yaml", "vision.yaml", "audio.yaml", "-o", "a", "--json")
    assert result.exit_code == 0, str(result)
    (project / "options.yaml").write_text("options:\n  k: 0.5\n")
    result = cli("merge", "base.yaml", "vision.yaml", "--recipe", "options.yaml", "-o", "b", "--json")
    assert result.exit_code == 0, str(result)
    assert result.json()["plan"]["options"]["k"] == 0.5


@pytest.mark.parametrize(
    "args",
    [("recipes/merge.yaml", "base.yaml"), ("recipes/merge.yaml", "--recipe", "recipes/merge.yaml")],
    ids=["followed-by-specs", "with-recipe-flag"],
)
def test_a_positional_recipe_is_the_whole_merge_and_refuses_company(project: Path, monkeypatch, args) -> None:
    monkeypatch.chdir(project)
    (project / "base.yaml").write_text("model: models/base\n")
    result = cli("merge", *args, "-o", "out", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert "recipes/merge.yaml is a recipe" in error["message"] and error["hint"]


def test_the_recipe_mmer_writes_into_its_output_merges_again_from_anywhere(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project / "recipes")
    assert cli("merge", "merge.yaml", "-o", "../first", "--json").exit_code == 0
    monkeypatch.chdir(project / "elsewhere")
    result = cli("merge", "../first/mmer_recipe.yaml", "-o", "second", "--json")
    assert result.exit_code == 0, str(result)
    for rel in ("tau_star", "masks"):
        for file in sorted((project / "first" / rel).glob("*.safetensors")):
            ours = load_file(str(project / "elsewhere" / "second" / rel / file.name))
            theirs = load_file(str(file))
            assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
