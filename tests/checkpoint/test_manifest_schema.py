"""The manifest schema: every field has a type, a range or a form, and a manifest that breaks one is refused
naming the dotted key and a fix, never with a raw validation message, a ``KeyError`` or a traceback."""

from __future__ import annotations

import copy
import json

import pytest
from test_pipeline import recipe_for

import mmer
from mmer.checkpoint.manifest import MANIFEST_NAME, Manifest, read_manifest
from mmer.errors import DecoupledFormatError


@pytest.fixture(scope="module")
def merged(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("schema") / "out"
    recipe = recipe_for(
        tiny_models["base_dir"],
        {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]},
        hash_inputs=True,
    )
    mmer.run_merge(recipe, out)
    return out


@pytest.fixture(scope="module")
def written(merged):
    """The manifest as the writer wrote it, parsed."""
    return json.loads((merged / MANIFEST_NAME).read_text(encoding="utf-8"))


def refusal(data, key: str) -> DecoupledFormatError:
    with pytest.raises(DecoupledFormatError) as info:
        Manifest.from_dict(data, "ckpt/mmer_manifest.json")
    err = info.value
    assert err.key == key, err.message
    assert key in err.message and "ckpt/mmer_manifest.json" in err.message
    assert err.hint and "mmer verify" in err.hint
    return err


def edited(written, edit):
    data = copy.deepcopy(written)
    edit(data)
    return data


def vision(data):
    return data["modalities"]["vision"]


# ----------------------------------------------------------------------------------------------- round trip
def test_what_the_writer_wrote_validates_and_serialises_back_byte_for_byte(merged, written):
    manifest = Manifest.read(merged)
    assert manifest.to_dict() == written
    raw = (json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n").encode("utf-8")
    assert raw == (merged / MANIFEST_NAME).read_bytes()


def test_keys_a_newer_minor_version_adds_are_ignored(written):
    data = edited(written, lambda d: d.update(format_version="1.7", new_top_level={"x": 1}))
    vision(data)["new_field"] = [1, 2]
    assert Manifest.from_dict(data).modalities["vision"].kept == written["modalities"]["vision"]["kept"]


# --------------------------------------------------------------------------------------------- wrong types
@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: vision(d).update(kept="lots"), "modalities.vision.kept"),
        (lambda d: vision(d).update(kept="1"), "modalities.vision.kept"),  # no "1" for 1
        (lambda d: vision(d).update(kept=True), "modalities.vision.kept"),  # no bool for an int
        (lambda d: vision(d).update(kept=-1), "modalities.vision.kept"),
        (lambda d: vision(d).update(total=2.5), "modalities.vision.total"),
        (lambda d: vision(d).update(total=1 << 70), "modalities.vision.total"),
        (lambda d: vision(d).update(scale="2"), "modalities.vision.scale"),
        (lambda d: vision(d).update(scale=float("inf")), "modalities.vision.scale"),
        (lambda d: vision(d).update(weight=float("nan")), "modalities.vision.weight"),
        (lambda d: vision(d).update({"lambda": True}), "modalities.vision.lambda"),
        (lambda d: vision(d).update(vocab_size="10"), "modalities.vision.vocab_size"),
        (lambda d: vision(d).update(kept_per_tensor=[1, 2]), "modalities.vision.kept_per_tensor"),
        (lambda d: vision(d).update(llm_keys={"a": 1}), "modalities.vision.llm_keys.a"),
        (lambda d: vision(d).update(private={"name": "x"}), "modalities.vision.private"),
        (lambda d: vision(d)["private"][0].update(row_start="8"), "modalities.vision.private[0].row_start"),
        (lambda d: vision(d)["source"].update(files=["model.safetensors"]), "modalities.vision.source.files"),
        (lambda d: d["slots"][0].update(shape={"rows": 8}), "slots[0].shape"),
        (lambda d: d["slots"][0].update(shape=[8, -1]), "slots[0].shape[1]"),
        (lambda d: d["slots"][0].update(shape=[True, 8]), "slots[0].shape[0]"),
        (lambda d: d["slots"][0].update(merged=1), "slots[0].merged"),
        (lambda d: d["slots"][0].update(dtype="F99"), "slots[0].dtype"),
        (lambda d: d.update(slots={"a": 1}), "slots"),
        (lambda d: d.update(modalities=[]), "modalities"),
        (lambda d: d.update(options=None), "options"),
        (lambda d: d.update(mmer_version=1), "mmer_version"),
        (lambda d: d.update(base_storage="elsewhere"), "base_storage"),
        (lambda d: d.update(tau_star_dtype="F32/INT3"), "tau_star_dtype"),
        (lambda d: d["base"].update(layout="my_layout"), "base.layout"),
        (lambda d: d.pop("slots"), "slots"),
        (lambda d: vision(d).pop("lambda"), "modalities.vision.lambda"),
    ],
)
def test_a_field_of_the_wrong_type_or_range_is_refused_naming_its_key(written, edit, key):
    refusal(edited(written, edit), key)


@pytest.mark.parametrize(
    ("digest", "where"),
    [("A" * 64, "files"), ("0" * 63, "files"), (None, "files"), ("g" * 64, "base")],
)
def test_a_hash_is_64_lowercase_hex_digits(written, digest, where):
    data = copy.deepcopy(written)
    if where == "files":
        rel = sorted(data["files"])[0]
        data["files"][rel] = digest
        key = f'files["{rel}"]' if "/" in rel or "." in rel else f"files.{rel}"
    else:
        name = sorted(data["base"]["files"])[0]
        data["base"]["files"][name] = digest
        key = f'base.files["{name}"]'
    refusal(data, key)


# -------------------------------------------------------------------------------------------- names, paths
@pytest.mark.parametrize("name", ["../../X", "/tmp/abs", "Vision", "base", "a" * 65, "", "1st", "a b", "a/b"])
def test_a_modality_key_that_is_not_a_modality_name_is_refused(written, name):
    data = copy.deepcopy(written)
    record = data["modalities"].pop("vision")
    record.update(name=name, mask_file=f"masks/{name}.safetensors", component_dir=f"components/{name}")
    data["modalities"][name] = record
    with pytest.raises(DecoupledFormatError, match="modality name") as info:
        Manifest.from_dict(data, "ckpt/mmer_manifest.json")
    assert info.value.key.startswith("modalities") and name[:60] in info.value.key and info.value.hint


def test_a_modality_cannot_take_the_base_models_name(written):
    data = copy.deepcopy(written)
    record = data["modalities"].pop("vision")
    record.update(name="base", mask_file="masks/base.safetensors", component_dir="components/base")
    data["modalities"]["base"] = record
    assert "is reserved" in refusal(data, "modalities.base").message


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: vision(d).update(name="audio"), "modalities.vision.name"),
        (lambda d: vision(d).update(mask_file="masks/audio.safetensors"), "modalities.vision.mask_file"),
        (lambda d: vision(d).update(mask_file="../../etc/passwd"), "modalities.vision.mask_file"),
        (lambda d: vision(d).update(mask_file=None), "modalities.vision.mask_file"),
        (lambda d: vision(d).update(component_dir="components/audio"), "modalities.vision.component_dir"),
        (lambda d: vision(d).update(component_dir="/abs/path"), "modalities.vision.component_dir"),
        (lambda d: vision(d).update(kept=vision(d)["total"] + 1), "modalities.vision.kept"),
        (lambda d: d.update(tau_star_dir="base"), "tau_star_dir"),
        (lambda d: d.update(tau_star_dir="C:\\x"), "tau_star_dir"),
        (lambda d: d.update(base_dir="tau_star"), "base_dir"),
        (lambda d: d.update(base_dir=None), "base_dir"),
        (lambda d: d.update(merged_dir=".."), "merged_dir"),
        (lambda d: d["files"].update({"../x": "0" * 64}), 'files["../x"]'),
        (lambda d: d["files"].update({"/etc/passwd": "0" * 64}), 'files["/etc/passwd"]'),
        (lambda d: d["slots"].append(d["slots"][0]), "slots"),
    ],
)
def test_names_and_paths_must_be_the_ones_the_writer_uses(written, edit, key):
    refusal(edited(written, edit), key)


@pytest.mark.parametrize("name", ["../../../etc/shadow", "sub/model.safetensors", "/etc/shadow", "..", "a\\b", "c:x"])
def test_a_source_file_is_a_plain_file_name(written, name):
    data = edited(written, lambda d: vision(d)["source"]["files"].update({name: "0" * 64}))
    err = refusal(data, f"modalities.vision.source.files[{json.dumps(name)}]")
    assert "plain file name" in err.message


def test_a_manifest_that_is_not_an_object_or_not_ours_is_refused(written):
    for data in ([written], "mmer", None, {**written, "format": "other"}):
        with pytest.raises(DecoupledFormatError, match="not an mmer manifest"):
            Manifest.from_dict(data)


@pytest.mark.parametrize(("version", "hint"), [("3.0", "upgrade mmer"), (1.0, "mmer verify"), ("x", "mmer verify")])
def test_an_unreadable_format_version_is_refused(written, version, hint):
    with pytest.raises(DecoupledFormatError) as info:
        Manifest.from_dict({**written, "format_version": version})
    assert info.value.key == "format_version" and hint in info.value.hint


def test_every_problem_is_counted_in_the_first_and_listed_when_collected(written):
    data = edited(written, lambda d: vision(d).update(kept="lots", scale="x", weight=None))
    with pytest.raises(DecoupledFormatError, match=r"and 2 more problem"):
        Manifest.from_dict(data)
    problems: list = []
    from mmer.checkpoint.manifest import validate_manifest

    assert validate_manifest(data, "m.json", problems) is None
    assert {p.key for p in problems} == {
        "modalities.vision.kept",
        "modalities.vision.scale",
        "modalities.vision.weight",
    }


def test_no_raw_validation_message_escapes_without_its_key(written):
    data = edited(written, lambda d: vision(d)["source"].update(commit=5))
    err = refusal(data, "modalities.vision.source.commit")
    assert err.message.count("\n") == 0 and "pydantic" not in err.message and "errors.pydantic" not in str(err)


def test_read_manifest_reports_rather_than_raises_when_asked_to_collect(tmp_path):
    problems: list = []
    assert read_manifest(tmp_path, problems) is None
    assert "not a decoupled checkpoint" in problems[0].message
