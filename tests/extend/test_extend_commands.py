"""`mmer extend align|probe|train|inspect|eval`: the stages from the command line, and how they refuse bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from tiny_moe import (
    make_data,
    saved_lm,
    single_thread,  # noqa: F401  (autouse: one thread per module)
)

from mmer.extend import load_extension_pack, read_pack_manifest, save_data

FAST = ["--steps", "2", "--batch-size", "8", "--device", "cpu", "--mixed-precision", "no", "--quiet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    recipe = root / "recipe.yaml"
    recipe.write_text("finetune:\n  learning_rate: 0.01\n  warmup_ratio: 0.0\nextend:\n  modality: digits\n")
    return {
        "root": root,
        "base": saved_lm("mixtral"),
        "data": save_data(root / "data.safetensors", make_data()),
        "recipe": recipe,
    }


@pytest.fixture(scope="module")
def stages(inputs) -> dict[str, Path]:
    """align → probe → train, each through the CLI."""
    root = inputs["root"]
    align = cli("extend", "align", inputs["base"], inputs["data"], "-o", root / "align", *FAST)
    assert align.exit_code == 0, align
    probe = cli(
        "extend",
        "probe",
        inputs["base"],
        inputs["data"],
        "-o",
        root / "probe.json",
        "--projector",
        root / "align",
        *FAST,
        "--lr",
        "0.5",
        "--json",
    )
    assert probe.exit_code == 0, probe
    train = cli(
        "extend",
        "train",
        inputs["base"],
        inputs["data"],
        "-o",
        root / "pack",
        "--projector",
        root / "align",
        "--probe",
        root / "probe.json",
        "--recipe",
        inputs["recipe"],
        *FAST,
        "--json",
    )
    assert train.exit_code == 0, train
    return {
        "align": root / "align",
        "probe": root / "probe.json",
        "pack": root / "pack",
        "probe_json": probe.json(),
        "train_json": train.json(),
    }


def test_align_writes_a_projector_only_pack(stages):
    manifest = read_pack_manifest(stages["align"])
    assert manifest["stage"] == "align" and manifest["layers"] == []
    assert manifest["projector"]["in_features"] == 10 and manifest["training"]["align"]["steps"] == 2


def test_probe_writes_the_layer_scores_and_the_chosen_half(stages):
    result = json.loads(stages["probe"].read_text())
    assert stages["probe_json"]["selected"] == result["selected"] and len(result["selected"]) == 2
    assert sorted(result["scores"]) == ["0", "1", "2", "3"]


def test_train_extends_the_probes_layers_and_applies_the_recipe_and_flags(stages):
    summary = stages["train_json"]
    assert summary["ok"] and summary["layers"] == stages["probe_json"]["selected"]
    manifest = read_pack_manifest(stages["pack"])
    assert manifest["modality"] == "digits"  # from the recipe
    assert manifest["recipe"]["finetune"]["learning_rate"] == 0.01 and manifest["recipe"]["finetune"]["steps"] == 2
    assert set(summary["reports"]) == {"finetune"}  # align and probe came from their files


def test_the_trained_pack_and_the_aligned_projector_load_onto_the_base(stages, inputs):
    model = load_extension_pack(inputs["base"], stages["pack"])
    aligned = load_extension_pack(inputs["base"], stages["align"])
    data = make_data(n=4)
    batch = data.batch(torch.arange(4))
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["features"]).logits
        ref = aligned(batch["input_ids"], batch["attention_mask"], batch["features"]).logits
    assert out.shape == ref.shape and not torch.equal(out, ref)


def test_inspect_shows_the_layers_and_their_sources(stages):
    result = cli("extend", "inspect", stages["pack"])
    assert result.exit_code == 0, result
    layer = stages["train_json"]["layers"][0]
    assert f"layer {layer}: 4 → 5 experts, copied from" in result.stdout
    assert "calibration: additive_mlp (hidden 16)" in result.stdout
    as_json = cli("extend", "inspect", stages["pack"], "--json").json()
    assert as_json["ok"] and as_json["modality"] == "digits"


def test_eval_reports_loss_and_accuracy_with_and_without_the_pack(stages, inputs):
    text = save_data(inputs["root"] / "text.safetensors", make_data(features=False, seed=3))
    base = cli("extend", "eval", inputs["base"], text, "--json").json()
    extended = cli("extend", "eval", inputs["base"], text, "--pack", stages["pack"], "--json").json()
    assert base["tokens"] == extended["tokens"] > 0
    assert base["loss"] != extended["loss"]  # text tokens pass through the extended layers too (Table 2)


def test_a_misspelt_recipe_key_is_refused_with_the_closest_key(inputs, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  learnig_rate: 0.1\n")
    result = cli("extend", "train", inputs["base"], inputs["data"], "-o", tmp_path / "pack", "--recipe", bad, "--json")
    assert result.exit_code == 2
    error = result.json()
    assert error["error"] == "ConfigError" and error["key"] == "learnig_rate" and "learning_rate" in error["hint"]
    assert not (tmp_path / "pack").exists()


def test_an_existing_output_is_refused_and_left_alone(stages, inputs):
    before = (stages["pack"] / "extension.safetensors").read_bytes()
    result = cli(
        "extend",
        "train",
        inputs["base"],
        inputs["data"],
        "-o",
        stages["pack"],
        "--layers",
        "1",
        "--projector",
        stages["align"],
        *FAST,
    )
    assert result.exit_code == 2 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert (stages["pack"] / "extension.safetensors").read_bytes() == before


def test_a_bad_layer_list_is_refused(inputs, tmp_path):
    result = cli("extend", "train", inputs["base"], inputs["data"], "-o", tmp_path / "p", "--layers", "one,two", *FAST)
    assert result.exit_code == 2 and "--layers 'one,two'" in result.stderr
    result = cli(
        "extend",
        "train",
        inputs["base"],
        inputs["data"],
        "-o",
        tmp_path / "p",
        "--layers",
        "7",
        "--projector",
        inputs["root"] / "align",
        *FAST,
    )
    assert result.exit_code == 2 and "layer 7 does not exist" in result.stderr


def test_a_projector_option_that_is_a_full_pack_is_refused(stages, inputs, tmp_path):
    result = cli(
        "extend",
        "probe",
        inputs["base"],
        inputs["data"],
        "-o",
        tmp_path / "p.json",
        "--projector",
        stages["pack"],
        *FAST,
    )
    assert result.exit_code == 2 and "not a projector pack" in result.stderr


def test_train_reads_a_directory_of_shards_with_the_paper_options_from_flags(inputs, tmp_path):
    from mmer.extend import save_shards

    data = make_data(20, features=False)  # a task extension: no projector to align
    labels = data.labels.clone()
    labels[:, :5] = -100  # a 5-token prompt
    data.labels = labels
    shards = save_shards(tmp_path / "shards", data, samples_per_shard=6)
    probe = cli(
        "extend",
        "probe",
        inputs["base"],
        shards,
        "-o",
        tmp_path / "probe.json",
        *FAST,
        "--stats-samples",
        "3",
        "--routing-tokens",
        "prompt",
        "--json",
    )
    assert probe.exit_code == 0, probe
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["before"]["tokens"] == 2 * 5  # stats_fraction caps 20 samples at 2; 5 prompt tokens each
    train = cli(
        "extend",
        "train",
        inputs["base"],
        shards,
        "-o",
        tmp_path / "pack",
        "--layers",
        "1",
        "--stats-samples",
        "4",
        "--gradient-checkpointing",
        *FAST,
        "--json",
    )
    assert train.exit_code == 0, train
    recipe = read_pack_manifest(tmp_path / "pack")["recipe"]
    assert recipe["selection"]["stats_samples"] == 4 and recipe["finetune"]["gradient_checkpointing"] is True
    bad = cli("extend", "probe", inputs["base"], shards, "-o", tmp_path / "p2.json", *FAST, "--routing-tokens", "x")
    assert bad.exit_code == 2 and "routing_tokens" in bad.stdout + bad.stderr
