"""A decoupled checkpoint named by its Hub id opens from the Hugging Face cache, offline, in every reader.

Each test lays a real checkpoint out as huggingface_hub does (``models--org--name``: blobs named by hash,
snapshot links into them, refs) in a cache of its own, with ``HF_HUB_OFFLINE=1`` and every socket refused; so
these are the same bytes a download would leave, read with no network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from cli_runner import cli

import mmer
from mmer.checkpoint.decoupled import load_decoupled
from mmer.checkpoint.hub import checkpoint_directory, needed_files
from mmer.checkpoint.manifest import Manifest
from mmer.config import build_recipe
from mmer.errors import ConfigError, DecoupledFormatError, ModelNotFoundError, UnsafePathError

REPO = "org/merged"
COMMIT = "a" * 40
TAGGED = "b" * 40


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def merged(demo_models, tmp_path_factory) -> Path:
    """The demo's vision + audio checkpoint (real transformers classes, so the router can build them), its base
    copied in so that it stands alone, as a Hub upload would."""
    out = tmp_path_factory.mktemp("hub") / "merged"
    mmer.run_merge(build_recipe(list(demo_models.specs), base_storage="copy"), out)
    return out


def cache_checkpoint(cache: Path, source: Path, commit: str = COMMIT, refs: dict[str, str] | None = None) -> Path:
    """``source`` (with its sub-folders) as a cached snapshot of REPO: blobs by sha256, relative links, refs."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for ref, target in (refs or {"main": commit}).items():
        (repo / "refs" / ref).write_text(target)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def same_tensors(a, b) -> None:
    for name in a.modalities:
        for slot in a.merged_slots:
            assert torch.equal(a.llm_tensor(name, slot.name), b.llm_tensor(name, slot.name)), (name, slot.name)


# ------------------------------------------------------------------------------------------------ library
def test_a_hub_id_opens_the_cached_snapshot_and_reads_the_same_tensors_as_the_directory(merged, hf_cache):
    snapshot = cache_checkpoint(hf_cache, merged)
    with load_decoupled(REPO) as by_id, load_decoupled(merged) as local:
        assert by_id.path == snapshot
        assert by_id.modalities == local.modalities == ["vision", "audio"]
        same_tensors(by_id, local)


def test_a_revision_names_a_branch_tag_or_commit_of_the_cached_repo(merged, hf_cache):
    cache_checkpoint(hf_cache, merged, COMMIT, refs={"main": TAGGED, "v1": COMMIT})
    cache_checkpoint(hf_cache, merged, TAGGED, refs={"main": TAGGED, "v1": COMMIT})
    assert load_decoupled(REPO).path.name == TAGGED
    assert load_decoupled(REPO, revision="v1").path.name == COMMIT
    assert load_decoupled(REPO, revision=COMMIT).path.name == COMMIT
    with pytest.raises(ModelNotFoundError, match="org/merged@v2"):
        load_decoupled(REPO, revision="v2")


def test_the_router_and_reconstruct_take_a_hub_id_and_rebuild_what_the_directory_rebuilds(merged, hf_cache, tmp_path):
    cache_checkpoint(hf_cache, merged)
    by_id = mmer.Router.from_pretrained(REPO, modalities=["vision"], revision="main").models["vision"].model
    local = mmer.Router.from_pretrained(merged, modalities=["vision"]).models["vision"].model
    by_id_state, local_state = by_id.state_dict(), local.state_dict()
    assert by_id_state.keys() == local_state.keys()
    assert all(torch.equal(by_id_state[k], local_state[k]) for k in local_state)
    mmer.reconstruct(REPO, tmp_path / "by-id", ["vision"], subdirs=False, revision="main")
    mmer.reconstruct(merged, tmp_path / "local", ["vision"], subdirs=False)
    for file in sorted((tmp_path / "local").rglob("*.safetensors")):
        twin = tmp_path / "by-id" / file.relative_to(tmp_path / "local")
        assert twin.read_bytes() == file.read_bytes(), file.name


def test_a_reader_of_some_modalities_needs_only_their_files(merged, hf_cache):
    snapshot = cache_checkpoint(hf_cache, merged)
    shutil.rmtree(snapshot / "components" / "audio")
    (snapshot / "masks" / "audio.safetensors").unlink()
    manifest = Manifest.read(merged)
    needed = needed_files(manifest, ["vision"])
    assert "masks/vision.safetensors" in needed and "masks/audio.safetensors" not in needed
    assert not [f for f in needed if f.startswith("components/audio/")]
    assert set(needed_files(manifest)) == set(manifest.files)

    router = mmer.Router.from_pretrained(REPO, modalities=["vision"])  # audio is never asked for
    assert list(router.models) == ["vision"]
    with pytest.raises(ModelNotFoundError) as info:
        load_decoupled(REPO)  # every modality: the missing ones are named, with the command that fetches them
    assert "org/merged" in info.value.message and "not in the local Hugging Face cache" in info.value.message
    assert info.value.key in ("components/audio/config.json", "masks/audio.safetensors") or "audio" in info.value.key
    assert f"hf download {REPO} --revision {COMMIT}" in info.value.hint


def test_an_id_that_is_not_cached_offline_is_refused_naming_the_id_and_the_fix(hf_cache):
    with pytest.raises(ModelNotFoundError) as info:
        load_decoupled("org/nowhere")
    err = info.value
    assert "org/nowhere" in err.message and "cache" in err.message
    assert "hf download org/nowhere" in err.hint and "HF_HUB_OFFLINE" in err.hint
    assert err.exit_code == 2


def test_a_cached_repo_that_is_no_checkpoint_is_refused_naming_the_manifest(demo_models, hf_cache):
    cache_checkpoint(hf_cache, demo_models.base)  # a plain model, no mmer_manifest.json
    with pytest.raises(ModelNotFoundError, match="mmer_manifest.json"):
        load_decoupled(REPO)


def test_a_revision_for_a_local_directory_is_a_usage_error_and_a_missing_path_keeps_its_message(merged, tmp_path):
    with pytest.raises(ConfigError, match="revision"):
        load_decoupled(merged, revision="main")
    with pytest.raises(DecoupledFormatError, match="no mmer_manifest.json"):
        load_decoupled(tmp_path / "missing")  # an absolute path is never taken for a Hub id
    assert checkpoint_directory("merged") == Path("merged")  # nor is a bare name


# ----------------------------------------------------------------------------------------- untrusted links
def test_a_cached_file_linking_outside_its_repo_folder_is_refused(merged, hf_cache, tmp_path):
    snapshot = cache_checkpoint(hf_cache, merged)
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((merged / "components" / "vision" / "config.json").read_bytes())
    link = snapshot / "components" / "vision" / "config.json"
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside"):
        mmer.reconstruct(REPO, tmp_path / "out", ["vision"], subdirs=False)


def test_a_manifest_linking_into_another_cached_repo_is_refused(merged, hf_cache):
    snapshot = cache_checkpoint(hf_cache, merged)
    other = hf_cache / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    stolen = other / "manifest"
    stolen.write_bytes((merged / "mmer_manifest.json").read_bytes())
    (snapshot / "mmer_manifest.json").unlink()
    (snapshot / "mmer_manifest.json").symlink_to(os.path.relpath(stolen, snapshot))
    with pytest.raises(UnsafePathError, match="outside"):
        load_decoupled(REPO)


# ------------------------------------------------------------------------------------------------ commands
def test_every_command_that_reads_a_checkpoint_takes_a_hub_id_and_a_revision(demo_models, merged, hf_cache, tmp_path):
    cache_checkpoint(hf_cache, merged, refs={"main": COMMIT, "v1": COMMIT})
    result = cli("inspect-masks", REPO, "--revision", "v1", "--json")
    assert result.exit_code == 0, result
    assert set(result.json()["modalities"]) == {"vision", "audio"}

    result = cli("reconstruct", REPO, "--revision", "v1", "--modality", "vision", "-o", tmp_path / "rebuilt", "-q")
    assert result.exit_code == 0, result
    assert (tmp_path / "rebuilt" / "config.json").is_file()

    result = cli("verify", REPO, "--revision", "v1", "--json")
    assert result.exit_code == 0, result
    assert result.json()["ok"] is True and result.json()["files_checked"] == len(Manifest.read(merged).files)

    spec = tmp_path / "video.yaml"
    spec.write_text(f"model: {demo_models.audio}\nmodality: video\n")
    result = cli("add", REPO, spec, "--revision", "v1", "-o", tmp_path / "added", "--dry-run", "--json")
    assert result.exit_code == 0, result
    assert set(result.json()["added"]) == {"video"}

    result = cli("tune", "--revision", "v1", "--json")
    assert result.exit_code == 2 and "--checkpoint" in result.json()["message"], result


def test_a_command_given_an_uncached_id_offline_exits_2_with_the_fix(hf_cache):
    result = cli("inspect-masks", "org/nowhere", "--json")
    assert result.exit_code == 2, result
    error = result.json()
    assert "org/nowhere" in error["message"] and "hf download org/nowhere" in error["hint"]
