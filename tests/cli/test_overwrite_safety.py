"""`--overwrite` loses nothing of the user's: every data-loss case once reported, replayed through the CLI.

``--overwrite`` replaces only a directory mmer wrote (it carries mmer's marker, or an older output's manifest);
an input model, a parent of the inputs, the checkpoint being read, an unrelated directory, a plain file and a
link are refused with the reason and a fix, and left exactly as they were. ``demo --workdir`` takes over only a
new, empty or earlier demo directory. A run killed with SIGKILL leaves a staging directory that the next run to
the same output removes and names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_runner import cli

from mmer.checkpoint.manifest import MANIFEST_NAME
from mmer.demo import DEMO_KIND, claim_workdir
from mmer.errors import OutputExistsError
from mmer.io.outputs import MARKER_NAME, read_marker
from mmer.verify import verify

ROOT = Path(__file__).resolve().parents[2]
REFUSED = OutputExistsError("").exit_code


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed) with a digest, to show nothing was changed or lost."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def refused(result) -> dict:
    """A refusal under --json: the usage-error exit code, one JSON document naming the problem, no traceback."""
    assert result.exit_code == REFUSED, result
    assert "Traceback" not in result.stdout + result.stderr, result
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["message"] and data["hint"], data
    return data


@pytest.fixture(scope="module")
def work(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny models with their specs, and one merged checkpoint."""
    root = tmp_path_factory.mktemp("overwrite")
    models = root / "models"
    specs = {}
    for name in ("base", "vision", "audio"):
        shutil.copytree(tiny_models[f"{name}_dir"], models / name)
        lines = [f"model: {models / name}"] + ([] if name == "base" else [f"modality: {name}"])
        specs[name] = root / f"{name}.yaml"
        specs[name].write_text("\n".join(lines) + "\n")
    merged = root / "merged"
    assert cli("merge", specs["base"], specs["vision"], specs["audio"], "-o", merged, "--quiet").exit_code == 0
    return {"root": root, "models": models, "merged": merged, **{f"{k}.yaml": v for k, v in specs.items()}}


def merge_args(work: dict[str, Path]) -> list[Path]:
    return [work["base.yaml"], work["vision.yaml"], work["audio.yaml"]]


# ------------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize(
    "victim",
    ["an input model", "the parent of the inputs", "a directory inside an input", "an unrelated directory",
     "a plain file", "a link to an earlier output"],
)  # fmt: skip
def test_merge_overwrite_refuses_what_mmer_did_not_make_and_changes_nothing(work, tmp_path, victim):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "link").symlink_to(work["merged"])
    target = {
        "an input model": work["models"] / "audio",
        "the parent of the inputs": work["models"],
        "a directory inside an input": work["models"] / "base" / "merged",
        "an unrelated directory": thesis,
        "a plain file": tmp_path / "notes.txt",
        "a link to an earlier output": tmp_path / "link",
    }[victim]
    before = snapshot(work["root"]) | {f"tmp/{k}": v for k, v in snapshot(tmp_path).items()}

    data = refused(cli("merge", *merge_args(work), "-o", target, "--overwrite", "--json"))

    assert data["file"] == str(target)
    assert snapshot(work["root"]) | {f"tmp/{k}": v for k, v in snapshot(tmp_path).items()} == before


def test_merge_overwrite_replaces_a_previous_mmer_output(work, tmp_path):
    out = tmp_path / "out"
    assert cli("merge", work["base.yaml"], work["vision.yaml"], "-o", out, "--quiet").exit_code == 0
    result = cli("merge", *merge_args(work), "-o", out, "--overwrite", "--json")
    assert result.exit_code == 0, result
    assert set(json.loads((out / MANIFEST_NAME).read_text())["modalities"]) == {"vision", "audio"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_marker_is_listed_in_the_manifest_and_verify_accepts_it(work):
    assert read_marker(work["merged"])["kind"] == "decoupled-checkpoint"
    assert MARKER_NAME in json.loads((work["merged"] / MANIFEST_NAME).read_text())["files"]
    report = verify(work["merged"])
    assert report.ok, report.problems


# -------------------------------------------------------------------------------------------- reconstruct, add
@pytest.mark.parametrize("where", ["the checkpoint itself", "the checkpoint's parent", "inside the checkpoint"])
def test_reconstruct_never_writes_over_the_checkpoint_it_reads(work, where):
    ckpt = work["merged"]
    target = {
        "the checkpoint itself": ckpt,
        "the checkpoint's parent": ckpt.parent,
        "inside the checkpoint": ckpt / "vision",
    }[where]
    before = snapshot(work["root"])
    data = refused(cli("reconstruct", ckpt, "-o", target, "-m", "vision", "--overwrite", "--json"))
    assert "which this run reads" in data["message"]
    assert snapshot(work["root"]) == before


def test_add_never_writes_over_the_checkpoint_it_adds_to(work, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert cli("merge", work["base.yaml"], work["vision.yaml"], "-o", ckpt, "--quiet").exit_code == 0
    before = snapshot(tmp_path)
    data = refused(cli("add", ckpt, work["audio.yaml"], "-o", ckpt, "--overwrite", "--json"))
    assert "which this run reads" in data["message"]
    assert snapshot(tmp_path) == before


def test_reconstruct_overwrite_replaces_its_own_earlier_output(work, tmp_path):
    out = tmp_path / "vision"
    assert cli("reconstruct", work["merged"], "-m", "vision", "-o", out, "--quiet").exit_code == 0
    result = cli("reconstruct", work["merged"], "-m", "audio", "-o", out, "--overwrite", "--json")
    assert result.exit_code == 0, result
    assert read_marker(out)["kind"] == "reconstruct"


# ------------------------------------------------------------------------------------------------------- demo
def test_demo_refuses_an_existing_directory_it_did_not_make_and_touches_nothing(tmp_path):
    workdir = tmp_path / "mine"
    (workdir / "merged").mkdir(parents=True)
    (workdir / "merged" / "results.csv").write_text("do not delete")
    (workdir / "base.yaml").write_text("model: my-own-model\n")
    before = snapshot(workdir)
    data = refused(cli("demo", "--workdir", workdir, "--json"))
    assert "not a previous demo work directory" in data["message"] and "--workdir" in data["hint"]
    assert snapshot(workdir) == before


@pytest.mark.parametrize("kind", ["a file", "an mmer merge output", "a link"])
def test_demo_refuses_a_workdir_that_is_not_a_directory_of_its_own(work, tmp_path, kind):
    target = tmp_path / "w"
    if kind == "a file":
        target.write_text("mine")
    elif kind == "a link":
        target.symlink_to(tmp_path)
    else:
        target = work["merged"]
    before = snapshot(target.parent)
    with pytest.raises(OutputExistsError):
        claim_workdir(target)
    assert snapshot(target.parent) == before


def test_a_new_or_empty_workdir_is_marked_and_reused_and_files_added_to_it_are_kept(tmp_path):
    for root in (tmp_path / "new" / "demo", tmp_path / "empty"):
        if root.name == "empty":
            root.mkdir()
        assert claim_workdir(root) == root
        assert read_marker(root)["kind"] == DEMO_KIND
        (root / "my-notes.txt").write_text("mine")
        (root / "merged").mkdir()
        assert claim_workdir(root) == root  # an earlier demo directory is reused as it is
        assert (root / "my-notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------ a run killed with -9
@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_merge_killed_with_sigkill_leaves_staging_that_the_next_run_removes_and_names(work, tmp_path):
    out = tmp_path / "out"
    script = f"""
        import sys, time
        import mmer.pipeline as pipeline
        from mmer_cli.main import app

        real = pipeline.merge_slots

        def slow(plan, staging, *args, **kwargs):
            result = real(plan, staging, *args, **kwargs)
            print("STAGED", flush=True)
            time.sleep(60)
            return result

        pipeline.merge_slots = slow
        sys.argv = ["mmer", "merge", {str(work["base.yaml"])!r}, {str(work["vision.yaml"])!r},
                    "-o", {str(out)!r}, "--quiet", "--no-hash-inputs"]
        app()
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline, line = time.time() + 120, ""
        while time.time() < deadline and "STAGED" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "STAGED" in line, proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    [staging] = [p for p in tmp_path.iterdir() if ".mmer-staging-" in p.name]
    assert f"-{proc.pid}-" in staging.name and (staging / MARKER_NAME).is_file()

    result = cli("merge", work["base.yaml"], work["vision.yaml"], "-o", out, "--json")

    assert result.exit_code == 0, result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    [note] = [w for w in result.json()["warnings"] if "staging" in w]
    assert f"pid {proc.pid}" in note and re.search(r"\d B|KB|MB", note) and str(staging) in note


# ------------------------------------------------------------------------------------------------------ extend
def test_an_extension_pack_is_never_written_over_or_into_the_base(work):
    from mmer.extend.pack import check_output

    base = work["models"] / "base"
    for target in (base, base / "pack", work["models"]):
        with pytest.raises(OutputExistsError, match="which this run reads"):
            check_output(target, True, protect=[base, None])


# -------------------------------------------------------------------------------------------------------- tune
def test_a_tune_candidate_is_never_saved_over_or_into_the_models_it_is_rebuilt_from(work, tmp_path):
    from mmer.config import build_recipe
    from mmer.tune import run_tune

    outcomes: dict[str, str] = {}

    def save_everywhere(candidate) -> float:
        if candidate.modality != "vision" or outcomes:
            return 0.0
        for name, target in {
            "its source": candidate.source_dir,
            "the base": work["models"] / "base",
            "the models' parent": work["models"],
        }.items():
            try:
                candidate.save_pretrained(target, overwrite=True)
                outcomes[name] = "written"
            except OutputExistsError as err:
                outcomes[name] = err.message
        candidate.save_pretrained(tmp_path / "candidate")
        return 0.0

    before = snapshot(work["models"])
    run_tune(build_recipe(merge_args(work)), score=save_everywhere, lambdas=(0.5,), ks=(0.5,))
    assert set(outcomes) == {"its source", "the base", "the models' parent"}
    assert all("which this run reads" in why for why in outcomes.values()), outcomes
    assert snapshot(work["models"]) == before
    assert read_marker(tmp_path / "candidate")["kind"] == "tune-candidate"


# --------------------------------------------------------------------------------------------------- OS errors
def test_an_output_name_too_long_for_the_file_system_is_a_runtime_error_with_json(work, tmp_path):
    from mmer.errors import OutputWriteError

    result = cli("merge", *merge_args(work), "-o", tmp_path / ("m" * 300), "--json")
    assert result.exit_code == OutputWriteError("").exit_code, result
    assert "Traceback" not in result.stdout + result.stderr
    data = result.json()
    assert data["ok"] is False and "too long" in data["message"] and "shorter" in data["hint"]
    assert list(tmp_path.iterdir()) == []
