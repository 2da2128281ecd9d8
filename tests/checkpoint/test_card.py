"""The model card an output carries, read back with huggingface_hub's own parser (what the Hub indexes).

Every merged model is a ``base_model`` with ``base_model_relation: merge``; the licence is declared only when the
sources agree; the usage lines can be pasted; the recipe is inlined; each source's licence files travel with its
part of the output; a ``--mask none`` output is a plain transformers model and its card says so.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from test_pipeline import recipe_for

import mmer
from mmer.checkpoint.card import PROJECT_URL, hub_name
from mmer.checkpoint.licences import classify
from mmer.errors import UnsafePathError
from mmer.verify import verify

APACHE = "\n                                 Apache License\n                           Version 2.0, January 2004\n"
MIT = "MIT License\n\nCopyright (c) 2024\n\nPermission is hereby granted, free of charge, to any person obtaining"


@pytest.fixture
def models(tiny_models, tmp_path) -> dict[str, Path]:
    """Copies of the tiny base and fine-tunes that a test may give licences to."""
    return {name: shutil.copytree(tiny_models[f"{name}_dir"], tmp_path / name) for name in ("base", "vision", "audio")}


def merge(models: dict[str, Path], out: Path, **options) -> tuple[ModelCard, str, mmer.MergeReport]:
    fine_tunes = {m: models[m] for m in ("vision", "audio")}
    report = mmer.run_merge(recipe_for(models["base"], fine_tunes, **options), out)
    text = (out / "README.md").read_text(encoding="utf-8")
    return ModelCard(text), text, report


def licensed_alike(models: dict[str, Path]) -> None:
    """The same licence, declared the three ways models declare one: card front matter, config, LICENSE."""
    (models["base"] / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the base\n")
    (models["vision"] / "LICENSE").write_text(APACHE)
    config = json.loads((models["audio"] / "config.json").read_text())
    (models["audio"] / "config.json").write_text(json.dumps({**config, "license": "apache-2.0"}))


def test_every_merged_model_is_a_base_model_of_the_merge_and_the_agreed_licence_is_declared(models, tmp_path):
    licensed_alike(models)
    card, text, report = merge(models, tmp_path / "out", base_storage="copy")
    meta = card.data.to_dict()

    assert meta["base_model"] == ["base", "vision", "audio"]  # local sources by their directory's name
    assert meta["base_model_relation"] == "merge"
    assert meta["license"] == "apache-2.0" and "license_name" not in meta
    assert meta["library_name"] == "mmer"
    assert meta["pipeline_tag"] == "any-to-any"  # images and audio in
    assert {"merge", "decoupled-checkpoint", "vision", "audio"} <= set(meta["tags"])
    assert not [w for w in report.warnings if "licence" in w]
    assert "apache-2.0 (model card)" in text and "apache-2.0 (LICENSE)" in text and "apache-2.0 (config.json)" in text


def test_the_card_says_how_to_use_it_in_lines_that_run_and_inlines_the_recipe(models, tmp_path):
    _, text, _ = merge(models, tmp_path / "out")

    assert "pip install mmer-merge" in text and PROJECT_URL in text
    assert "mmer reconstruct . --modality vision -o ../vision-model/" in text
    assert 'Router.from_pretrained(".", device="cuda")' in text
    inlined = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert inlined is not None
    assert yaml.safe_load(inlined.group(1)) == yaml.safe_load((tmp_path / "out" / "mmer_recipe.yaml").read_text())


def test_the_pasted_usage_lines_work_in_the_outputs_directory(models, tmp_path, monkeypatch):
    from cli_runner import cli

    _, text, _ = merge(models, tmp_path / "out")
    command = re.search(r"^mmer (reconstruct \. .*?)\s+#", text, re.M)
    assert command is not None
    monkeypatch.chdir(tmp_path / "out")
    result = cli(*command.group(1).split(), "-q")
    assert result.exit_code == 0, result
    assert (tmp_path / "vision-model" / "config.json").is_file()


def test_differing_licences_give_other_and_a_warning_that_names_each(models, tmp_path):
    (models["base"] / "LICENSE").write_text(APACHE)
    (models["vision"] / "LICENSE").write_text(MIT)
    (models["audio"] / "README.md").write_text("---\nlicense: llama2\n---\n")
    card, _, report = merge(models, tmp_path / "out")

    assert card.data.license == "other" and card.data.to_dict()["license_name"] == "mixed"
    [warning] = [w for w in report.warnings if "licence" in w]
    assert "base: apache-2.0" in warning and "vision: mit" in warning and "audio: llama2" in warning


def test_a_source_without_a_licence_gives_other_and_a_warning_naming_it(models, tmp_path):
    (models["base"] / "LICENSE").write_text(APACHE)
    (models["vision"] / "LICENSE").write_text(APACHE)
    card, text, report = merge(models, tmp_path / "out")

    assert card.data.license == "other" and card.data.to_dict()["license_name"] == "unknown"
    [warning] = [w for w in report.warnings if "licence" in w]
    assert "no licence found for audio" in warning and "base" not in warning.split(";")[0]
    assert "| audio |" in text and "not found" in text


def test_each_sources_licence_files_are_copied_with_its_part_and_rebuilt_models_keep_them(models, tmp_path):
    licensed_alike(models)
    (models["vision"] / "NOTICE").write_text("Vision model notice\n")
    (models["base"] / "LICENSE.txt").write_text(APACHE)
    out = tmp_path / "out"
    _, text, _ = merge(models, out, base_storage="copy")

    assert (out / "components" / "vision" / "LICENSE").read_text() == APACHE
    assert (out / "components" / "vision" / "NOTICE").read_text() == "Vision model notice\n"
    assert (out / "base" / "LICENSE.txt").read_text() == APACHE
    assert not list((out / "components" / "audio").glob("LICEN*"))
    assert "`components/vision/LICENSE`, `components/vision/NOTICE`" in text and "`base/LICENSE.txt`" in text
    assert verify(out).ok  # the copies are files of the checkpoint like any other: hashed, verified

    mmer.reconstruct(out, tmp_path / "rebuilt", ["vision"], subdirs=False)
    assert (tmp_path / "rebuilt" / "LICENSE").read_text() == APACHE


def test_a_licence_file_linking_out_of_its_model_is_refused_before_any_work(models, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not a licence")
    (models["vision"] / "LICENSE").symlink_to(secret)
    with pytest.raises(UnsafePathError, match="LICENSE"):
        merge(models, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_mask_none_output_has_a_plain_transformers_card(models, tmp_path):
    licensed_alike(models)
    (models["base"] / "LICENSE").write_text(APACHE)
    out = tmp_path / "single"
    card, text, _ = merge(models, out, mask="none", method="task_arithmetic")
    meta = card.data.to_dict()

    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == ["base", "vision", "audio"] and meta["base_model_relation"] == "merge"
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert "decoupled" not in text.lower() and "decoupled-checkpoint" not in meta["tags"]
    assert 'AutoModelForCausalLM.from_pretrained(".")' in text
    assert (out / "LICENSE").read_text() == APACHE  # the merged model at the root carries the base's licence


def test_hub_sources_are_named_by_id_and_their_cached_cards_licence_is_read(models, tmp_path, hf_cache):
    from conftest import cache_model

    (models["base"] / "README.md").write_text("---\nlicense: mit\nlicense_name: ignored\n---\n")
    (models["vision"] / "README.md").write_text("---\nlicense:\n- mit\n---\n")
    cache_model(hf_cache, "org/tiny-base", models["base"], "1" * 40)
    cache_model(hf_cache, "org/tiny-vision", models["vision"], "2" * 40)
    recipe = mmer.Recipe(
        mmer.ModelSpec("org/tiny-base"),
        (mmer.ModelSpec("org/tiny-vision", modality="vision"),),
        mmer.MergeOptions(hash_inputs=False),
    )
    mmer.run_merge(recipe, tmp_path / "out")
    meta = ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()
    assert meta["base_model"] == ["org/tiny-base", "org/tiny-vision"]
    assert meta["license"] == "mit" and meta["pipeline_tag"] == "image-text-to-text"


def test_a_hub_cache_snapshot_given_as_a_path_is_named_by_its_id():
    assert hub_name("/cache/hub/models--my-org--Llava-1.5--hf/snapshots/" + "3" * 40) == "my-org/Llava-1.5--hf"
    assert hub_name("org/name") == "org/name"
    assert hub_name("/data/models/vicuna-7b") == "vicuna-7b"


@pytest.mark.parametrize(
    ("text", "licence"),
    [
        (APACHE, "apache-2.0"),
        (MIT, "mit"),
        ("LLAMA 2 COMMUNITY LICENSE AGREEMENT\nLlama 2 Version Release Date: July 18, 2023", "llama2"),
        ("META LLAMA 3 COMMUNITY LICENSE AGREEMENT", "llama3"),
        ("GNU LESSER GENERAL PUBLIC LICENSE\n Version 3, 29 June 2007\n ... GNU General Public License", "lgpl-3.0"),
        ("Some bespoke terms of use", None),
    ],
)
def test_licence_texts_are_recognised_by_their_own_opening_words(text, licence):
    assert classify(text) == licence
