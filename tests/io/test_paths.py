"""mmer.io.paths: the one rule for where mmer may read, and how it opens and copies what it reads."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mmer.errors import CheckpointFormatError, UnsafePathError
from mmer.io.paths import (
    ENV_ALLOW_EXTERNAL_LINKS,
    allowed_roots,
    check_inside,
    copy_regular_file,
    external_links_allowed,
    regular_file,
    set_allow_external_links,
)


@pytest.fixture(autouse=True)
def links_policy_from_a_clean_environment(monkeypatch):
    """Each test starts with no opt-in, and leaves none behind for the next."""
    monkeypatch.delenv(ENV_ALLOW_EXTERNAL_LINKS, raising=False)
    set_allow_external_links(None)
    yield
    set_allow_external_links(None)


def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------ check_inside


def test_a_plain_file_inside_the_directory_resolves_to_itself(tmp_path):
    d = model_dir(tmp_path)
    assert check_inside(d, d / "config.json") == (d / "config.json").resolve()


def test_a_directory_named_relative_to_the_working_directory_is_joined_once(tmp_path, monkeypatch):
    d = model_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    relative = d.relative_to(tmp_path)
    assert check_inside(relative, relative / "config.json") == (d / "config.json").resolve()


def test_a_link_to_another_file_inside_the_directory_is_followed(tmp_path):
    d = model_dir(tmp_path)
    (d / "weights").mkdir()
    (d / "weights" / "real.json").write_text("{}")
    (d / "tokenizer.json").symlink_to("weights/real.json")
    assert check_inside(d, d / "tokenizer.json") == (d / "weights" / "real.json").resolve()


@pytest.mark.parametrize("target", ["/proc/self/environ", "/etc/shadow", "../secret.txt", "/no/such/file"])
def test_a_symlink_out_of_the_model_dir_is_refused_naming_the_link(tmp_path, target):
    d = model_dir(tmp_path)
    (tmp_path / "secret.txt").write_text("API_KEY=hunter2")
    link = d / "tokenizer.json"
    link.symlink_to(target)
    with pytest.raises(UnsafePathError) as info:
        check_inside(d, d / "tokenizer.json", what="side file")
    err = info.value
    assert err.file == str(link)
    assert str(link) in err.message and "outside" in err.message
    assert err.hint and ENV_ALLOW_EXTERNAL_LINKS in err.hint and "--allow-external-links" in err.hint
    assert err.exit_code == 1


def test_a_dotdot_path_that_is_no_link_is_refused_too(tmp_path):
    d = model_dir(tmp_path)
    (tmp_path / "secret.txt").write_text("x")
    with pytest.raises(UnsafePathError):
        check_inside(d, d / "../secret.txt")


def test_a_link_through_a_linked_subdirectory_is_judged_by_where_it_lands(tmp_path):
    d = model_dir(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "tok.json").write_text("{}")
    (d / "sub").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        check_inside(d, d / "sub/tok.json")


def test_the_directory_itself_may_be_a_link_the_user_named(tmp_path):
    d = model_dir(tmp_path)
    named = tmp_path / "named"
    named.symlink_to(d)
    (d / "tokenizer.json").symlink_to("config.json")
    assert check_inside(named, named / "config.json") == (d / "config.json").resolve()
    assert check_inside(named, named / "tokenizer.json") == (d / "config.json").resolve()


# ---------------------------------------------------------------------------------------------- Hub cache roots


def snapshot_dir(cache: Path, repo: str = "models--org--name", commit: str = "c" * 40) -> Path:
    snap = cache / repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (cache / repo / "blobs").mkdir()
    return snap


def test_a_hub_snapshot_may_link_into_its_own_repo_folder(tmp_path):
    snap = snapshot_dir(tmp_path / "hub")
    blob = snap.parent.parent / "blobs" / ("a" * 64)
    blob.write_text("{}")
    (snap / "config.json").symlink_to(os.path.relpath(blob, snap))
    assert allowed_roots(snap) == (snap.resolve(), (tmp_path / "hub" / "models--org--name").resolve())
    assert check_inside(snap, snap / "config.json") == blob.resolve()


def test_a_hub_snapshot_may_not_link_into_another_repo_of_the_cache(tmp_path):
    snap = snapshot_dir(tmp_path / "hub")
    other = snapshot_dir(tmp_path / "hub", "models--someone--else")
    blob = other.parent.parent / "blobs" / ("b" * 64)
    blob.write_text("{}")
    (snap / "config.json").symlink_to(os.path.relpath(blob, snap))
    with pytest.raises(UnsafePathError) as info:
        check_inside(snap, snap / "config.json")
    assert info.value.file == str(snap / "config.json")


def test_a_directory_not_in_a_snapshot_gets_no_repo_folder(tmp_path):
    d = model_dir(tmp_path)
    assert allowed_roots(d) == (d.resolve(),)
    assert allowed_roots(tmp_path / "models--a--b" / "snapshots") == ((tmp_path / "models--a--b" / "snapshots"),)


# ------------------------------------------------------------------------------------------------------ opt-in


def test_the_environment_variable_lets_an_external_link_through(tmp_path, monkeypatch):
    d = model_dir(tmp_path)
    (tmp_path / "shared.json").write_text("{}")
    (d / "tokenizer.json").symlink_to(tmp_path / "shared.json")
    monkeypatch.setenv(ENV_ALLOW_EXTERNAL_LINKS, "1")
    assert external_links_allowed()
    assert check_inside(d, d / "tokenizer.json") == (tmp_path / "shared.json").resolve()


@pytest.mark.parametrize("value, allowed", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_the_environment_variable_is_read_as_a_boolean(monkeypatch, value, allowed):
    monkeypatch.setenv(ENV_ALLOW_EXTERNAL_LINKS, value)
    assert external_links_allowed() is allowed


def test_the_programmatic_switch_overrides_the_environment_until_reset(monkeypatch):
    monkeypatch.setenv(ENV_ALLOW_EXTERNAL_LINKS, "1")
    set_allow_external_links(False)
    assert not external_links_allowed()
    set_allow_external_links(None)
    assert external_links_allowed()
    monkeypatch.delenv(ENV_ALLOW_EXTERNAL_LINKS)
    set_allow_external_links(True)
    assert external_links_allowed()


# ------------------------------------------------------------------------------------------------ regular_file


def test_regular_file_is_false_where_nothing_is_and_true_for_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    assert regular_file(tmp_path / "f", "f")
    assert not regular_file(tmp_path / "missing", "missing")


@pytest.mark.parametrize(
    "make, kind",
    [
        pytest.param(lambda p: os.mkfifo(p), "FIFO", id="fifo"),
        pytest.param(lambda p: p.mkdir(), "directory", id="directory"),
    ],
)
def test_anything_but_a_regular_file_is_refused_without_being_opened(tmp_path, make, kind):
    path = tmp_path / "tokenizer.json"
    make(path)
    with pytest.raises(UnsafePathError) as info:
        regular_file(path, path, what="side file")
    assert kind in info.value.message and info.value.file == str(path)
    assert info.value.hint


def test_a_character_device_is_refused(tmp_path):
    with pytest.raises(UnsafePathError, match="character device"):
        regular_file("/dev/zero", tmp_path / "tokenizer.json")


# ------------------------------------------------------------------------------------------- copy_regular_file


def test_a_copy_has_the_same_bytes_and_a_fresh_files_mode_whatever_the_source_mode(tmp_path):
    src = tmp_path / "tokenizer.json"
    src.write_bytes(b'{"a": 1}' * 1000)
    src.chmod(0o4777)  # setuid, executable and world-writable: none of it may reach the copy
    dst = tmp_path / "out.json"
    assert copy_regular_file(src, dst, shown=src, max_bytes=1 << 20) == 8000
    assert dst.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(dst.stat().st_mode) == 0o644 & ~umask()


def test_a_copy_of_a_fifo_is_refused_and_does_not_hang(tmp_path):
    fifo = tmp_path / "tokenizer.json"
    os.mkfifo(fifo)  # no writer: a blocking open or read would wait forever
    with pytest.raises(UnsafePathError, match="FIFO"):
        copy_regular_file(fifo, tmp_path / "out.json", shown=fifo, max_bytes=1 << 20)
    assert not (tmp_path / "out.json").exists()


def test_a_copy_stops_at_the_size_cap_and_leaves_no_partial_file(tmp_path):
    src = tmp_path / "tokenizer.json"
    src.write_bytes(b"x" * 5000)
    with pytest.raises(CheckpointFormatError) as info:
        copy_regular_file(src, tmp_path / "out.json", shown=src, max_bytes=4096)
    assert info.value.file == str(src) and info.value.hint
    assert not (tmp_path / "out.json").exists()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_the_size_cap_holds_for_a_file_whose_size_claims_zero(tmp_path):
    assert os.stat("/proc/self/status").st_size == 0
    with pytest.raises(CheckpointFormatError, match="larger than"):
        copy_regular_file("/proc/self/status", tmp_path / "out", shown="/proc/self/status", max_bytes=64)


def test_a_source_that_is_a_link_at_open_time_is_refused(tmp_path):
    """Callers pass the real path check_inside returned: a link found there was swapped in after the check."""
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "swapped.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(CheckpointFormatError, match="cannot be read"):
        copy_regular_file(tmp_path / "swapped.json", tmp_path / "out.json", shown="x", max_bytes=1 << 20)
