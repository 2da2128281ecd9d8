"""resolve_model: local directories, and Hub ids through a fake, offline Hugging Face cache (never the network)."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from mmer.errors import ModelNotFoundError
from mmer.io.resolve import ResolvedModel, cached_blob_sha256, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TAG_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def add_cached_repo(cache: Path, repo_id: str, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Lay out ``models--org--name`` as huggingface_hub does: refs, blobs named by hash, snapshot symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    snapshot = repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, exactly as huggingface_hub writes it

    weights = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
    weights_blob = blobs / hashlib.sha256(weights).hexdigest()  # LFS files: blob named by sha256
    weights_blob.write_bytes(weights)
    config = b'{"model_type": "llama"}'
    config_blob = blobs / hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()  # git blob id (40 hex)
    config_blob.write_bytes(config)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(weights_blob, snapshot))
    (snapshot / "config.json").symlink_to(os.path.relpath(config_blob, snapshot))
    return snapshot


# ------------------------------------------------------------------------------------------------- local


def test_a_local_directory_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    resolved = resolve_model(str(tmp_path))
    assert resolved == ResolvedModel(spec_model=str(tmp_path), path=tmp_path.resolve())
    assert resolved.hub_id is None and resolved.commit is None


def test_a_relative_local_directory_resolves_to_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    monkeypatch.chdir(tmp_path)
    # "org/name" exists locally, so it is a path, not a Hub id.
    resolved = resolve_model("org/name")
    assert resolved.path == (tmp_path / "org" / "name").resolve()
    assert resolved.hub_id is None


def test_a_file_path_is_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(f))
    assert info.value.file == str(f)
    assert str(f) in info.value.message
    assert info.value.hint


def test_a_revision_with_a_local_path_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(tmp_path), revision="main")
    assert info.value.file == str(tmp_path)
    assert "revision" in info.value.message
    assert info.value.hint


@pytest.mark.parametrize("spec", ["./missing-model", "/definitely/not/here", "~/no-such-mmer-model", "a/b/c"])
def test_a_missing_path_is_refused_without_asking_the_hub(spec, hf_cache):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(spec)
    assert "no such directory" in info.value.message
    assert info.value.file == spec
    assert info.value.hint


# --------------------------------------------------------------------------------------------------- hub


def test_a_hub_id_resolves_through_the_offline_cache(hf_cache):
    snapshot = add_cached_repo(hf_cache, "org/name")
    resolved = resolve_model("org/name")
    assert resolved.path == snapshot.resolve()
    assert resolved.hub_id == "org/name"
    assert resolved.spec_model == "org/name"
    assert resolved.revision == "main"
    assert resolved.commit == COMMIT
    assert (resolved.path / "config.json").read_text() == '{"model_type": "llama"}'


def test_a_hub_id_resolves_a_named_revision_through_its_ref(hf_cache):
    add_cached_repo(hf_cache, "org/name")
    snapshot = add_cached_repo(hf_cache, "org/name", commit=TAG_COMMIT, ref="v1.0")
    resolved = resolve_model("org/name", revision="v1.0")
    assert resolved.path == snapshot.resolve()
    assert resolved.revision == "v1.0"
    assert resolved.commit == TAG_COMMIT


def test_a_hub_id_resolves_a_commit_hash_revision_directly(hf_cache):
    snapshot = add_cached_repo(hf_cache, "org/name", commit=TAG_COMMIT, ref=None)
    resolved = resolve_model("org/name", revision=TAG_COMMIT)
    assert resolved.path == snapshot.resolve()
    assert resolved.commit == TAG_COMMIT


@pytest.mark.parametrize(
    "repo_id, revision",
    [
        pytest.param("org/unknown", None, id="unknown id"),
        pytest.param("org/name", "no-such-branch", id="unknown revision"),
        pytest.param("org/name", "f" * 40, id="uncached commit"),
        pytest.param("solo-model", None, id="unknown id without org"),
    ],
)
def test_an_uncached_hub_id_offline_is_refused_with_a_hint(hf_cache, repo_id, revision):
    add_cached_repo(hf_cache, "org/name")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(repo_id, revision=revision)
    err = info.value
    assert err.file == repo_id
    assert repo_id in err.message
    assert "local Hugging Face cache" in err.message
    assert err.hint and "HF_HUB_OFFLINE" in err.hint


def test_a_ref_whose_snapshot_is_missing_is_refused(hf_cache):
    repo = hf_cache / "models--org--broken"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("org/broken")
    assert info.value.hint


def test_an_invalid_hub_id_is_refused(hf_cache):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("org/bad name!")
    assert info.value.file == "org/bad name!"
    assert "org/bad name!" in info.value.message


# --------------------------------------------------------------------------------------------- blob sha


def test_cached_blob_sha256_reads_the_sha256_of_an_lfs_file_from_its_blob_name(hf_cache):
    snapshot = add_cached_repo(hf_cache, "org/name")
    weights = snapshot / "model.safetensors"
    assert cached_blob_sha256(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_cached_blob_sha256_is_none_for_a_git_blob_named_by_sha1(hf_cache):
    snapshot = add_cached_repo(hf_cache, "org/name")
    assert cached_blob_sha256(snapshot / "config.json") is None


def test_cached_blob_sha256_is_none_for_a_plain_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"abc")
    assert cached_blob_sha256(f) is None


@pytest.mark.parametrize(
    "target_dir, name",
    [
        pytest.param("elsewhere", "a" * 64, id="64-hex name outside blobs/"),
        pytest.param("blobs", "A" * 64, id="upper-case hex"),
        pytest.param("blobs", "g" * 64, id="not hex"),
        pytest.param("blobs", "a" * 63, id="63 characters"),
    ],
)
def test_cached_blob_sha256_is_none_for_a_symlink_that_is_not_a_sha256_blob(tmp_path, target_dir, name):
    (tmp_path / target_dir).mkdir()
    target = tmp_path / target_dir / name
    target.write_bytes(b"abc")
    link = tmp_path / "model.safetensors"
    link.symlink_to(target)
    assert cached_blob_sha256(link) is None


def test_cached_blob_sha256_follows_a_chain_of_symlinks_to_the_blob(hf_cache, tmp_path):
    snapshot = add_cached_repo(hf_cache, "org/name")
    outer = tmp_path / "linked.safetensors"
    outer.symlink_to(snapshot / "model.safetensors")
    assert cached_blob_sha256(outer) == cached_blob_sha256(snapshot / "model.safetensors")
    assert cached_blob_sha256(outer) is not None


def test_an_invalid_hub_id_error_carries_a_hint(hf_cache):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("org/bad name!")
    assert info.value.hint
