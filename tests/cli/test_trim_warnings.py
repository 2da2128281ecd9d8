"""A trim that removed nothing is said by every command that merges, in the same words (one rule,
mmer.engine.trim_warnings); `tune` says when a grid axis changed no score; the demo's fine-tunes are dense like
real ones, so its default K = 0.8 trims."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import cli
from conftest import component_state, finetune_state, write_model
from safetensors.torch import load_file
from test_pipeline import recipe_for

import mmer
import mmer.demo
from mmer.config import build_recipe
from mmer.tune import run_tune

ZERO_THRESHOLD = "the global trim threshold is 0"


def spec(directory: Path, name: str, data: dict) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sparse_specs(tiny_models, tmp_path_factory) -> list[Path]:
    """The suite's tiny fine-tunes move 60 % (vision) and 30 % (audio) of their entries: over 1 − K are zero."""
    root = tmp_path_factory.mktemp("sparse")
    return [
        spec(root, "base", {"model": str(tiny_models["base_dir"])}),
        spec(root, "vision", {"model": str(tiny_models["vision_dir"]), "modality": "vision"}),
        spec(root, "audio", {"model": str(tiny_models["audio_dir"]), "modality": "audio"}),
    ]


def said(stderr: str, modality: str) -> bool:
    text = " ".join(stderr.split())
    return f"warning: {modality}: {ZERO_THRESHOLD}" in text or f": {modality}: {ZERO_THRESHOLD}" in text


def test_merge_compare_and_tune_say_that_a_zero_threshold_trimmed_nothing(sparse_specs, tmp_path):
    runs = {
        "merge": cli("merge", *sparse_specs, "-o", tmp_path / "merged", "-q"),
        "compare": cli("compare", *sparse_specs, "--variant", "ties/mmer", "-q"),
        "tune": cli("tune", *sparse_specs, "--lambdas", "0.9", "-o", tmp_path / "tune", "-q"),
    }
    for command, result in runs.items():
        assert result.exit_code == 0, result
        assert said(result.stderr, "vision") and said(result.stderr, "audio"), (command, result)


def test_add_says_it_too_and_json_carries_the_same_sentences(sparse_specs, tiny_models, tmp_path):
    merged = tmp_path / "merged"
    assert cli("merge", *sparse_specs, "-o", merged, "-q").exit_code == 0
    video = write_model(
        tmp_path / "video",
        finetune_state(tiny_models["base"], seed=9, density=0.4),
        "hf_legacy",
        component_state(13, prefix="video_tower."),
    )
    result = cli(
        "add",
        merged,
        spec(tmp_path, "video", {"model": str(video), "modality": "video"}),
        "-o",
        tmp_path / "added",
        "-q",
    )
    assert result.exit_code == 0, result
    assert all(said(result.stderr, m) for m in ("vision", "audio", "video")), result
    data = cli("compare", *sparse_specs, "--variant", "ties/mmer", "--json").json()
    assert [w for w in data["warnings"] if ZERO_THRESHOLD in w] == [
        w
        for w in cli("merge", *sparse_specs, "--json", "-o", tmp_path / "m2").json()["warnings"]
        if ZERO_THRESHOLD in w
    ]


def test_a_dare_merge_does_not_blame_the_models_for_dare_own_zeros(sparse_specs, tmp_path):
    # DARE p = 0.5 drops half of each τ, so K = 0.8's threshold is 0 whatever the models: not their doing.
    result = cli("compare", *sparse_specs, "--variant", "ties+dare=0.5/none", "--json")
    assert result.exit_code == 0, result
    assert not [w for w in result.json()["warnings"] if ZERO_THRESHOLD in w]


def test_the_demo_says_it_when_its_fine_tunes_leave_most_entries_untouched(tmp_path, monkeypatch):
    dense = mmer.demo.fine_tune_deltas

    def sparse(base_state, seed, density, scale=0.02):
        g = torch.Generator().manual_seed(seed)
        return {n: d * (torch.rand(d.shape, generator=g) < 0.5) for n, d in dense(base_state, seed, density).items()}

    monkeypatch.setattr(mmer.demo, "fine_tune_deltas", sparse)
    result = cli("demo", "--workdir", tmp_path / "demo")
    assert result.exit_code == 0, result
    assert said(result.stderr, "vision") and said(result.stderr, "audio"), result


def test_the_demo_fine_tunes_move_most_entries_but_unused_embedding_rows_so_k_trims(demo_models, tmp_path):
    base = load_file(demo_models.base / "model.safetensors")
    vision = load_file(next(demo_models.vision.glob("*.safetensors")))
    zeros = total = 0
    for name, theta in base.items():
        tau = vision["language_model." + name if "language_model." + name in vision else name]
        tau = tau[: theta.shape[0]] - theta if tau.dim() and tau.shape[0] != theta.shape[0] else tau - theta
        zeros, total = zeros + int((tau == 0).sum()), total + tau.numel()
        untouched_rows = int((tau.reshape(tau.shape[0], -1) == 0).all(dim=1).sum()) if tau.dim() == 2 else 0
        if name == "model.embed_tokens.weight":
            assert 0.1 * tau.shape[0] < untouched_rows < 0.5 * tau.shape[0]  # tokens no training text used
        else:
            assert untouched_rows == 0, name
    assert zeros / total < 0.2  # fewer than 1 − K: the global top-K has entries to trim

    report = mmer.run_merge(build_recipe(list(demo_models.specs)), tmp_path / "merged")
    assert all(m.threshold and m.threshold > 0 for m in report.modalities)
    assert not [w for w in report.warnings if ZERO_THRESHOLD in w]


def test_tune_says_when_every_k_of_its_grid_scored_the_same(tiny_models):
    models = {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    recipe = recipe_for(tiny_models["base_dir"], models)
    flat = run_tune(recipe, ks=(0.6, 0.8), lambdas=(0.5, 1.0))
    [k_warning] = [w for w in flat.warnings if w.startswith("--ks")]
    assert "0.6, 0.8" in k_warning and "vision, audio" in k_warning and "trim threshold of 0" in k_warning
    assert not [w for w in flat.warnings if w.startswith("--lambdas")]  # λ did change the scores

    moving = run_tune(recipe, ks=(0.2, 0.5), lambdas=(0.5, 1.0))  # far fewer than 1 − K of τ is zero here
    assert not [w for w in moving.warnings if w.startswith("--ks")]
