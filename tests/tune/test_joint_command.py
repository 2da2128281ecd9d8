"""`mmer tune --joint` from the command line: the score a file's function, the report valid JSON in search order,
the chosen vector written as a recipe `mmer merge` takes, and every refusal a usage error naming its option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_runner import cli

from mmer.config import load_recipe

SCORE = """
def coupled(candidate):
    v, a = candidate.lambdas["vision"], candidate.lambdas["audio"]
    return {"score": -((v - 0.6) ** 2) - (a - 1.2) ** 2 - 12 * ((v + a) / 2 - 0.6) ** 2, "seen": candidate.validation}
"""


@pytest.fixture(scope="module")
def specs(tiny_models, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("joint_cli")
    out = []
    for name, data in (
        ("base", {"model": str(tiny_models["base_dir"])}),
        ("vision", {"model": str(tiny_models["vision_dir"]), "modality": "vision"}),
        ("audio", {"model": str(tiny_models["audio_dir"]), "modality": "audio"}),
    ):
        out.append(root / f"{name}.yaml")
        out[-1].write_text(yaml.safe_dump(data), encoding="utf-8")
    (root / "my_eval.py").write_text(SCORE, encoding="utf-8")
    (root / "val.jsonl").write_text("[1, 2, 3]\n", encoding="utf-8")
    return out


def test_a_joint_tune_prints_valid_json_in_search_order_and_writes_a_recipe_mmer_merge_takes(specs, tmp_path):
    root = specs[0].parent
    args = ("tune", *specs, "--joint", "--score", f"{root / 'my_eval.py'}:coupled", "--validation", root / "val.jsonl")
    result = cli(*args, "-o", tmp_path / "out", "--write-recipe", tmp_path / "tuned.yaml", "--json")
    assert result.exit_code == 0, result
    data = json.loads(result.stdout)
    assert data["ok"] and data["mode"] == "joint"
    assert data["search"] | {"start": None} == {
        "method": "grid",
        "budget": 32,
        "scored": 25,
        "rounds": 0,
        "stopped": "grid complete",
        "start": None,
    }
    assert [r["order"] for r in data["results"]] == list(range(25))
    assert data["best"]["lambda"] == {"vision": 0.3, "audio": 0.9}
    assert data["results"][data["best"]["order"]]["details"]["seen"] == str((root / "val.jsonl").resolve())
    assert json.loads((tmp_path / "out" / "tune.json").read_text())["format"] == "mmer-tune-joint/1"
    _, models, _ = load_recipe(tmp_path / "tuned.yaml")
    assert {m.modality: m.lambda_ for m in models} == {"vision": 0.3, "audio": 0.9}

    climbed = cli(*args, "--budget", "9", "-o", tmp_path / "out", "--overwrite", "--quiet")
    assert climbed.exit_code == 0, climbed
    assert "coordinate search: 9 of at most 9 candidates" in climbed.stdout and "★" in climbed.stdout

    refused = cli("tune", *specs, "--lambdas", "0.9", "-o", tmp_path / "out", "--quiet")
    assert refused.exit_code == 2 and "already exists" in refused.stderr  # a joint report is kept as any tune's
    replaced = cli("tune", *specs, "--lambdas", "0.9", "-o", tmp_path / "out", "--overwrite", "--quiet")
    assert replaced.exit_code == 0, replaced
    assert json.loads((tmp_path / "out" / "tune.json").read_text())["format"] == "mmer-tune/1"


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        (("--joint",), "score", "one modality's model alone"),  # the default score is recon
        (("--joint", "--score", "logits"), "score", "one modality's model alone"),
        (("--budget", "4"), "budget", "goes with --joint"),
        (("--search", "grid"), "search", "goes with --joint"),
        (("--validation", "val.jsonl"), "validation", "recon does not read it"),
        (("--joint", "--score", "MY:coupled", "--search", "grid", "--budget", "4"), "budget", "over the budget"),
        (("--joint", "--score", "MY:coupled", "--search", "random"), "search", "not one of"),
        (("--joint", "--score", "MY:coupled", "--validation", "nowhere.jsonl"), "validation", "no such validation"),
        (("--joint", "--score", "MY:coupled", "--probes", "p.jsonl"), "probes", "goes with --score logits"),
    ],
)
def test_a_joint_tune_it_cannot_run_is_a_usage_error_naming_the_option_with_a_hint(specs, tmp_path, extra, key, words):
    mine = str(specs[0].parent / "my_eval.py")
    extra = tuple(e.replace("MY", mine) for e in extra)
    result = cli("tune", *specs, *extra, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 2, result
    error = json.loads(result.stdout)
    assert error["key"] == key and words in error["message"] and error["hint"]
    assert not (tmp_path / "out").exists()
