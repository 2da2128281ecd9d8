"""Router.from_pretrained(..., device_map=...): the LLM placed with accelerate, every weight rebuilt where it lives.

On a CPU every map puts everything on ``"cpu"``, but the router still hooks every model with accelerate
(``force_hooks``), so these tests run the dispatched path: same bits, same logits, switches through hooks.
"""

from __future__ import annotations

import pytest
import torch
from route_fixtures import merged_checkpoint, model_inputs

import mmer
from mmer.errors import ConfigError
from mmer.route.placement import model_map, slot_devices
from mmer.route.router import Router

MODALITIES = ("vision", "audio")


@pytest.fixture(scope="session")
def merged(demo_models, tmp_path_factory):
    return merged_checkpoint(demo_models, tmp_path_factory)


@pytest.fixture(scope="module")
def plain(merged):
    return Router.from_pretrained(merged)


def llm_modules(merged) -> list[str]:
    """The base causal LM's top-level LLM modules, as a device map names them."""
    with mmer.load_decoupled(merged) as ckpt:
        layers = sorted({int(s.name.split(".")[2]) for s in ckpt.slots if s.name.startswith("model.layers.")})
        tied = not any(s.name.startswith("lm_head.") for s in ckpt.slots)
    return ["model.embed_tokens", *[f"model.layers.{i}" for i in layers], "model.norm", *([] if tied else ["lm_head"])]


@pytest.fixture(scope="module")
def dispatched(merged):
    return Router.from_pretrained(merged, device_map=dict.fromkeys(llm_modules(merged), "cpu"))


@pytest.mark.parametrize("modality", MODALITIES)
def test_a_dispatched_router_gives_the_undispatched_routers_logits_bit_for_bit(dispatched, plain, modality):
    inputs = model_inputs(modality, batch=2)
    assert torch.equal(dispatched(**inputs, modality=modality).logits, plain(**inputs, modality=modality).logits)


def test_every_model_is_hooked_by_accelerate_and_still_bound_to_the_one_live_copy(dispatched):
    model = dispatched.models["vision"].model
    layer = model.get_submodule("model.language_model.layers.0")
    assert hasattr(layer, "_hf_hook") and hasattr(model, "_hf_hook")
    live = dispatched.live["model.layers.0.self_attn.q_proj.weight"]
    for name in MODALITIES:
        param = dispatched.models[name].model.get_parameter("model.language_model.layers.0.self_attn.q_proj.weight")
        assert param.data_ptr() == live.data_ptr()  # the hooks kept the views: a switch reaches every model


def test_switches_through_the_hooks_rebuild_exactly_the_checkpoints_tensors(merged, dispatched, plain):
    with mmer.load_decoupled(merged) as ckpt:
        for modality in ("audio", "vision", "audio", "vision"):
            dispatched.switch(modality)
            for name, tensor in dispatched.llm_state().items():
                assert torch.equal(tensor, ckpt.llm_tensor(modality, name)), (modality, name)
    inputs = model_inputs("vision")
    expected = plain.generate(**inputs, modality="vision", max_new_tokens=4, do_sample=False)
    assert torch.equal(dispatched.generate(**inputs, modality="vision", max_new_tokens=4, do_sample=False), expected)


def test_each_weights_tau_masks_base_and_live_copy_sit_on_its_mapped_device(dispatched):
    weights = dispatched.weights
    for name, device in weights.devices.items():
        assert dispatched.live[name].device == device and weights.base[name].device == device
        if name in weights.tau:
            assert weights.tau[name].device == device
            assert all(weights.masks[m][name].device == device for m in MODALITIES)


def test_expansion_mode_on_a_dispatched_router_equals_the_undispatched_one(dispatched, plain):
    parts = [torch.tensor([[1, 2]]), ("vision", model_inputs("vision")), torch.tensor([[3]])]
    for cache in (True, False):
        ours, theirs = (
            dispatched.expansion(cache_modality_weights=cache),
            plain.expansion(cache_modality_weights=cache),
        )
        assert torch.equal(ours(ours.embed(parts)).logits, theirs(theirs.embed(parts)).logits)


def test_weights_accelerate_offloads_to_the_host_still_follow_every_switch(merged, plain):
    """What "cpu" in a GPU map means: the hooks serve the weights from the host tensors a switch rewrites."""
    from accelerate import cpu_offload

    router = Router.from_pretrained(merged, activate="audio")
    model = router.models["vision"].model
    cpu_offload(model, execution_device=torch.device("cpu"))  # offloaded while audio's weights are live
    assert model.get_parameter("model.language_model.layers.0.self_attn.q_proj.weight").is_meta
    inputs = model_inputs("vision")
    assert torch.equal(router(**inputs, modality="vision").logits, plain(**inputs, modality="vision").logits)


def test_auto_with_room_on_the_cpu_places_everything_there_and_matches(merged, plain):
    router = Router.from_pretrained(merged, device_map="auto", max_memory={"cpu": "64GiB"})
    assert set(router.device_map.values()) == {"cpu"}
    inputs = model_inputs("audio")
    assert torch.equal(router(**inputs, modality="audio").logits, plain(**inputs, modality="audio").logits)


def test_a_budget_that_forces_disk_offload_is_refused_because_switches_could_not_reach_the_disk(merged):
    with pytest.raises(ConfigError, match="on 'disk'") as info:
        Router.from_pretrained(merged, device_map="sequential", max_memory={"cpu": 200_000})
    assert info.value.key == "device_map" and "max_memory" in info.value.hint


@pytest.mark.parametrize("where", ["disk", "meta"])
def test_an_explicit_disk_or_meta_placement_is_refused(merged, where):
    device_map = dict.fromkeys(llm_modules(merged), "cpu") | {"model.layers.1": where}
    with pytest.raises(ConfigError, match=f"model.layers.1 on '{where}'"):
        Router.from_pretrained(merged, device_map=device_map)


def test_a_map_that_leaves_a_weight_without_a_device_is_refused_naming_it(merged):
    device_map = {name: "cpu" for name in llm_modules(merged) if name != "model.norm"}
    with pytest.raises(ConfigError, match="no device for model.norm.weight") as info:
        Router.from_pretrained(merged, device_map=device_map)
    assert "device_map='auto'" in info.value.hint


def test_device_and_device_map_together_or_max_memory_with_an_explicit_map_are_refused(merged):
    with pytest.raises(ConfigError, match="both device"):
        Router.from_pretrained(merged, device="cpu", device_map="auto")
    with pytest.raises(ConfigError, match="max_memory given with an explicit device_map"):
        Router.from_pretrained(merged, device_map={"": "cpu"}, max_memory={"cpu": "1GiB"})


def test_each_weight_takes_the_device_of_the_longest_module_prefix_holding_it():
    device_map = {"model": "cuda:0", "model.layers.1": 1, "model.layers.10": "cuda:2", "lm_head": "cpu"}
    slots = ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.10.x", "lm_head.weight"]
    devices = slot_devices(slots, device_map, "test")
    assert [str(devices[s]) for s in slots] == ["cuda:0", "cuda:1", "cuda:2", "cpu"]


def test_a_modality_models_map_is_the_llm_map_in_its_layout_with_components_on_the_main_device(dispatched):
    built = dispatched.models["vision"]
    device_map = {"model.embed_tokens": 0, "model.layers.0": 1, "model.layers.1": 1, "model.norm": 1}
    translated = model_map(built.model, built.layout, device_map, torch.device("cuda", 0))
    assert translated["model.language_model.layers.0"] == 1 and translated["model.language_model.embed_tokens"] == 0
    assert translated["model.vision_tower"] == translated["model.multi_modal_projector"] == "cuda:0"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_a_map_with_cpu_offloaded_layers_rebuilds_them_on_the_host_and_matches_one_device(merged):
    modules = llm_modules(merged)
    device_map = dict.fromkeys(modules, 0) | {"model.layers.1": "cpu"}
    split = Router.from_pretrained(merged, device_map=device_map)
    whole = Router.from_pretrained(merged, device="cuda")
    assert split.weights.devices["model.layers.1.self_attn.q_proj.weight"].type == "cpu"
    assert split.weights.tau["model.layers.1.self_attn.q_proj.weight"].device.type == "cpu"
    assert split.weights.tau["model.layers.0.self_attn.q_proj.weight"].device.type == "cuda"
    with mmer.load_decoupled(merged) as ckpt:
        for modality in ("audio", "vision", "audio"):
            split.switch(modality)
            for name, tensor in split.llm_state().items():
                assert torch.equal(tensor.cpu(), ckpt.llm_tensor(modality, name)), (modality, name)
            inputs = {k: v.cuda() for k, v in model_inputs(modality).items()}
            torch.testing.assert_close(
                split(**inputs, modality=modality).logits, whole(**inputs, modality=modality).logits
            )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_device_map_auto_places_the_llm_on_it_and_matches_the_cpu(merged, plain):
    router = Router.from_pretrained(merged, device_map="auto")
    assert {d.type for d in router.weights.devices.values()} == {"cuda"}
    for modality in MODALITIES:
        inputs = model_inputs(modality)
        on_gpu = router(**{k: v.cuda() for k, v in inputs.items()}, modality=modality).logits.cpu()
        torch.testing.assert_close(on_gpu, plain(**inputs, modality=modality).logits, rtol=1e-4, atol=1e-4)
