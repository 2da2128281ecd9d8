"""Nothing is read in from outside: a model directory's links are followed only inside it or its Hub cache repo.

A stranger's download may link ``tokenizer.json`` to ``/proc/self/environ`` or ``/etc/shadow``, name shards
``../../x`` in its index, or plant a FIFO under a weight file's name. Each is refused, naming the link or the
index key, before any output exists; links that stay inside (the Hub cache is made of them) keep working, and
``MMER_ALLOW_EXTERNAL_LINKS=1`` / ``--allow-external-links`` let a user's own links to shared storage through.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from conftest import cache_model
from safetensors.torch import save_file

import mmer
from mmer.config import MergeOptions, ModelSpec, Recipe
from mmer.errors import CheckpointFormatError, UnsafePathError
from mmer.io.paths import ENV_ALLOW_EXTERNAL_LINKS, set_allow_external_links
from mmer.io.reader import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, CheckpointReader
from mmer.io.resolve import resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRET = "MMER_TEST_SECRET=hunter2"


@pytest.fixture(autouse=True)
def links_refused_and_nothing_hangs(monkeypatch):
    """No opt-in unless a test asks for one, none left behind, and a test that would block on a FIFO fails."""
    monkeypatch.delenv(ENV_ALLOW_EXTERNAL_LINKS, raising=False)
    set_allow_external_links(None)

    def hung(signum, frame):
        raise TimeoutError("a read blocked: something opened a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    set_allow_external_links(None)


def copy_model(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def secret_file(tmp_path: Path) -> Path:
    """A file outside every model directory, standing for /etc/shadow or a credentials file."""
    path = tmp_path / "home" / ".secrets"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"token": SECRET}))
    return path


def recipe_for(base: str | Path, models: dict[str, str | Path], **options) -> Recipe:
    return Recipe(
        ModelSpec(str(base)),
        tuple(ModelSpec(str(p), modality=m) for m, p in models.items()),
        MergeOptions(**{"hash_inputs": False, **options}),
    )


def assert_no_output(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if "mmer-" in p.name]


def assert_secret_nowhere(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def shards(directory: Path, names: dict[str, list[str]]) -> dict[str, str]:
    """Write one safetensors file per entry; return the weight_map an index of them holds."""
    weight_map = {}
    for file, tensors in names.items():
        save_file({n: torch.full((2,), float(i)) for i, n in enumerate(tensors)}, str(directory / file))
        weight_map |= dict.fromkeys(tensors, file)
    return weight_map


def write_index(directory: Path, weight_map: dict[str, str]) -> Path:
    index = directory / SAFETENSORS_INDEX
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


# ------------------------------------------------------------------------------------------ the case


@pytest.mark.parametrize("target", ["/proc/self/environ", "/etc/shadow"])
def test_a_tokenizer_linked_to_a_system_file_makes_the_merge_refuse_naming_the_link(tiny_models, tmp_path, target):
    vision = copy_model(tiny_models["vision_dir"], tmp_path / "vision")
    link = vision / "tokenizer.json"
    link.symlink_to(target)
    recipe = recipe_for(tiny_models["base_dir"], {"vision": vision, "audio": tiny_models["audio_dir"]})
    with pytest.raises(UnsafePathError) as info:
        mmer.run_merge(recipe, tmp_path / "out")
    err = info.value
    assert err.file == str(link)
    assert str(link) in err.message and target in err.message
    assert err.hint and ENV_ALLOW_EXTERNAL_LINKS in err.hint
    assert_no_output(tmp_path, tmp_path / "out")


def test_a_tokenizer_linked_outside_makes_the_cli_merge_refuse_with_json(tiny_models, tmp_path):
    vision = copy_model(tiny_models["vision_dir"], tmp_path / "vision")
    link = vision / "tokenizer.json"
    link.symlink_to("/proc/self/environ")
    specs = []
    for name, spec in (("base", {"model": str(tiny_models["base_dir"])}), ("vision", {"model": str(vision)})):
        if name != "base":
            spec["modality"] = name
        specs.append(tmp_path / f"{name}.yaml")
        specs[-1].write_text(json.dumps(spec))  # JSON is YAML
    out = tmp_path / "out"
    result = cli("merge", *specs, "-o", out, "--json", "--quiet")
    assert result.exit_code != 0, result
    assert result.exception is None, result
    report = result.json()
    assert report["ok"] is False
    assert report["error"] == "UnsafePathError"
    assert report["file"] == str(link)
    assert str(link) in report["message"]
    assert report["hint"]
    assert_no_output(tmp_path, out)


def test_the_cli_flag_lets_an_external_link_through(tiny_models, tmp_path):
    vision = copy_model(tiny_models["vision_dir"], tmp_path / "vision")
    shared = tmp_path / "shared" / "tokenizer.json"
    shared.parent.mkdir()
    shared.write_text('{"shared": true}')
    (vision / "tokenizer.json").symlink_to(shared)
    specs = [tmp_path / "base.yaml", tmp_path / "vision.yaml"]
    specs[0].write_text(json.dumps({"model": str(tiny_models["base_dir"])}))
    specs[1].write_text(json.dumps({"model": str(vision), "modality": "vision"}))
    out = tmp_path / "out"
    result = cli("--allow-external-links", "merge", *specs, "-o", out, "--json", "--quiet")
    assert result.exit_code == 0, result
    assert (out / "components" / "vision" / "tokenizer.json").read_text() == '{"shared": true}'
    # The flag lasts for its own command only.
    again = cli("merge", *specs, "-o", tmp_path / "again", "--json", "--quiet")
    assert again.exit_code != 0 and again.json()["error"] == "UnsafePathError", again


def test_the_environment_variable_lets_an_external_link_through(tiny_models, tmp_path, monkeypatch):
    vision = copy_model(tiny_models["vision_dir"], tmp_path / "vision")
    shared = secret_file(tmp_path)
    (vision / "tokenizer.json").symlink_to(shared)
    monkeypatch.setenv(ENV_ALLOW_EXTERNAL_LINKS, "1")
    mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": vision}), tmp_path / "out")
    copied = tmp_path / "out" / "components" / "vision" / "tokenizer.json"
    assert copied.read_text() == shared.read_text()
    assert not copied.is_symlink()


def test_every_side_file_link_out_is_refused_not_just_the_tokenizer(tiny_models, tmp_path):
    vision = copy_model(tiny_models["vision_dir"], tmp_path / "vision")
    secret = secret_file(tmp_path)
    (vision / "config.json").unlink()
    (vision / "config.json").symlink_to(secret)
    with pytest.raises(UnsafePathError) as info:
        mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": vision}), tmp_path / "out")
    assert info.value.file == str(vision / "config.json")
    assert_no_output(tmp_path, tmp_path / "out")


def test_a_fifo_named_like_a_tokenizer_is_refused_without_hanging(tiny_models, tmp_path):
    vision = copy_model(tiny_models["vision_dir"], tmp_path / "vision")
    os.mkfifo(vision / "tokenizer.json")
    with pytest.raises(UnsafePathError, match="FIFO") as info:
        mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": vision}), tmp_path / "out")
    assert info.value.file == str(vision / "tokenizer.json")
    assert_no_output(tmp_path, tmp_path / "out")


def test_a_device_behind_an_allowed_link_is_still_refused(tiny_models, tmp_path, monkeypatch):
    vision = copy_model(tiny_models["vision_dir"], tmp_path / "vision")
    (vision / "tokenizer.json").symlink_to("/dev/zero")  # an endless read
    monkeypatch.setenv(ENV_ALLOW_EXTERNAL_LINKS, "1")
    with pytest.raises(UnsafePathError, match="character device"):
        mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": vision}), tmp_path / "out")
    assert_no_output(tmp_path, tmp_path / "out")


def test_an_oversized_side_file_is_refused_before_it_is_read(tiny_models, tmp_path):
    vision = copy_model(tiny_models["vision_dir"], tmp_path / "vision")
    with open(vision / "tokenizer.json", "wb") as f:
        f.truncate(513 * 1024 * 1024)  # sparse: claims 513 MiB, occupies nothing
    with pytest.raises(CheckpointFormatError, match="MiB") as info:
        mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": vision}), tmp_path / "out")
    assert info.value.file == str(vision / "tokenizer.json") and info.value.hint
    assert_no_output(tmp_path, tmp_path / "out")


def test_side_files_are_copied_with_a_fresh_files_mode_never_the_sources(tiny_models, tmp_path):
    vision = copy_model(tiny_models["vision_dir"], tmp_path / "vision")
    (vision / "tokenizer_config.json").chmod(0o777)
    mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": vision}), tmp_path / "out")
    mask = os.umask(0)
    os.umask(mask)
    copied = tmp_path / "out" / "components" / "vision" / "tokenizer_config.json"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o644 & ~mask


# --------------------------------------------------------------------------------------- weight files, indexes


def test_a_weight_file_linked_out_of_the_model_dir_is_refused_naming_the_link(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file({"w": torch.ones(2)}, str(outside / "weights.safetensors"))
    model = tmp_path / "model"
    model.mkdir()
    (model / SAFETENSORS_SINGLE).symlink_to(outside / "weights.safetensors")
    with pytest.raises(UnsafePathError) as info:
        CheckpointReader(model)
    assert info.value.file == str(model / SAFETENSORS_SINGLE)


def test_an_index_linked_out_of_the_model_dir_is_refused_naming_it(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    model = tmp_path / "model"
    model.mkdir()
    weight_map = shards(model, {"model-00001-of-00001.safetensors": ["a"]})
    (model / SAFETENSORS_INDEX).symlink_to(write_index(outside, weight_map))
    with pytest.raises(UnsafePathError) as info:
        CheckpointReader(model)
    assert info.value.file == str(model / SAFETENSORS_INDEX)


def test_a_shard_named_by_the_index_and_linked_out_is_refused_naming_the_link(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shards(outside, {"stolen.safetensors": ["b"]})
    model = tmp_path / "model"
    model.mkdir()
    weight_map = shards(model, {"model-00001-of-00002.safetensors": ["a"]})
    (model / "model-00002-of-00002.safetensors").symlink_to(outside / "stolen.safetensors")
    write_index(model, weight_map | {"b": "model-00002-of-00002.safetensors"})
    with pytest.raises(UnsafePathError) as info:
        CheckpointReader(model)
    assert info.value.file == str(model / "model-00002-of-00002.safetensors")
    assert "shard" in info.value.message


@pytest.mark.parametrize("shard", ["../../x.safetensors", "/etc/x.safetensors", "sub/../../x.safetensors", ""])
def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused_naming_the_index_and_key(tmp_path, shard):
    model = tmp_path / "a" / "b" / "model"
    model.mkdir(parents=True)
    weight_map = shards(model, {"model-00001-of-00001.safetensors": ["a"]})
    save_file({"evil": torch.ones(2)}, str(tmp_path / "a" / "x.safetensors"))  # exists: only the rule refuses it
    index = write_index(model, weight_map | {"evil": shard})
    with pytest.raises(CheckpointFormatError) as info:
        CheckpointReader(model)
    err = info.value
    assert err.file == str(index)
    assert err.key == "evil"
    assert str(index) in err.message and "'evil'" in err.message and "outside the checkpoint" in err.message
    assert err.hint


def test_a_fifo_under_a_weight_files_name_is_refused_without_hanging(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / SAFETENSORS_SINGLE)
    with pytest.raises(UnsafePathError, match="FIFO") as info:
        CheckpointReader(model)
    assert info.value.file == str(model / SAFETENSORS_SINGLE)


def test_links_that_stay_inside_the_model_dir_are_followed(tmp_path):
    model = tmp_path / "model"
    (model / "store").mkdir(parents=True)
    save_file({"w": torch.arange(3.0)}, str(model / "store" / "v2.safetensors"))
    (model / "store" / "tok.json").write_text("{}")
    (model / SAFETENSORS_SINGLE).symlink_to("store/v2.safetensors")
    (model / "tokenizer.json").symlink_to("store/tok.json")
    with CheckpointReader(model) as reader:
        assert torch.equal(reader.get("w"), torch.arange(3.0))
        assert reader.weight_files() == [model / SAFETENSORS_SINGLE]  # the name the directory shows
        assert reader.side_files["tokenizer.json"] == (model / "store" / "tok.json").resolve()


def test_a_model_path_that_is_itself_a_link_to_a_directory_is_accepted(tiny_models, tmp_path):
    named = tmp_path / "my-model"
    named.symlink_to(tiny_models["vision_dir"], target_is_directory=True)
    resolved = resolve_model(str(named))
    assert resolved.path == Path(tiny_models["vision_dir"]).resolve()
    with CheckpointReader(named) as reader:
        assert reader.tensors
    report = mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": named}), tmp_path / "out")
    assert report.output == str(tmp_path / "out")


# ------------------------------------------------------------------------------------------------ Hub cache


def test_a_merge_from_the_hub_cache_follows_its_snapshot_links(tiny_models, tmp_path, hf_cache):
    for name in ("base", "vision", "audio"):
        cache_model(hf_cache, f"org/{name}", tiny_models[f"{name}_dir"], COMMIT)
    recipe = recipe_for("org/base", {"vision": "org/vision", "audio": "org/audio"}, hash_inputs=True)
    mmer.run_merge(recipe, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "mmer_manifest.json").read_text())
    weights = (Path(tiny_models["vision_dir"]) / SAFETENSORS_SINGLE).read_bytes()
    assert manifest["modalities"]["vision"]["source"]["files"] == {
        SAFETENSORS_SINGLE: hashlib.sha256(weights).hexdigest()
    }
    copied = tmp_path / "out" / "components" / "vision" / "tokenizer_config.json"
    assert copied.read_bytes() == (Path(tiny_models["vision_dir"]) / "tokenizer_config.json").read_bytes()
    assert not copied.is_symlink()


def test_a_hub_snapshot_link_out_of_its_repo_folder_is_refused(tiny_models, tmp_path, hf_cache):
    cache_model(hf_cache, "org/base", tiny_models["base_dir"], COMMIT)
    snapshot = cache_model(hf_cache, "org/vision", tiny_models["vision_dir"], COMMIT)
    link = snapshot / "tokenizer_config.json"
    link.unlink()
    link.symlink_to(secret_file(tmp_path))
    with pytest.raises(UnsafePathError) as info:
        mmer.run_merge(recipe_for("org/base", {"vision": "org/vision"}), tmp_path / "out")
    assert info.value.file == str(link)
    assert_no_output(tmp_path, tmp_path / "out")


def test_a_hub_snapshot_link_into_another_repo_of_the_cache_is_refused(tiny_models, tmp_path, hf_cache):
    cache_model(hf_cache, "org/base", tiny_models["base_dir"], COMMIT)
    snapshot = cache_model(hf_cache, "org/vision", tiny_models["vision_dir"], COMMIT)
    other = cache_model(hf_cache, "someone/private", tiny_models["audio_dir"], COMMIT)
    link = snapshot / SAFETENSORS_SINGLE
    link.unlink()
    link.symlink_to(os.path.relpath(os.path.realpath(other / SAFETENSORS_SINGLE), snapshot))
    with pytest.raises(UnsafePathError) as info:
        CheckpointReader(resolve_model("org/vision").path)
    assert info.value.file == str(snapshot / SAFETENSORS_SINGLE)


# ------------------------------------------------------------------------------------ checkpoints read back


def test_a_rebuilt_models_side_files_come_only_from_inside_the_checkpoint(tiny_models, tmp_path):
    """A checkpoint is as untrusted as a model: a component's side file linked out of it is not copied."""
    ckpt = tmp_path / "ckpt"
    mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}), ckpt)
    side = ckpt / "components" / "vision" / "tokenizer_config.json"
    outside = tmp_path / "same-bytes.json"
    outside.write_bytes(side.read_bytes())  # same content: the recorded hash still matches through the link
    side.unlink()
    side.symlink_to(outside)
    with pytest.raises(UnsafePathError) as info:
        mmer.reconstruct(ckpt, tmp_path / "rebuilt")
    assert info.value.file == str(side)
    assert not (tmp_path / "rebuilt").exists()


def test_a_checkpoint_downloaded_into_the_hub_cache_rebuilds_through_its_snapshot_links(tiny_models, tmp_path):
    """Every file of a Hub snapshot, in subfolders too, is a link into the repo folder's blobs."""
    ckpt = tmp_path / "ckpt"
    mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}), ckpt)
    repo = tmp_path / "hub" / "models--org--merged"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(ckpt)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    mmer.reconstruct(snapshot, tmp_path / "rebuilt")
    rebuilt = tmp_path / "rebuilt" / "vision"
    assert (rebuilt / "tokenizer_config.json").read_bytes() == (
        Path(tiny_models["vision_dir"]) / "tokenizer_config.json"
    ).read_bytes()
    with CheckpointReader(rebuilt) as reader:
        assert reader.tensors
