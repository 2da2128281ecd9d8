"""`verify` catches any changed byte of any file, and measures each modality's rebuild against its source."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from test_pipeline import recipe_for

import mmer
import mmer.verify as verify_module
from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME
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


# ------------------------------------------------------------------------------------- untrusted checkpoints
def reseal(ckpt, edit):
    """Edit the manifest and recompute its sidecar, as someone who tampers with a checkpoint would."""
    data = json.loads((ckpt / MANIFEST_NAME).read_text())
    edit(data)
    raw = (json.dumps(data, indent=2) + "\n").encode()
    (ckpt / MANIFEST_NAME).write_bytes(raw)
    (ckpt / MANIFEST_SHA_NAME).write_text(hashlib.sha256(raw).hexdigest() + "\n")


@pytest.mark.parametrize("name", ["../../X", "/abs/path", "base"])
def test_a_resealed_manifest_with_a_hostile_modality_name_is_reported(merged, tmp_path, name):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)

    def rename(data):
        record = data["modalities"].pop("vision")
        record.update(name=name, mask_file=f"masks/{name}.safetensors", component_dir=f"components/{name}")
        data["modalities"][name] = record

    reseal(copy, rename)
    report = verify(copy, sources=True)
    assert not report.ok and any("modality name" in p and name in p for p in report.problems)


def test_every_schema_problem_is_listed_at_once(merged, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    reseal(copy, lambda d: d["modalities"]["vision"].update(kept="lots", scale=None) or d["slots"][0].update(merged=1))
    problems = " ".join(verify(copy).problems)
    for key in ("modalities.vision.kept", "modalities.vision.scale", "slots[0].merged"):
        assert key in problems


def test_a_stale_sidecar_is_reported_beside_what_changed(merged, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["modalities"]["vision"]["kept"] += 1
    (copy / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
    problems = " ".join(verify(copy).problems)
    assert "sha256 differs from mmer_manifest.json.sha256" in problems
    assert "the manifest says" in problems  # the edited count is still checked against the masks


def test_a_link_out_of_the_checkpoint_is_reported_and_never_followed(merged, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    secret = tmp_path / "secret.txt"
    secret.write_text("not mmer's")
    (copy / "components" / "vision" / "tokenizer_config.json").unlink()
    (copy / "components" / "vision" / "tokenizer_config.json").symlink_to(secret)
    (copy / "extra").symlink_to(tmp_path)
    hashed = []
    real = verify_module.file_sha256
    monkeypatch.setattr(verify_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    report = verify(copy)
    assert any("tokenizer_config.json: a link to" in p and "outside the checkpoint" in p for p in report.problems)
    assert any(p.startswith("extra: a link to") for p in report.problems)
    assert secret not in hashed and all(copy.resolve() in p.parents for p in hashed)


def test_a_reference_base_changed_after_the_merge_is_reported(tiny_models, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_models["base_dir"], base)
    out = tmp_path / "ref"
    recipe = recipe_for(base, {"vision": tiny_models["vision_dir"]}, base_storage="reference", hash_inputs=True)
    mmer.run_merge(recipe, out)
    assert verify(out).ok
    state = load_file(base / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] + 1
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    report = verify(out)
    assert not report.ok and any("model.safetensors" in p and "differs" in p for p in report.problems)


def test_a_reference_base_without_recorded_hashes_is_said_to_be_unchecked(tiny_models, tmp_path):
    out = tmp_path / "ref"
    recipe = recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}, base_storage="reference")
    mmer.run_merge(recipe, out)
    report = verify(out)
    assert report.ok and any("not checked" in n and "hash_inputs off" in n for n in report.notes)
    assert report.to_dict()["notes"] == report.notes


def test_a_hub_base_kept_by_reference_is_checked_from_the_local_cache_only(tiny_models, tmp_path, hf_cache):
    from conftest import cache_model

    cache_model(hf_cache, "org/tiny-base", tiny_models["base_dir"], "1" * 40)
    out = tmp_path / "ref"
    models = {"vision": tiny_models["vision_dir"]}
    mmer.run_merge(recipe_for("org/tiny-base", models, base_storage="reference", hash_inputs=True), out)
    report = verify(out)
    assert report.ok and not report.notes, (report.problems, report.notes)
    shutil.rmtree(hf_cache / "models--org--tiny-base")
    report = verify(out)  # never downloads to find out: says it could not check
    assert report.ok and any("not at hand" in n for n in report.notes)
