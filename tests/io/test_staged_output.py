"""StagedOutput replaces only what mmer wrote, never what a run reads, and cleans up after runs that were killed.

Every output carries mmer's marker from the moment its staging directory exists; ``overwrite`` replaces a
directory only when it holds that marker (or the manifest of an output written before the marker existed);
links, files, unrelated directories and inputs are refused with the reason and a fix. Leftovers of killed runs
to the same output are removed when their process is gone and they carry the marker, and are reported.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmer.errors import DiskFullError, OutputExistsError, OutputWriteError
from mmer.io import outputs
from mmer.io.outputs import MARKER_NAME, is_mmer_output, marker_bytes, read_marker
from mmer.io.writer import StagedOutput

DEAD_PID = 2**22 + 17  # above Linux's largest pid_max: never a live process


def previous_output(target: Path, content: str = "old") -> Path:
    with StagedOutput(target) as staging:
        (staging / "old.txt").write_text(content)
    return target


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed), to show nothing was changed or lost."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_text(errors="replace")
        else:
            out[rel] = "dir"
    return out


def leftover(parent: Path, name: str, pid: int, *, marked: bool = True, what: str = "staging") -> Path:
    path = parent / f".{name}.mmer-{what}-{pid}-deadbeef"
    path.mkdir()
    (path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1_500_000)
    if marked:
        (path / MARKER_NAME).write_bytes(marker_bytes("decoupled-checkpoint"))
    return path


# ------------------------------------------------------------------------------------------------- the marker
def test_the_marker_is_in_the_staging_directory_from_the_start_and_in_the_output(tmp_path):
    target = tmp_path / "out"
    with StagedOutput(target, kind="reconstruct") as staging:
        assert (staging / MARKER_NAME).is_file()  # before anything else is written, so a merge hashes it
    assert read_marker(target) == {
        "tool": "mmer",
        "kind": "reconstruct",
        "mmer_version": read_marker(target)["mmer_version"],
    }


def test_the_marker_is_the_same_bytes_every_run_so_outputs_stay_reproducible(tmp_path):
    with StagedOutput(tmp_path / "a") as staging:
        pass
    with StagedOutput(tmp_path / "b") as staging:
        pass
    assert (tmp_path / "a" / MARKER_NAME).read_bytes() == (tmp_path / "b" / MARKER_NAME).read_bytes()
    assert staging.name.startswith(".b.mmer-staging-")


@pytest.mark.parametrize(
    "content",
    [b"", b"{}", b'{"tool": "other", "kind": "x"}', b"[1, 2]", b"\xff\xfe", b"[" * 10_000, b" " * 10_000],
    ids=["empty", "no-tool", "other-tool", "list", "not-utf8", "deep", "huge"],
)
def test_a_marker_that_is_not_mmers_does_not_make_a_directory_replaceable(tmp_path, content):
    target = tmp_path / "out"
    target.mkdir()
    (target / MARKER_NAME).write_bytes(content)
    (target / "mine.txt").write_text("mine")
    assert not is_mmer_output(target)
    with pytest.raises(OutputExistsError, match="not an mmer output"):
        StagedOutput(target, overwrite=True)
    assert (target / "mine.txt").read_text() == "mine"


def test_a_marker_that_is_a_link_does_not_count(tmp_path):
    real = tmp_path / "real-marker"
    real.write_bytes(marker_bytes("merge"))
    target = tmp_path / "out"
    target.mkdir()
    (target / MARKER_NAME).symlink_to(real)
    assert not is_mmer_output(target)


# ---------------------------------------------------------------------------------------- what is replaced
def test_overwrite_replaces_a_previous_mmer_output(tmp_path):
    target = previous_output(tmp_path / "out")
    with StagedOutput(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [MARKER_NAME, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("manifest", ["mmer_manifest.json", "moextend_manifest.json"])
def test_overwrite_replaces_an_output_written_before_the_marker_existed(tmp_path, manifest):
    target = tmp_path / "out"
    target.mkdir()
    (target / manifest).write_text("{}")
    with StagedOutput(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert not (target / manifest).exists() and (target / "new.txt").exists()


def test_overwrite_replaces_an_empty_directory_it_has_nothing_to_lose(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with StagedOutput(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert (target / "new.txt").exists()


def test_without_overwrite_even_mmers_own_output_is_refused_with_the_flag_as_the_fix(tmp_path):
    target = previous_output(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="already exists") as info:
        StagedOutput(target)
    assert "--overwrite" in info.value.hint


# ------------------------------------------------------------------------------------------ what is refused
def test_overwrite_refuses_an_unrelated_directory_naming_it_and_saying_why(tmp_path):
    target = tmp_path / "thesis"
    target.mkdir()
    (target / "chapter1.tex").write_text("years of work")
    with pytest.raises(OutputExistsError) as info:
        StagedOutput(target, overwrite=True)
    err = info.value
    assert err.file == str(target) and str(target) in err.message
    assert "not an mmer output" in err.message and MARKER_NAME in err.message
    assert "new output path" in err.hint
    assert tree(target) == {"chapter1.tex": "years of work"}


def test_overwrite_refuses_a_plain_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(OutputExistsError, match="is a file"):
        StagedOutput(target, overwrite=True)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("points_to", ["an mmer output", "a user directory", "nothing"])
def test_a_symlink_at_the_output_is_refused_and_neither_followed_nor_replaced(tmp_path, points_to):
    real = tmp_path / "real"
    if points_to == "an mmer output":
        previous_output(real)
    elif points_to == "a user directory":
        real.mkdir()
        (real / "mine.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(real)
    before = tree(tmp_path)
    with pytest.raises(OutputExistsError, match="symbolic link") as info:
        StagedOutput(link, overwrite=True)
    assert info.value.file == str(link)
    assert tree(tmp_path) == before


def test_a_symlink_that_appears_at_the_output_while_writing_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "mine.txt").write_text("mine")
    target = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="symbolic link"):
        with StagedOutput(target, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            target.symlink_to(victim)
    assert tree(victim) == {"mine.txt": "mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "victim"]


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    models = tmp_path / "models"
    for name in ("base", "vision"):
        (models / name).mkdir(parents=True)
        (models / name / "model.safetensors").write_text(name)
    return {"models": models, "base": models / "base", "vision": models / "vision"}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("which", ["base", "vision", "models"])
def test_an_input_or_a_parent_of_one_is_refused_whatever_it_holds(tmp_path, inputs, which, overwrite):
    target = inputs[which]
    (target / MARKER_NAME).write_bytes(marker_bytes("decoupled-checkpoint"))  # even if it looks like mmer's
    before = tree(tmp_path)
    with pytest.raises(OutputExistsError, match="which this run reads") as info:
        StagedOutput(target, overwrite=overwrite, protect=[inputs["base"], inputs["vision"]])
    assert "outside every input" in info.value.hint
    assert tree(tmp_path) == before


def test_an_input_reached_through_a_link_or_a_relative_path_is_still_recognised(tmp_path, inputs, monkeypatch):
    alias = tmp_path / "alias"
    alias.symlink_to(inputs["models"])
    monkeypatch.chdir(inputs["models"])
    with pytest.raises(OutputExistsError, match="which this run reads"):
        StagedOutput(alias / "vision" / ".." / "vision", overwrite=True, protect=["base", "vision"])
    with pytest.raises(OutputExistsError, match="contains"):
        StagedOutput(tmp_path / "models", overwrite=True, protect=[alias / "base"])


def test_an_output_inside_an_input_is_refused_as_it_would_change_the_input(tmp_path, inputs):
    with pytest.raises(OutputExistsError, match="is inside"):
        StagedOutput(inputs["base"] / "merged", protect=[inputs["base"]])
    assert not (inputs["base"] / "merged").exists()


def test_a_new_output_beside_the_inputs_is_fine(tmp_path, inputs):
    for target in (tmp_path / "merged", inputs["models"] / "merged"):
        with StagedOutput(target, protect=[inputs["base"], inputs["vision"]]) as staging:
            (staging / "x").write_text("x")
        assert (target / "x").exists()


def test_a_hub_snapshot_also_protects_its_repo_folder(tmp_path):
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for target in (repo, tmp_path / "hub", repo / "blobs"):
        with pytest.raises(OutputExistsError, match="which this run reads"):
            StagedOutput(target, overwrite=True, protect=[snapshot])


# --------------------------------------------------------------------------------- leftovers of killed runs
def test_a_dead_runs_staging_directory_is_removed_and_reported_with_its_pid_and_size(tmp_path):
    stale = leftover(tmp_path, "out", DEAD_PID)
    staged = StagedOutput(tmp_path / "out")
    with staged:
        pass
    assert not stale.exists()
    [note] = staged.warnings
    assert note.startswith("removed a staging directory left by an interrupted run")
    assert f"pid {DEAD_PID}" in note and "1.5 MB" in note and str(stale) in note


def test_a_dead_runs_previous_output_left_between_the_two_renames_is_removed(tmp_path):
    stale = leftover(tmp_path, "out", DEAD_PID, what="old")
    legacy = tmp_path / ".out.mmer-old-cafef00d"  # named before the pid was part of it
    legacy.mkdir()
    (legacy / "mmer_manifest.json").write_text("{}")
    staged = StagedOutput(tmp_path / "out")
    with staged:
        pass
    assert not stale.exists() and not legacy.exists()
    assert len(staged.warnings) == 2 and all("interrupted replacement" in w for w in staged.warnings)


def test_a_live_runs_staging_directory_is_left_alone(tmp_path):
    live = leftover(tmp_path, "out", os.getppid())  # our parent: alive for as long as this test runs
    staged = StagedOutput(tmp_path / "out")
    with staged:
        pass
    assert live.is_dir() and staged.warnings == []


def test_a_leftover_without_the_marker_is_named_but_not_removed(tmp_path):
    unmarked = leftover(tmp_path, "out", DEAD_PID, marked=False)
    staged = StagedOutput(tmp_path / "out")
    with staged:
        pass
    assert unmarked.is_dir()
    [note] = staged.warnings
    assert "left" in note and "alone" in note and str(unmarked) in note and "no mmer marker" in note


def test_a_leftover_that_is_a_link_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / MARKER_NAME).write_bytes(marker_bytes("merge"))
    (victim / "mine.txt").write_text("mine")
    link = tmp_path / f".out.mmer-staging-{DEAD_PID}-deadbeef"
    link.symlink_to(victim)
    staged = StagedOutput(tmp_path / "out")
    with staged:
        pass
    assert link.is_symlink() and (victim / "mine.txt").read_text() == "mine"
    assert any("alone" in w for w in staged.warnings)


def test_leftovers_of_other_outputs_are_not_touched(tmp_path):
    other = leftover(tmp_path, "other", DEAD_PID)
    prefix = leftover(tmp_path, "out2", DEAD_PID)  # shares the prefix "out" but is another output's
    staged = StagedOutput(tmp_path / "out")
    with staged:
        pass
    assert other.is_dir() and prefix.is_dir() and staged.warnings == []


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_run_killed_with_sigkill_leaves_staging_that_the_next_run_removes(tmp_path):
    target = tmp_path / "out"
    script = f"""
        import sys, time
        from mmer.io.writer import StagedOutput
        with StagedOutput({str(target)!r}, overwrite=True) as staging:
            (staging / "part.safetensors").write_bytes(b"x" * 1000)
            print(staging, flush=True)
            time.sleep(60)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True)
    try:
        staging = Path(proc.stdout.readline().strip())
        assert staging.is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert staging.is_dir()  # SIGKILL runs no cleanup
    staged = StagedOutput(target)
    with staged:
        pass
    assert not staging.exists()
    assert f"pid {proc.pid}" in staged.warnings[0]


# ---------------------------------------------------------------------------------------------- OS errors
def test_a_name_too_long_for_the_file_system_is_a_clean_error_naming_the_path(tmp_path):
    target = tmp_path / ("m" * 240)  # fits, but its staging sibling does not
    with pytest.raises(OutputWriteError, match="too long") as info:
        with StagedOutput(target):
            pass
    assert info.value.exit_code == 1 and "shorter" in info.value.hint
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission denied"),
        (errno.EPERM, "not permitted"),
        (errno.EBUSY, "busy"),
        (errno.EEXIST, "already exists"),
        (errno.EIO, "input/output error"),
    ],
)
def test_os_errors_creating_the_staging_directory_are_clean_errors(tmp_path, monkeypatch, code, words):
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if ".mmer-staging-" in self.name:
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputWriteError, match=words) as info:
        with StagedOutput(tmp_path / "sub" / "out"):
            pass
    assert info.value.exit_code == 1 and ".mmer-staging-" in info.value.file and info.value.hint


@pytest.mark.parametrize(
    "name", ["x" * 300, "a/" * 3000 + "b", "a-file/out"], ids=["long-name", "long-path", "file-parent"]
)
def test_an_output_path_the_file_system_cannot_hold_is_a_clean_error(tmp_path, name):
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(OutputWriteError) as info:
        with StagedOutput(tmp_path / name):
            pass
    assert info.value.exit_code == 1 and info.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_busy_target_at_the_final_rename_keeps_the_previous_output(tmp_path, monkeypatch):
    target = previous_output(tmp_path / "out")
    real_rename = os.rename

    def busy(src, dst):
        if ".mmer-staging-" in str(src):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src), str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", busy)
    with pytest.raises(OutputWriteError, match="busy"):
        with StagedOutput(target, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [MARKER_NAME, "old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(("code", "error"), [(errno.EROFS, OutputWriteError), (errno.ENOSPC, DiskFullError)])
def test_an_os_error_writing_into_the_staging_directory_becomes_a_clean_error(tmp_path, code, error):
    with pytest.raises(error) as info:
        with StagedOutput(tmp_path / "out") as staging:
            raise OSError(code, os.strerror(code), str(staging / "recipe.yaml"))
    assert info.value.file.endswith("recipe.yaml")
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_reading_an_input_inside_the_block_is_not_blamed_on_the_output(tmp_path):
    with pytest.raises(PermissionError):
        with StagedOutput(tmp_path / "out"):
            raise PermissionError(errno.EACCES, "Permission denied", "/models/base/model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_nothing_but_the_parent_directories_is_created_outside_the_output(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with StagedOutput(target) as staging:
        (staging / "x").write_text("x")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "a",
        "a/b",
        "a/b/out",
        f"a/b/out/{MARKER_NAME}",
        "a/b/out/x",
    ]


def test_marker_json_is_small_and_names_the_tool_kind_and_version():
    data = json.loads(marker_bytes("extension-pack"))
    assert data["tool"] == "mmer" and data["kind"] == "extension-pack" and data["mmer_version"]
    assert len(marker_bytes("extension-pack")) < outputs._MARKER_MAX_BYTES
