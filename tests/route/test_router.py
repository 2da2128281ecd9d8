"""mmer.route.router: one shared LLM, switched by rebuilding from θ_base, equal to the rebuilt models."""

from __future__ import annotations

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

import mmer
from mmer.route.models import RoutingInputError
from mmer.route.router import Router

MODALITIES = ("vision", "audio")


@pytest.fixture(scope="session")
def merged(demo_models, tmp_path_factory):
    return merged_checkpoint(demo_models, tmp_path_factory)


@pytest.fixture(scope="session")
def rebuilt(demo_models, tmp_path_factory):
    return rebuilt_models(demo_models, tmp_path_factory)


@pytest.fixture(scope="module")
def router(merged):
    return Router.from_pretrained(merged, device="cpu")


@pytest.mark.parametrize("modality", MODALITIES)
def test_router_logits_equal_the_reconstructed_models(router, rebuilt, modality):
    reference = load_quietly(model_class(modality), rebuilt / modality)
    inputs = model_inputs(modality, batch=2)
    with torch.no_grad():
        expected = reference(**inputs).logits
    assert torch.equal(router(**inputs, modality=modality).logits, expected)


@pytest.mark.parametrize("modality", MODALITIES)
def test_router_generate_equals_the_reconstructed_models_generate(router, rebuilt, modality):
    reference = load_quietly(model_class(modality), rebuilt / modality)
    inputs = model_inputs(modality)
    expected = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(router.generate(**inputs, modality=modality, max_new_tokens=6, do_sample=False), expected)


def test_switching_back_and_forth_100_times_leaves_the_weights_bit_identical_to_a_fresh_rebuild(merged):
    router = Router.from_pretrained(merged, activate="vision")
    for i in range(100):
        router.switch(("audio", "vision")[i % 2])
    assert router.switches == 101 and router.active == "vision"
    fresh = Router.from_pretrained(merged, activate="vision")
    state, expected = router.llm_state(), fresh.llm_state()
    assert state.keys() == expected.keys()
    with mmer.load_decoupled(merged) as ckpt:
        for name, tensor in state.items():
            assert torch.equal(tensor, expected[name]), name
            assert torch.equal(tensor, ckpt.llm_tensor("vision", name)), name


def test_every_modality_model_is_bound_to_the_one_live_copy_of_the_llm(router):
    vision = router.models["vision"].model.state_dict()
    audio = router.models["audio"].model.state_dict()
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    live = router.live["model.layers.0.self_attn.q_proj.weight"]
    assert vision[name].data_ptr() == audio[name].data_ptr() == live.data_ptr()
    # Private vocabulary rows differ in number: each model sees its own rows of one shared buffer.
    embed = "model.language_model.embed_tokens.weight"
    assert vision[embed].shape[0] == 514 and audio[embed].shape[0] == 513
    assert vision[embed].data_ptr() == audio[embed].data_ptr()


def test_a_switch_rebuilds_from_the_base_so_a_damaged_live_weight_is_repaired(merged):
    router = Router.from_pretrained(merged, activate="vision")
    name = next(n for n in router.live if not router.weights.same_weights("vision", "audio", n))
    with torch.no_grad():
        router.live[name].add_(1.0)
    router.switch("audio")
    router.switch("vision")
    with mmer.load_decoupled(merged) as ckpt:
        assert torch.equal(router.llm_state()[name], ckpt.llm_tensor("vision", name))


def test_a_switch_rewrites_only_tensors_whose_weights_differ(router):
    router.switch("vision")
    router.switch("audio")
    differing = [n for n in router.live if not router.weights.same_weights("vision", "audio", n)]
    assert router.last_switch_rebuilt == len(differing)
    router.switch("audio")
    assert router.last_switch_rebuilt == len(differing)  # no-op switch: nothing rebuilt, nothing recorded


def test_a_router_of_one_modality_loads_only_that_one(merged):
    router = Router.from_pretrained(merged, modalities=["audio"])
    assert router.modalities == ["audio"] and router.active == "audio"
    assert set(router.weights.masks) == {"audio"}
    with pytest.raises(RoutingInputError, match="no modality 'vision'") as info:
        router.switch("vision")
    assert "modalities=" in info.value.hint


def test_an_unknown_modality_is_refused_naming_the_ones_there_are(router):
    with pytest.raises(RoutingInputError, match="has vision, audio"):
        router(**model_inputs("vision"), modality="video")


def test_memory_report_counts_base_tau_masks_live_and_components(router):
    held = router.nbytes()
    assert held["base"] == held["tau_star"]  # τ* is stored in the base's dtype by default
    assert held["masks"] * 8 >= 2 * held["base"] // 4  # one bit per parameter per modality, fp32 base
    assert held["live"] >= held["base"]
    assert held["components"] > 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_merge_variant_routes_to_exactly_the_checkpoints_own_tensors(demo_models, tmp_path_factory, variant):
    path = variant_checkpoint(demo_models, tmp_path_factory, variant)
    router = Router.from_pretrained(path)
    with mmer.load_decoupled(path) as ckpt:
        for modality in ("audio", "vision", "audio"):
            router.switch(modality)
            for name, tensor in router.llm_state().items():
                assert torch.equal(tensor, ckpt.llm_tensor(modality, name)), (modality, name)
            assert router(**model_inputs(modality), modality=modality).logits.isfinite().all()
    mixed = router.expansion().embed([torch.tensor([[1, 2]]), ("vision", model_inputs("vision"))])
    assert router.expansion(cache_modality_weights=False)(mixed).logits.isfinite().all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_cuda_without_a_cuda_device_is_refused_before_loading(merged):
    from mmer.errors import ConfigError

    with pytest.raises(ConfigError, match="no usable CUDA device") as info:
        Router.from_pretrained(merged, device="cuda")
    assert "device='cpu'" in info.value.hint


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("base_device", [None, "cpu"], ids=["base-on-gpu", "base-on-host"])
def test_on_a_gpu_switches_rebuild_the_same_bits_and_logits_match_the_cpu(merged, base_device):
    gpu = Router.from_pretrained(merged, device="cuda", base_device=base_device)
    cpu = Router.from_pretrained(merged)
    with mmer.load_decoupled(merged) as ckpt:
        for modality in ("audio", "vision", "audio"):
            gpu.switch(modality)
            for name, tensor in gpu.llm_state().items():
                assert torch.equal(tensor.cpu(), ckpt.llm_tensor(modality, name)), (modality, name)
    for modality in MODALITIES:
        inputs = model_inputs(modality)
        on_gpu = gpu(**{k: v.cuda() for k, v in inputs.items()}, modality=modality).logits.cpu()
        torch.testing.assert_close(on_gpu, cpu(**inputs, modality=modality).logits, rtol=1e-4, atol=1e-4)
    expansion = gpu.expansion(cache_modality_weights=False)
    mixed = expansion.embed([torch.tensor([[1, 2]]).cuda(), ("vision", model_inputs("vision"))])
    assert expansion(mixed).logits.isfinite().all()
