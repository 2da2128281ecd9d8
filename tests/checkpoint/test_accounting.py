"""`verify --sources` proves every source tensor is accounted for and says which bucket each went to."""

from __future__ import annotations

import json

import pytest
import torch
from cli_runner import cli
from conftest import base_state, component_state, finetune_state, write_model
from safetensors.torch import load_file, save_file
from test_pipeline import recipe_for

import mmer
from mmer.checkpoint.accounting import BUCKETS, account_for
from mmer.verify import verify

INV_FREQ = "model.layers.0.self_attn.rotary_emb.inv_freq"


@pytest.fixture(scope="module")
def merged(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("accounting") / "out"
    recipe = recipe_for(
        tiny_models["base_dir"], {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    )
    mmer.run_merge(recipe, out)
    return out


def test_every_source_tensor_lands_in_exactly_one_bucket(merged, tiny_models):
    report = verify(merged, sources=True)
    assert report.ok, report.problems
    vision = report.reconstruction["vision"].to_dict()
    source_keys = set(load_file(tiny_models["vision_dir"] / "model.safetensors"))
    assert set(vision["tensors"]) == source_keys
    assert vision["buckets"] == {"merged": 21, "private": 0, "component": 2, "dropped": 0}
    embed = vision["tensors"]["language_model.model.embed_tokens.weight"]
    assert embed == {"bucket": "merged", "slot": "model.embed_tokens.weight", "private_rows": 2}
    projector = vision["tensors"]["multi_modal_projector.linear_1.weight"]
    assert projector["bucket"] == "component" and projector["where"].startswith("components/vision/")
    assert report.reconstruction["audio"].to_dict()["buckets"]["merged"] == 21


def test_a_source_tensor_the_checkpoint_does_not_hold_is_reported_by_name(merged, tiny_models, tmp_path):
    moved = tmp_path / "vision"
    moved.mkdir()
    state = load_file(tiny_models["vision_dir"] / "model.safetensors")
    state["vision_tower.extra.weight"] = torch.ones(3)  # a tensor the merge never saw, as a dropped tower would be
    save_file(state, str(moved / "model.safetensors"), metadata={"format": "pt"})
    (moved / "config.json").write_text((tiny_models["vision_dir"] / "config.json").read_text())
    report = verify(merged, sources=True, source_paths={"vision": moved})
    assert any("'vision_tower.extra.weight' is in no bucket" in p for p in report.problems), report.problems


def test_a_manifest_tensor_the_source_lacks_is_reported(merged, tiny_models):
    with mmer.load_decoupled(merged) as ckpt:
        keys = set(load_file(tiny_models["audio_dir"] / "model.safetensors")) - {"audio_tower.linear_1.bias"}
        placements, problems = account_for(ckpt, "audio", keys)
    assert "audio_tower.linear_1.bias" not in placements
    assert problems == ["audio: the manifest names tensor 'audio_tower.linear_1.bias', which the source does not have"]


def test_a_changed_component_is_reported(merged, tiny_models, tmp_path):
    moved = tmp_path / "audio"
    moved.mkdir()
    state = load_file(tiny_models["audio_dir"] / "model.safetensors")
    state["audio_tower.linear_1.bias"] = state["audio_tower.linear_1.bias"] + 1
    save_file(state, str(moved / "model.safetensors"), metadata={"format": "pt"})
    report = verify(merged, sources=True, source_paths={"audio": moved})
    assert "audio: component 'audio_tower.linear_1.bias' differs from the source's" in report.problems


def test_a_rotary_buffer_is_dropped_with_its_reason(tmp_path):
    base = base_state()
    base[INV_FREQ] = torch.arange(4, dtype=torch.float32)
    tuned = finetune_state(base, seed=3)
    tuned[INV_FREQ] = base[INV_FREQ]
    base_dir = write_model(tmp_path / "base", base)
    model_dir = write_model(tmp_path / "vision", tuned, "hf_legacy", component_state(4))
    mmer.run_merge(recipe_for(base_dir, {"vision": model_dir}), tmp_path / "out")
    report = verify(tmp_path / "out", sources=True)
    assert report.ok, report.problems
    placement = report.reconstruction["vision"].tensors["language_model." + INV_FREQ]
    assert placement.bucket == "dropped" and "recomputes it on load" in placement.reason


def test_the_cli_prints_the_buckets_and_lists_every_tensor_under_json(merged):
    text = cli("verify", merged, "--sources")
    assert text.exit_code == 0, text
    assert "vision: 23 source tensors accounted for: 21 merged, 0 private, 2 component, 0 dropped" in text.stdout
    data = json.loads(cli("verify", merged, "--sources", "--json").stdout)
    vision = data["reconstruction"]["vision"]
    assert set(vision["buckets"]) == set(BUCKETS)
    assert {t["bucket"] for t in vision["tensors"].values()} == {"merged", "component"}
