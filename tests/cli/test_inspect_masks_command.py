"""`mmer inspect-masks`: tables, JSON statistics that agree with the merge, the heatmap, and a bad directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# ---------------------------------------------------------------------------------------------------- runner
from cli_runner import cli


@dataclass(frozen=True)
class Merged:
    path: Path
    report: dict[str, Any]


@pytest.fixture(scope="module")
def merged(demo_models, tmp_path_factory: pytest.TempPathFactory) -> Merged:
    """``mmer merge base.yaml vision.yaml audio.yaml -o OUT --json`` on the demo models, run once."""
    out = tmp_path_factory.mktemp("merged") / "out"
    result = cli("merge", *demo_models.specs, "-o", out, "--json")
    assert result.exit_code == 0, result
    return Merged(out, result.json())


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mask_json(merged):
    result = cli("inspect-masks", merged.path, "--json")
    assert result.exit_code == 0, result
    return result.json()


def test_inspect_masks_prints_the_tables_with_every_modality_name(merged):
    result = cli("inspect-masks", merged.path)

    assert result.exit_code == 0, result
    for title in ("masks of", "density per module type", "density per layer", "pairwise overlap"):
        assert title in result.stdout
    assert "vision" in result.stdout and "audio" in result.stdout


def test_json_densities_equal_the_densities_the_merge_reported(mask_json, merged):
    merge_densities = {m["modality"]: m["density"] for m in merged.report["modalities"]}

    assert mask_json["ok"] is True
    assert {name: m["density"] for name, m in mask_json["modalities"].items()} == pytest.approx(merge_densities)
    for name, m in mask_json["modalities"].items():
        merge = next(r for r in merged.report["modalities"] if r["modality"] == name)
        assert (m["kept"], m["total"]) == (merge["kept"], merge["total"])


def test_json_per_layer_and_per_module_counts_add_up_to_the_total(mask_json):
    for m in mask_json["modalities"].values():
        for key in ("by_layer", "by_module"):
            assert sum(c["kept"] for c in m[key].values()) == m["kept"], key
            assert sum(c["total"] for c in m[key].values()) == m["total"], key
            assert all(0.0 <= c["density"] <= 1.0 for c in m[key].values())


def test_json_lists_the_overlap_of_the_one_pair_of_modalities(mask_json):
    overlaps = mask_json["overlaps"]

    assert len(overlaps) == 1
    (o,) = overlaps
    assert {o["a"], o["b"]} == {"vision", "audio"}
    kept = {name: m["kept"] for name, m in mask_json["modalities"].items()}
    assert 0 <= o["both"] <= min(kept.values())
    assert max(kept.values()) <= o["either"] <= sum(kept.values())
    assert 0.0 <= o["jaccard"] <= 1.0


def test_png_option_writes_a_non_empty_png_heatmap(merged, tmp_path):
    png = tmp_path / "heat.png"

    result = cli("inspect-masks", merged.path, "--png", png)

    assert result.exit_code == 0, result
    assert png.is_file() and png.stat().st_size > len(PNG_MAGIC)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "heatmap written to" in result.stdout


def test_png_option_with_json_reports_the_png_path(merged, tmp_path):
    png = tmp_path / "heat.png"

    result = cli("inspect-masks", merged.path, "--json", "--png", png)

    assert result.exit_code == 0, result
    assert result.json()["png"] == str(png)
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_directory_that_is_not_a_checkpoint_exits_2_and_mentions_the_manifest(tmp_path, as_json):
    (tmp_path / "model.safetensors").write_bytes(b"")

    result = cli("inspect-masks", tmp_path, *(["--json"] if as_json else []))

    assert result.exit_code == 2, result
    assert result.exception is None, result
    if as_json:
        data = result.json()
        assert data["ok"] is False
        assert data["error"] == "DecoupledFormatError"
        assert "mmer_manifest.json" in data["message"]
    else:
        assert "mmer_manifest.json" in result.stderr


def test_a_path_that_does_not_exist_exits_2_and_mentions_the_manifest(tmp_path):
    result = cli("inspect-masks", tmp_path / "missing")

    assert result.exit_code == 2, result
    assert "mmer_manifest.json" in result.stderr
