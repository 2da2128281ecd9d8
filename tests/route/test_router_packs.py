"""The router serves MoExtend extension packs beside MMER modalities of the same MoE base, by route name.

One tiny Mixtral base, two fine-tunes merged with MMER (``vision``, ``audio``), all saved with
``save_pretrained`` (experts per expert on disk, fused in memory), and a pack trained on the same base
(``digits``): routing to the pack runs exactly the pack-on-base model, routing to a modality exactly
θ_base + mᵢ∘τ*, and every switch rebuilds from θ_base, so alternating leaves the weights bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from route_fixtures import tiny_moe_module

import mmer
from mmer.config import MergeOptions, ModelSpec, Recipe
from mmer.errors import IncompatibleBaseError
from mmer.extend import (
    ExtendOptions,
    MoExtendRecipe,
    ProbeOptions,
    base_model_hash,
    load_base,
    load_extension_pack,
    run_moextend,
)
from mmer.route import BASE, Router, RoutingInputError
from mmer.route.reconstruct import reconstruct_modality

tiny_moe = tiny_moe_module()
single_thread = tiny_moe.single_thread  # autouse: one thread for this module
MODALITIES = {"vision": 1, "audio": 2}  # fine-tune seeds


def save(state: dict[str, torch.Tensor], directory: Path) -> Path:
    """``save_pretrained``, as a fine-tune is shipped: experts per expert on disk (tests/route/test_router_moe.py)."""
    lm = tiny_moe.build_lm("mixtral", layers=2)
    lm.load_state_dict(state)
    lm.save_pretrained(directory)
    return directory


def moextend_recipe() -> MoExtendRecipe:
    quick = tiny_moe.quick
    return MoExtendRecipe(
        align=quick(steps=2),
        probe=quick(steps=2, learning_rate=0.5),
        finetune=quick(steps=3),
        selection=ProbeOptions(fraction=0.5),
        extend=ExtendOptions(modality="digits"),
    )


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict[str, Path]:
    """base/, vision/, audio/ (Mixtral, 2 layers), merged/ (MMER), pack/ (digits, trained on base/)."""
    root = tmp_path_factory.mktemp("router-packs")
    base = {n: t.detach().clone() for n, t in tiny_moe.build_lm("mixtral", layers=2).state_dict().items()}
    paths = {"base": save(base, root / "base")}
    for modality, seed in MODALITIES.items():
        g = torch.Generator().manual_seed(seed)
        tuned = {n: t + torch.randn(t.shape, generator=g) * 0.02 for n, t in base.items()}
        paths[modality] = save(tuned, root / modality)
    specs = tuple(ModelSpec(str(paths[m]), modality=m) for m in MODALITIES)
    mmer.run_merge(Recipe(ModelSpec(str(paths["base"])), specs, MergeOptions(hash_inputs=False)), root / "merged")
    paths["merged"] = root / "merged"
    paths["pack"] = run_moextend(load_base(paths["base"]), tiny_moe.make_data(), root / "pack", moextend_recipe()).pack
    return paths


@pytest.fixture(scope="module")
def router(moe):
    return Router.from_pretrained(moe["merged"], packs=[moe["pack"]])


def pack_inputs(n: int = 4, seed: int = 7) -> dict[str, torch.Tensor]:
    batch = tiny_moe.make_data(n=n, seed=seed).batch(torch.arange(n))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "features": batch["features"]}


TEXT = torch.tensor([[5, 9, 17, 30, 41, 7], [6, 8, 10, 12, 14, 16]])


def test_a_pack_is_routed_by_the_modality_its_manifest_records_beside_the_mmer_modalities(router):
    assert router.modalities == ["vision", "audio"] and router.extensions == ["digits"]
    assert router.routes == ["vision", "audio", "digits"]
    assert router.active == "vision"  # the first modality stays the default


def test_logits_routed_to_the_pack_equal_the_pack_on_the_base_model_exactly(router, moe):
    reference = load_extension_pack(load_base(moe["base"]), moe["pack"])
    inputs = pack_inputs()
    with torch.no_grad():
        expected = reference(**inputs).logits
    router.switch("vision")
    assert torch.equal(router(**inputs, modality="digits").logits, expected)
    assert router.state == BASE


def test_pack_generation_equals_the_pack_on_the_base_model(router, moe):
    reference = load_extension_pack(load_base(moe["base"]), moe["pack"])
    inputs = pack_inputs(n=2, seed=4)
    prompt, features = inputs["input_ids"][:, :6], inputs["features"]
    expected = reference.generate(prompt, features, max_new_tokens=3, do_sample=False, pad_token_id=0)
    router.switch("audio")
    generated = router.generate(prompt, features, modality="digits", max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("modality", list(MODALITIES))
def test_logits_routed_to_a_modality_equal_its_rebuilt_model_and_its_weights_the_formula(
    router, moe, modality, tmp_path
):
    from transformers import MixtralForCausalLM

    router.switch("digits")
    logits = router(TEXT, modality=modality).logits
    reconstruct_modality(moe["merged"], modality, tmp_path / modality)
    reference = MixtralForCausalLM.from_pretrained(tmp_path / modality).eval()
    with torch.no_grad():
        assert torch.equal(logits, reference(TEXT).logits)
    with mmer.load_decoupled(moe["merged"]) as ckpt:
        for name, tensor in router.llm_state().items():
            expected = ckpt.base_tensor(name)
            if name in router.weights.tau:
                expected = expected + torch.where(ckpt.mask(modality, name), ckpt.tau_star(name), 0.0)
            assert torch.equal(tensor, expected), name


def test_the_pack_runs_on_theta_base_itself_and_adds_only_its_own_tensors(router, moe):
    router.switch("digits")
    with mmer.load_decoupled(moe["merged"]) as ckpt:
        for name, tensor in router.llm_state().items():
            assert torch.equal(tensor, ckpt.base_tensor(name)), name
    lm = router.use("digits").lm
    assert base_model_hash(lm) == router.packs["digits"].manifest["base"]["sha256"]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert lm.get_parameter(q).data_ptr() == router.live[q].data_ptr()  # a view of the live weights, no copy
    held = router.nbytes()
    assert 0 < held["extensions"] < held["live"]


def test_50_alternations_between_pack_and_modalities_leave_every_weight_bit_identical_to_a_fresh_load(moe):
    router = Router.from_pretrained(moe["merged"], packs={"digits": moe["pack"]})
    inputs = pack_inputs()
    first = router(**inputs, modality="digits").logits
    cycle = ("digits", "vision", "digits", "audio", "vision", "audio")
    for i in range(50):
        router.switch(cycle[i % len(cycle)])
    fresh = Router.from_pretrained(moe["merged"], packs={"digits": moe["pack"]})
    for route in ("vision", "audio", "digits"):
        router.switch(route)
        fresh.switch(route)
        state, expected = router.llm_state(), fresh.llm_state()
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert torch.equal(tensor, expected[name]), (route, name)
    pack_state = router.use("digits").state_dict()
    for name, tensor in fresh.use("digits").state_dict().items():
        assert torch.equal(pack_state[name], tensor), name
    assert torch.equal(router(**inputs, modality="digits").logits, first)


def test_switching_between_two_packs_rewrites_nothing(moe):
    router = Router.from_pretrained(moe["merged"], packs={"digits": moe["pack"], "digits2": moe["pack"]})
    router.switch("digits")
    router.switch("digits2")
    assert router.last_switch_rebuilt == 0
    router.switch("vision")
    assert router.last_switch_rebuilt == len(router.weights.tau)  # every merged tensor, from θ_base


def test_a_pack_named_like_a_modality_or_another_pack_is_refused(router, moe):
    with pytest.raises(RoutingInputError, match="'vision' is already an MMER modality") as info:
        router.add_extension(moe["pack"], "vision")
    assert "name=" in info.value.hint
    with pytest.raises(RoutingInputError, match="'digits' is already an extension pack"):
        router.add_extension(moe["pack"])
    with pytest.raises(RoutingInputError, match="already reserved"):
        router.add_extension(moe["pack"], BASE)
    assert router.routes == ["vision", "audio", "digits"]


def test_a_pack_trained_on_another_base_is_refused_naming_both_files_and_the_router_still_works(router, moe, tmp_path):
    other = run_moextend(
        tiny_moe.build_lm("mixtral", seed=1, layers=2), tiny_moe.make_data(), tmp_path / "p", moextend_recipe()
    )
    router.switch("audio")
    before = {n: t.clone() for n, t in router.llm_state().items()}
    with pytest.raises(IncompatibleBaseError, match="hash to") as info:
        router.add_extension(other.pack, "other")
    assert str(moe["merged"]) in info.value.message and str(other.pack) in info.value.file
    assert "retrain the pack" in info.value.hint
    assert "other" not in router.routes and router.active == "audio"
    assert all(torch.equal(t, before[n]) for n, t in router.llm_state().items())  # back on the active route's weights


def test_a_pack_of_another_moe_family_is_refused_by_model_type(router, tmp_path):
    olmoe = run_moextend(tiny_moe.load_lm("olmoe"), tiny_moe.make_data(), tmp_path / "p", moextend_recipe())
    with pytest.raises(IncompatibleBaseError, match="is a mixtral model and the pack extends") as info:
        router.add_extension(olmoe.pack, "olmoe")
    assert info.value.key == "model_type"


def test_a_pack_on_a_dense_base_is_refused(moe, demo_models, tmp_path_factory):
    from route_fixtures import merged_checkpoint

    dense = merged_checkpoint(demo_models, tmp_path_factory)
    with pytest.raises(IncompatibleBaseError, match="not a Mixture-of-Experts family") as info:
        Router.from_pretrained(dense, packs={"digits": moe["pack"]})
    assert str(dense) in info.value.message and "merged from the pack's base" in info.value.hint


def test_a_single_merged_model_has_no_theta_base_for_a_pack(moe, tmp_path):
    specs = tuple(ModelSpec(str(moe[m]), modality=m) for m in MODALITIES)
    options = MergeOptions(hash_inputs=False, mask="none")
    mmer.run_merge(Recipe(ModelSpec(str(moe["base"])), specs, options), tmp_path / "single")
    with pytest.raises(IncompatibleBaseError, match="single merged model") as info:
        Router.from_pretrained(tmp_path / "single", packs=[moe["pack"]])
    assert info.value.key == "mask"


def test_expansion_mode_refuses_a_pack_and_says_how_to_run_it(router):
    expansion = router.expansion(cache_modality_weights=False)
    with pytest.raises(RoutingInputError, match="'digits' is a MoExtend extension pack") as info:
        expansion.embed([TEXT, ("digits", pack_inputs())])
    assert "modality='digits'" in info.value.hint


def test_a_router_can_serve_packs_only(moe):
    router = Router.from_pretrained(moe["merged"], modalities=[], packs=[moe["pack"]])
    assert router.routes == ["digits"] and router.active == "digits"
    router.remove_extension("digits")
    with pytest.raises(RoutingInputError, match="no modality 'digits'"):
        router.switch("digits")


def test_a_router_placed_with_a_device_map_serves_the_pack_and_the_modalities_with_the_same_logits(router, moe):
    device_map = dict.fromkeys(
        ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"], "cpu"
    )
    placed = Router.from_pretrained(moe["merged"], device_map=device_map, packs=[moe["pack"]])
    assert hasattr(placed.use("digits").lm.get_submodule("model.layers.1"), "_hf_hook")
    inputs = pack_inputs()
    for route in ("digits", "vision", "digits", "audio"):
        args = inputs if route == "digits" else {"input_ids": TEXT}
        ours, theirs = placed(**args, modality=route), router(**args, modality=route)
        assert torch.equal(ours.logits, theirs.logits)  # a pack answers with a ModelOutput too
