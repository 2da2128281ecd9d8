"""Every command works on paths relative to the working directory, as typed in a terminal or a CI script."""

from __future__ import annotations

import json
import shutil

from cli_runner import cli


def test_merge_verify_inspect_reconstruct_and_add_with_relative_paths(tiny_models, tmp_path, monkeypatch):
    for name in ("base", "vision", "audio"):
        shutil.copytree(tiny_models[f"{name}_dir"], tmp_path / "models" / name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text("model: models/base\n")
    (tmp_path / "vision.yaml").write_text("model: models/vision\nmodality: vision\n")
    (tmp_path / "audio.yaml").write_text("model: models/audio\nmodality: audio\n")

    steps = [
        ("merge", "base.yaml", "vision.yaml", "-o", "out/merged", "--json"),
        ("verify", "out/merged", "--json"),
        ("inspect-masks", "out/merged", "--png", "out/masks.png", "--json"),
        ("reconstruct", "out/merged", "--all", "-o", "out/rebuilt", "--json"),
        ("add", "out/merged", "audio.yaml", "-o", "out/added", "--json"),
        ("verify", "out/added", "--json"),
    ]
    for step in steps:
        result = cli(*step)
        assert result.exit_code == 0, (step, str(result))
        assert json.loads(result.stdout)["ok"] is True, step


def test_demo_runs_in_a_relative_workdir_and_again_in_the_same_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        result = cli("demo", "--workdir", "mmer-demo", "--json")
        assert result.exit_code == 0, str(result)
        assert json.loads(result.stdout)["ok"] is True
