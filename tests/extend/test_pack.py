"""mmer.extend.pack: a pack loads onto the untouched base and reproduces the trained model's logits exactly."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from tiny_moe import (
    FAMILY_NAMES,
    load_lm,
    make_data,
    quick,
    saved_lm,
    single_thread,  # noqa: F401  (autouse: one thread per module)
    snapshot,
)

from mmer.errors import CheckpointFormatError, IncompatibleBaseError, LayoutError, OutputExistsError
from mmer.extend import (
    PACK_MANIFEST,
    ExtendOptions,
    MoExtendRecipe,
    ProbeOptions,
    base_model_hash,
    is_extension_pack,
    load_extension_pack,
    read_pack_manifest,
    run_moextend,
    unload_extension,
    write_pack,
)


def recipe(**extend) -> MoExtendRecipe:
    return MoExtendRecipe(
        align=quick(steps=2),
        probe=quick(steps=2, learning_rate=0.5),
        finetune=quick(steps=3),
        selection=ProbeOptions(fraction=0.5),
        extend=ExtendOptions(**extend),
    )


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """One trained pack per family (the whole paper pipeline: align → probe → extend → finetune)."""
    root = tmp_path_factory.mktemp("packs")
    out = {}
    for family in FAMILY_NAMES:
        lm = load_lm(family)
        result = run_moextend(lm, make_data(), root / family, recipe())
        out[family] = result
    return out


def logits(model, data):
    batch = data.batch(torch.arange(len(data)))
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], batch.get("features")).logits


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_pack_on_a_fresh_copy_of_the_base_reproduces_the_trained_models_logits_exactly(packs, family):
    data = make_data(n=10, seed=7)
    trained = logits(packs[family].model, data)
    loaded = load_extension_pack(load_lm(family), packs[family].pack)
    assert torch.equal(logits(loaded, data), trained)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_pack_loads_from_the_base_directory_too(packs, family):
    data = make_data(n=4, seed=8)
    loaded = load_extension_pack(saved_lm(family), packs[family].pack)
    assert torch.equal(logits(loaded, data), logits(packs[family].model, data))


def test_the_manifest_records_layers_sources_calibration_projector_and_the_base_hash(packs):
    result = packs["mixtral"]
    manifest = read_pack_manifest(result.pack)
    assert manifest["format"] == "mmer-moextend-pack" and manifest["modality"] == "vision"
    assert [entry["layer"] for entry in manifest["layers"]] == result.plan.layers and len(result.plan.layers) == 2
    for entry in manifest["layers"]:
        assert entry["base_experts"] == 4 and entry["new_experts"] == 1
        assert entry["source_experts"] == result.plan.sources[entry["layer"]]
        assert entry["score"] == pytest.approx(result.plan.probe.scores[entry["layer"]])
    assert manifest["selection"]["method"] == "extender" and manifest["selection"]["source_statistics"] == "tuned"
    assert manifest["calibration"] == {"form": "additive_mlp", "hidden": 16, "dtype": "float32"}
    assert manifest["projector"] == {"kind": "mlp2x_gelu", "in_features": 10, "placeholder_id": 3}
    assert manifest["base"]["sha256"] == base_model_hash(load_lm("mixtral"))
    assert manifest["base"]["renormalise"] == {"0": True, "1": True, "2": True, "3": True}
    assert set(manifest["training"]) == {"align", "finetune"} and manifest["recipe"]["finetune"]["steps"] == 3
    entries = manifest["tensors"]["entries"]
    layer = result.plan.layers[0]
    assert entries[f"model.layers.{layer}.mlp.new_experts.gate_up_proj"]["shape"] == [1, 96, 32]
    assert entries[f"model.layers.{layer}.mlp.new_router.weight"]["shape"] == [1, 32]
    assert manifest["tensors"]["parameters"] == sum(math.prod(e["shape"]) for e in entries.values())


def test_qwen2_moe_packs_record_non_renormalising_routers_and_skip_the_dense_layer(packs):
    manifest = read_pack_manifest(packs["qwen2_moe"].pack)
    assert manifest["base"]["moe_layers"] == {"0": 4, "2": 4, "3": 4}
    assert set(manifest["base"]["renormalise"].values()) == {False}
    assert all(entry["layer"] != 1 for entry in manifest["layers"])


def test_unloading_a_pack_gives_back_the_base_bit_for_bit_and_another_pack_can_follow(packs):
    lm = load_lm("mixtral")
    before = snapshot(lm)
    model = load_extension_pack(lm, packs["mixtral"].pack)
    with pytest.raises(LayoutError, match="already carries an extension"):
        load_extension_pack(lm, packs["mixtral"].pack)
    base = unload_extension(model)
    assert base is lm and all(torch.equal(before[n], t) for n, t in lm.state_dict().items())
    assert set(lm.state_dict()) == set(before)
    load_extension_pack(lm, packs["mixtral"].pack)


def test_another_base_is_refused_by_its_hash(packs):
    other = load_lm("mixtral", seed=1)
    with pytest.raises(IncompatibleBaseError, match="hash to") as info:
        load_extension_pack(other, packs["mixtral"].pack)
    assert info.value.key == "base.sha256" and "different weights" in info.value.hint
    assert not any(hasattr(layer.mlp, "new_experts") for layer in other.model.layers)  # nothing half-applied


def test_a_base_in_another_dtype_is_refused_with_the_dtype_in_the_hint(packs):
    with pytest.raises(IncompatibleBaseError) as info:
        load_extension_pack(load_lm("mixtral").to(torch.bfloat16), packs["mixtral"].pack)
    assert "dtype=float32" in info.value.hint


def test_another_family_is_refused_before_anything_is_read(packs):
    with pytest.raises(IncompatibleBaseError, match="extends a mixtral model, this base is olmoe"):
        load_extension_pack(load_lm("olmoe"), packs["mixtral"].pack)


def test_a_changed_tensor_file_is_refused(packs, tmp_path):
    pack = shutil.copytree(packs["olmoe"].pack, tmp_path / "pack")
    raw = bytearray((pack / "extension.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (pack / "extension.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointFormatError, match="sha256 differs"):
        load_extension_pack(load_lm("olmoe"), pack)


def test_a_pack_from_a_newer_major_format_is_refused(packs, tmp_path):
    pack = shutil.copytree(packs["olmoe"].pack, tmp_path / "pack")
    manifest = json.loads((pack / PACK_MANIFEST).read_text())
    manifest["format_version"] = "2.0"
    (pack / PACK_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointFormatError, match="newer") as info:
        load_extension_pack(load_lm("olmoe"), pack)
    assert info.value.hint == "upgrade mmer"


def test_a_directory_without_a_manifest_is_not_a_pack(tmp_path):
    assert not is_extension_pack(tmp_path)
    with pytest.raises(CheckpointFormatError, match="not an extension pack"):
        read_pack_manifest(tmp_path)


def test_an_existing_output_is_not_overwritten_unless_asked(packs, tmp_path):
    model = packs["olmoe"].model
    write_pack(model, tmp_path / "pack", modality="vision")
    with pytest.raises(OutputExistsError):
        write_pack(model, tmp_path / "pack", modality="vision")
    write_pack(model, tmp_path / "pack", modality="audio", overwrite=True)
    assert read_pack_manifest(tmp_path / "pack")["modality"] == "audio"


def test_a_bf16_base_with_float32_new_tensors_round_trips_exactly(tmp_path):
    base = load_lm("olmoe").to(torch.bfloat16)
    result = run_moextend(base, make_data(), tmp_path / "pack", recipe(layers=(0, 3)))
    manifest = read_pack_manifest(result.pack)
    assert manifest["base"]["dtype"] == "bfloat16"
    assert {e["dtype"] for e in manifest["tensors"]["entries"].values()} == {"F32"}  # new_params_dtype = float32
    data = make_data(n=6, seed=9)
    loaded = load_extension_pack(load_lm("olmoe").to(torch.bfloat16), result.pack)
    assert torch.equal(logits(loaded, data), logits(result.model, data))


def test_the_loaded_model_generates_greedily_from_spliced_features(packs):
    model = load_extension_pack(load_lm("mixtral"), packs["mixtral"].pack)
    batch = make_data(n=2, seed=4).batch(torch.arange(2))
    prompt, features = batch["input_ids"][:, :6], batch["features"]
    generated = model.generate(prompt, features, max_new_tokens=3, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, model(ids, None, features).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids[:, 6:])
