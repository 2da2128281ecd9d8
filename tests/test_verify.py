"""`verify` catches any changed byte of any file, and measures each modality's rebuild against its source."""

from __future__ import annotations

import shutil

import pytest
from test_pipeline import recipe_for

import mmer
from mmer.checkpoint.manifest import MANIFEST_SHA_NAME
from mmer.verify import verify


@pytest.fixture(scope="module")
def merged(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "out"
    recipe = recipe_for(
        tiny_models["base_dir"], {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    )
    mmer.run_merge(recipe, out)
    return out


def test_a_fresh_checkpoint_verifies_clean_and_rebuilds_close_to_its_sources(merged):
    report = verify(merged, sources=True)
    assert report.ok, report.problems
    assert report.files_checked >= 10 and report.masks_checked == 2 * 21  # 21 LLM tensors per tiny model
    for modality in ("vision", "audio"):
        rec = report.reconstruction[modality]
        assert 0 < rec.rel_l1 < 1
        assert rec.private_rows_equal and rec.source_hashes_match is None  # hashing was off in recipe_for


def test_flipping_any_single_byte_of_any_file_is_caught(merged, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    files = sorted(p for p in copy.rglob("*") if p.is_file())
    assert any(p.name == MANIFEST_SHA_NAME for p in files)
    for file in files:
        data = file.read_bytes()
        for position in sorted({0, len(data) // 2, len(data) - 1}):
            flipped = bytearray(data)
            flipped[position] ^= 0x01
            file.write_bytes(bytes(flipped))
            report = verify(copy)
            assert not report.ok, (file.relative_to(copy), position)
            file.write_bytes(data)
    assert verify(copy).ok


def test_a_missing_or_added_file_is_reported(merged, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    (copy / "masks" / "vision.safetensors").unlink()
    (copy / "notes.txt").write_text("added later")
    problems = " ".join(verify(copy).problems)
    assert "masks/vision.safetensors: missing" in problems
    assert "notes.txt: not listed" in problems


def test_a_single_merged_model_verifies_too(tiny_models, tmp_path):
    recipe = recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}, method="average", mask="none")
    mmer.run_merge(recipe, tmp_path / "out")
    report = verify(tmp_path / "out", sources=True)
    assert report.ok, report.problems
    assert report.reconstruction["vision"].rel_l1 == pytest.approx(0.0, abs=1e-6)  # one model: the average is itself
