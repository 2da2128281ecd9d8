"""`mmer demo`: builds the tiny models, merges them and inspects the masks in one go."""

from __future__ import annotations

from pathlib import Path

# ---------------------------------------------------------------------------------------------------- runner
from cli_runner import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_json_returns_the_merge_and_mask_summaries_and_an_existing_png(tmp_path):
    workdir = tmp_path / "demo"

    result = cli("demo", "--workdir", workdir, "--json")

    assert result.exit_code == 0, result
    data = result.json()
    assert data["ok"] is True
    merge_densities = {m["modality"]: m["density"] for m in data["merge"]["modalities"]}
    assert set(merge_densities) == {"vision", "audio"}
    assert all(0.0 <= d <= 1.0 for d in merge_densities.values())
    assert {name: m["density"] for name, m in data["masks"]["modalities"].items()} == merge_densities
    assert len(data["masks"]["overlaps"]) == 1
    png = Path(data["png"])
    assert png.is_file()
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert (workdir / "merged" / "mmer_manifest.json").is_file()
    for spec in ("base.yaml", "vision.yaml", "audio.yaml"):
        assert (workdir / spec).is_file()
