"""`mmer reconstruct`: one modality or all, loadable by transformers, JSON summary, refusals that leave nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

# ---------------------------------------------------------------------------------------------------- runner
from cli_runner import cli

import mmer
from mmer.config import build_recipe


@pytest.fixture(scope="module")
def merged(demo_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reconstruct-cli") / "merged"
    mmer.run_merge(build_recipe(list(demo_models.specs)), out)
    return out


def test_one_modality_is_written_into_the_output_and_loads_with_from_pretrained(merged, tmp_path):
    from transformers import LlavaForConditionalGeneration

    result = cli("reconstruct", merged, "--modality", "vision", "-o", tmp_path / "vision", "--quiet")

    assert result.exit_code == 0, result
    assert "vision:" in result.stdout and "hf_legacy layout" in result.stdout
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "vision")


def test_all_writes_one_subdirectory_per_modality_and_json_lists_them(merged, tmp_path):
    result = cli("reconstruct", merged, "--all", "-o", tmp_path / "all", "--json")

    assert result.exit_code == 0, result
    data = result.json()
    assert data["ok"] is True
    assert [m["modality"] for m in data["models"]] == ["vision", "audio"]
    for m in data["models"]:
        assert m["path"] == str(tmp_path / "all" / m["modality"])
        assert (Path(m["path"]) / "model.safetensors").is_file()
        assert (Path(m["path"]) / "config.json").is_file()


def test_neither_modality_nor_all_exits_2_with_a_hint_and_writes_nothing(merged, tmp_path):
    result = cli("reconstruct", merged, "-o", tmp_path / "out")

    assert result.exit_code == 2, result
    assert "either --modality or --all" in result.stderr
    assert "fix:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_modality_exits_2_naming_the_ones_there_are(merged, tmp_path):
    result = cli("reconstruct", merged, "--modality", "video", "-o", tmp_path / "out", "--json")

    assert result.exit_code == 2, result
    data = result.json()
    assert data["ok"] is False and data["error"] == "DecoupledFormatError"
    assert "vision, audio" in data["message"]
    assert not (tmp_path / "out").exists()


def test_an_existing_output_exits_2_unless_overwrite_is_given(merged, tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    refused = cli("reconstruct", merged, "--modality", "audio", "-o", out, "--quiet")
    replaced = cli("reconstruct", merged, "--modality", "audio", "-o", out, "--quiet", "--overwrite")

    assert refused.exit_code == 2 and "already exists" in refused.stderr, refused
    assert replaced.exit_code == 0, replaced
    assert (out / "model.safetensors").is_file()
