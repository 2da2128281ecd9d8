"""examples/ci: the script a CI job calls merges from a recipe, verifies, lays out the artifact, and exits with
mmer's documented codes; the GitHub Actions workflow calls it and uploads what it leaves."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ci"
SCRIPT = EXAMPLE / "merge.sh"

RECIPE = """\
base: models/base
models:
  - {model: models/vision, modality: vision}
  - {model: models/audio, modality: audio}
"""


def _mmer() -> str:
    """The `mmer` command of the interpreter running the tests (a venv's bin/ need not be on PATH)."""
    beside = Path(sys.executable).parent / "mmer"
    found = str(beside) if beside.is_file() else shutil.which("mmer")
    if found is None:
        pytest.skip("the mmer command is not installed (pip install -e .)")
    return found


@pytest.fixture
def project(tiny_models, tmp_path: Path) -> Path:
    """A repository as CI checks it out: recipe.yaml and the models it names, relative to it."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    for name in ("base", "vision", "audio"):
        shutil.copytree(tiny_models[f"{name}_dir"], tmp_path / "repo" / "models" / name)
    (tmp_path / "repo" / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    return tmp_path / "repo"


def _run(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MMER": _mmer(), "NO_COLOR": "1"}
    env.pop("MMER_DEBUG", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_ci_script_merges_verifies_and_leaves_the_checkpoint_reports_and_checksums(project: Path) -> None:
    result = _run(project, "recipe.yaml", "artifact")
    assert result.returncode == 0, result.stderr
    artifact = project / "artifact"
    assert (artifact / "merged" / "mmer_manifest.json").is_file()
    assert sorted(p.name for p in (artifact / "merged" / "masks").iterdir()) == [
        "audio.safetensors",
        "vision.safetensors",
    ]
    merge = json.loads((artifact / "reports" / "merge.json").read_text())
    verify = json.loads((artifact / "reports" / "verify.json").read_text())
    assert merge["ok"] and verify["ok"]
    assert [m["modality"] for m in merge["modalities"]] == ["vision", "audio"]
    sums = (artifact / "SHA256SUMS").read_text().splitlines()
    files = sorted(str(p.relative_to(artifact / "merged")) for p in (artifact / "merged").rglob("*") if p.is_file())
    assert [line.split("  ./", 1)[1] for line in sums] == files
    for line in sums:
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((artifact / "merged" / name).read_bytes()).hexdigest() == digest


def test_a_wrong_recipe_fails_the_job_with_exit_2_and_mmers_fix_as_an_annotation(project: Path) -> None:
    (project / "recipe.yaml").write_text(RECIPE + "options:\n  lamda: 0.5\n", encoding="utf-8")
    result = _run(project, "recipe.yaml", "artifact")
    assert result.returncode == 2
    assert "::error title=mmer merge failed (usage error" in result.stderr
    assert "lamda" in result.stderr and "did you mean 'lambda'" in result.stderr
    assert not (project / "artifact" / "merged").exists()


def test_a_corrupt_model_fails_the_job_with_exit_1(project: Path) -> None:
    weights = next((project / "models" / "audio").glob("*.safetensors"))
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    result = _run(project, "recipe.yaml", "artifact")
    assert result.returncode == 1, result.stderr
    assert "::error title=mmer merge failed (runtime failure, exit 1)" in result.stderr


def test_the_script_refuses_to_reuse_an_artifact_directory_and_a_wrong_call(project: Path) -> None:
    (project / "artifact" / "merged").mkdir(parents=True)
    assert _run(project, "recipe.yaml", "artifact").returncode == 2
    assert _run(project).returncode == 2


def test_the_script_is_strict_bash() -> None:
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text
    assert os.access(SCRIPT, os.X_OK)


def test_the_workflow_calls_the_script_and_uploads_the_artifact_directory() -> None:
    workflow = yaml.safe_load((EXAMPLE / "github-actions.yml").read_text())
    steps = workflow["jobs"]["merge"]["steps"]
    runs = [s.get("run", "") for s in steps]
    assert any("ci/merge.sh recipe.yaml artifact" in r for r in runs)
    assert any("pip install" in r and "torch" in r for r in runs)
    uploads = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert uploads[0]["with"]["path"] == "artifact/" and "if" not in uploads[0]
    assert uploads[1]["if"] == "failure()" and uploads[1]["with"]["path"] == "artifact/reports/"
