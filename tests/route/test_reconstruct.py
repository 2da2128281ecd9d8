"""mmer.route.reconstruct: a rebuilt modality loads with transformers unchanged and is θ_base + mᵢ∘τ* exactly."""

from __future__ import annotations

import json

import pytest
import torch
from route_fixtures import (
    VARIANTS,
    load_quietly,
    merged_checkpoint,
    model_class,
    model_inputs,
    rebuilt_models,
    variant_checkpoint,
)
from safetensors import safe_open

import mmer
from mmer.errors import ConfigError, DecoupledFormatError, OutputExistsError
from mmer.io.layouts import detect_layout
from mmer.route.reconstruct import reconstruct, reconstruct_modality

MODALITIES = ("vision", "audio")


@pytest.fixture(scope="session")
def merged(demo_models, tmp_path_factory):
    return merged_checkpoint(demo_models, tmp_path_factory)


@pytest.fixture(scope="session")
def rebuilt(demo_models, tmp_path_factory):
    return rebuilt_models(demo_models, tmp_path_factory)


def keys_of(directory) -> set[str]:
    keys: set[str] = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def by_hand(ckpt: mmer.DecoupledCheckpoint, modality: str, canonical: str) -> torch.Tensor:
    """θ_base + mᵢ∘τ* written out (float32, then the base's dtype), private rows appended (FORMAT.md)."""
    slot = next(s for s in ckpt.slots if s.name == canonical)
    base = ckpt.base_tensor(canonical)
    weight = base
    if slot.merged:
        weight = (base.float() + ckpt.mask(modality, canonical).float() * ckpt.tau_star(canonical).float()).to(
            base.dtype
        )
    private = ckpt.private_tensor(modality, canonical)
    return weight if private is None else torch.cat([weight, private.to(weight.dtype)])


def model_set_by_hand(demo_models, merged, modality: str) -> torch.nn.Module:
    """The original fine-tune (same components and config) with every LLM weight replaced by the formula."""
    model = load_quietly(model_class(modality), getattr(demo_models, modality))
    layout = detect_layout(set(model.state_dict()), modality)
    with mmer.load_decoupled(merged) as ckpt, torch.no_grad():
        for name, param in model.named_parameters():
            canonical = layout.to_canonical(name)
            if canonical is not None:
                param.copy_(by_hand(ckpt, modality, canonical))
    return model


@pytest.mark.parametrize("modality", MODALITIES)
def test_rebuilt_model_loads_with_from_pretrained_and_its_logits_equal_a_model_set_by_hand(
    demo_models, merged, rebuilt, modality
):
    loaded = load_quietly(model_class(modality), rebuilt / modality)
    expected = model_set_by_hand(demo_models, merged, modality)
    inputs = model_inputs(modality)
    with torch.no_grad():
        logits = loaded(**inputs).logits
        reference = expected(**inputs).logits
    assert torch.equal(logits, reference)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("modality", MODALITIES)
def test_rebuilt_model_is_not_the_original_fine_tune(demo_models, rebuilt, modality):
    # MMER keeps what the mask selects, not θᵢ itself: the rebuilt logits must differ from the original's.
    original = load_quietly(model_class(modality), getattr(demo_models, modality))
    loaded = load_quietly(model_class(modality), rebuilt / modality)
    inputs = model_inputs(modality)
    with torch.no_grad():
        assert not torch.equal(loaded(**inputs).logits, original(**inputs).logits)


@pytest.mark.parametrize("modality", MODALITIES)
def test_rebuilt_checkpoint_has_exactly_the_source_models_keys_shapes_and_config(demo_models, rebuilt, modality):
    source = getattr(demo_models, modality)
    assert keys_of(rebuilt / modality) == keys_of(source)
    assert json.loads((rebuilt / modality / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text()
    )
    assert (rebuilt / modality / "generation_config.json").is_file()


@pytest.mark.parametrize("modality", MODALITIES)
def test_components_are_copied_bit_for_bit(demo_models, merged, rebuilt, modality):
    ckpt = mmer.load_decoupled(merged)
    names = ckpt.modality(modality).component_tensors
    assert names
    with (
        safe_open(str(getattr(demo_models, modality) / "model.safetensors"), framework="pt") as src,
        safe_open(str(rebuilt / modality / "model.safetensors"), framework="pt") as out,
    ):
        for name in names:
            assert torch.equal(src.get_tensor(name), out.get_tensor(name)), name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_merge_variant_rebuilds_models_transformers_load_with_the_checkpoints_tensors(
    demo_models, tmp_path_factory, tmp_path, variant
):
    path = variant_checkpoint(demo_models, tmp_path_factory, variant)
    reconstruct(path, tmp_path / "out")
    with mmer.load_decoupled(path) as ckpt:
        for modality in MODALITIES:
            loaded = load_quietly(model_class(modality), tmp_path / "out" / modality)
            state = loaded.state_dict()
            layout = detect_layout(set(state), modality)
            for name, tensor in state.items():
                canonical = layout.to_canonical(name)
                if canonical is not None:
                    assert torch.equal(tensor, ckpt.llm_tensor(modality, canonical)), (modality, name)


def test_one_modality_goes_into_the_output_directory_itself(merged, tmp_path):
    report = reconstruct_modality(merged, "audio", tmp_path / "audio-model")
    assert (tmp_path / "audio-model" / "model.safetensors").is_file()
    assert [m.modality for m in report.models] == ["audio"]
    assert report.models[0].path == str(tmp_path / "audio-model")
    assert report.models[0].layout == "hf_legacy"


def test_small_shards_are_indexed_and_still_load(merged, tmp_path):
    reconstruct_modality(merged, "vision", tmp_path / "v", shard_size=256 * 1024)
    shards = sorted(p.name for p in (tmp_path / "v").glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "v" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    load_quietly(model_class("vision"), tmp_path / "v")


def test_an_existing_output_is_refused_and_left_as_it_was(merged, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        reconstruct(merged, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(OutputExistsError, match="not an mmer output"):
        reconstruct(merged, out, overwrite=True)  # --overwrite replaces only what mmer wrote
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    mine = tmp_path / "rebuilt"
    reconstruct(merged, mine, ["vision"])
    reconstruct(merged, mine, ["audio"], overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == [".mmer-output", "audio"]


def test_an_unknown_modality_is_refused_naming_the_ones_there_are_and_nothing_is_written(merged, tmp_path):
    with pytest.raises(DecoupledFormatError, match="no modality 'video'.*vision, audio"):
        reconstruct(merged, tmp_path / "out", ["video"])
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())


def test_several_modalities_cannot_share_one_model_directory(merged, tmp_path):
    with pytest.raises(ConfigError, match="cannot share one model directory") as info:
        reconstruct(merged, tmp_path / "out", ["vision", "audio"], subdirs=False)
    assert info.value.hint
