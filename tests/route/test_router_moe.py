"""The router over MoE fine-tunes saved with plain ``save_pretrained``: experts per expert on disk, fused in memory.

transformers 5 writes a Mixtral's experts as ``block_sparse_moe.experts.E.w1/w2/w3.weight`` (Qwen2-MoE's as
``mlp.experts.E.gate_proj/up_proj/down_proj.weight``) and holds them fused (``mlp.experts.gate_up_proj``
[E, 2F, D], ``down_proj`` [E, D, F]). The merge keeps τ* and the masks per on-disk tensor; the router binds
the fused live parameters and rebuilds each expert's tensor into its slice (``mmer.route.live_layout``). Every
comparison below is exact: against the modality rebuilt by ``mmer reconstruct`` and loaded by
``from_pretrained``, against the same models merged from fused files, and for a MoExtend pack, against the
pack on the base loaded by ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from route_fixtures import tiny_moe_module
from safetensors import safe_open
from safetensors.torch import save_file

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
from mmer.route import BASE, MEAN, MixedInput, Router
from mmer.route.reconstruct import reconstruct

tiny_moe = tiny_moe_module()
single_thread = tiny_moe.single_thread  # autouse: one thread for this module
MODALITIES = {"vision": 1, "audio": 2}  # fine-tune seeds
TEXT = torch.tensor([[5, 9, 17, 30, 41, 7], [6, 8, 10, 12, 14, 16]])
# On-disk names of expert 3's tensors in layer 0 (w1/gate, w3/up, w2/down) and the fused parameters they form.
EXPERT = {
    "mixtral": ("block_sparse_moe.experts.3.w1", "block_sparse_moe.experts.3.w3", "block_sparse_moe.experts.3.w2"),
    "qwen2_moe": ("mlp.experts.3.gate_proj", "mlp.experts.3.up_proj", "mlp.experts.3.down_proj"),
}
GATE_UP, DOWN = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"


def fine_tune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: t + torch.randn(t.shape, generator=g) * 0.02 * (torch.rand(t.shape, generator=g) < 0.7)
        for n, t in base.items()
    }


def merge(dirs: dict[str, Path], out: Path) -> Path:
    specs = tuple(ModelSpec(str(dirs[m]), modality=m) for m in MODALITIES)
    mmer.run_merge(Recipe(ModelSpec(str(dirs["base"])), specs, MergeOptions(hash_inputs=False)), out)
    return out


def moextend_recipe() -> MoExtendRecipe:
    quick = tiny_moe.quick
    return MoExtendRecipe(
        align=quick(steps=2),
        probe=quick(steps=2, learning_rate=0.5),
        finetune=quick(steps=3),
        selection=ProbeOptions(fraction=0.5),
        extend=ExtendOptions(modality="digits"),
    )


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe(request, tmp_path_factory) -> dict[str, object]:
    """base/, vision/, audio/ by save_pretrained; merged/; rebuilt/<m>/; fused/ (same models, fused files); pack/."""
    family = request.param
    root = tmp_path_factory.mktemp(f"router-moe-{family}")
    base_lm = tiny_moe.build_lm(family, layers=2)
    states = {"base": {n: t.detach().clone() for n, t in base_lm.state_dict().items()}}
    states |= {m: fine_tune(states["base"], seed) for m, seed in MODALITIES.items()}
    dirs, fused_dirs = {}, {}
    for label, state in states.items():
        lm = tiny_moe.build_lm(family, layers=2)
        lm.load_state_dict(state)
        lm.save_pretrained(root / label)  # per expert on disk
        dirs[label] = root / label
        fused_dirs[label] = root / "fused" / label
        fused_dirs[label].mkdir(parents=True)
        save_file({n: t.contiguous() for n, t in state.items()}, str(fused_dirs[label] / "model.safetensors"))
        lm.config.save_pretrained(fused_dirs[label])
    merged = merge(dirs, root / "merged")
    reconstruct(merged, root / "rebuilt")
    pack = run_moextend(load_base(dirs["base"]), tiny_moe.make_data(), root / "pack", moextend_recipe()).pack
    return {
        "family": family,
        "dirs": dirs,
        "merged": merged,
        "fused_merged": merge(fused_dirs, root / "fused" / "merged"),
        "rebuilt": root / "rebuilt",
        "pack": pack,
    }


@pytest.fixture(scope="module")
def router(moe):
    return Router.from_pretrained(moe["merged"], packs=[moe["pack"]])


def rebuilt_model(moe, modality: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(moe["rebuilt"] / modality).eval()


def expert_slots(moe) -> tuple[str, str, str]:
    return tuple(f"model.layers.0.{name}.weight" for name in EXPERT[moe["family"]])  # type: ignore[return-value]


def pack_inputs(n: int = 4, seed: int = 7) -> dict[str, torch.Tensor]:
    batch = tiny_moe.make_data(n=n, seed=seed).batch(torch.arange(n))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "features": batch["features"]}


def test_save_pretrained_writes_experts_per_expert_and_the_merge_keeps_them(moe):
    with safe_open(str(moe["dirs"]["vision"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    w1, w3, w2 = expert_slots(moe)
    assert {w1, w3, w2} <= keys and not any("gate_up_proj" in k for k in keys)
    with mmer.load_decoupled(moe["merged"]) as ckpt:
        slots = {s.name for s in ckpt.slots}
        assert {w1, w3, w2} <= slots and GATE_UP not in slots  # τ* and masks per on-disk tensor


def test_the_router_binds_the_fused_parameters_and_each_expert_tensor_is_a_slice_of_them(router, moe):
    w1, w3, w2 = expert_slots(moe)
    gate_up, down = router.live[GATE_UP], router.live[DOWN]
    assert w1 not in router.live and gate_up.shape[0] == 4 and gate_up.shape[1] == 2 * router.targets[w1].shape[0]
    half = gate_up.shape[1] // 2
    # transformers' order: gate_up[e] = cat([w1/gate, w3/up]), down[e] = w2/down, experts in index order
    assert router.targets[w1].data_ptr() == gate_up[3, :half].data_ptr()
    assert router.targets[w3].data_ptr() == gate_up[3, half:].data_ptr()
    assert router.targets[w2].data_ptr() == down[3].data_ptr()
    model = router.use("vision")
    assert model.get_parameter(GATE_UP).data_ptr() == gate_up.data_ptr()  # bound, no copy
    assert router.nbytes()["live"] == sum(p.nbytes for p in model.parameters())


@pytest.mark.parametrize("modality", list(MODALITIES))
def test_routed_logits_and_weights_equal_the_model_mmer_reconstruct_rebuilt(router, moe, modality):
    reference = rebuilt_model(moe, modality)
    with torch.no_grad():
        expected = reference(input_ids=TEXT).logits
    router.switch("digits")  # reached from θ_base, not from the other modality
    assert torch.equal(router(input_ids=TEXT, modality=modality).logits, expected)
    routed = router.use(modality).state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(routed[name], tensor), name
    with mmer.load_decoupled(moe["merged"]) as ckpt:
        for slot, tensor in router.llm_state().items():
            assert torch.equal(tensor, ckpt.llm_tensor(modality, slot)), slot


def test_20_switches_leave_every_route_bit_identical(router, moe):
    inputs = pack_inputs()
    first = {m: router(input_ids=TEXT, modality=m).logits for m in MODALITIES}
    pack_first = router(**inputs, modality="digits").logits
    for i in range(20):
        router.switch(["vision", "audio", "digits"][i % 3])
    fresh = Router.from_pretrained(moe["merged"])
    for m in MODALITIES:
        assert torch.equal(router(input_ids=TEXT, modality=m).logits, first[m])
        fresh.switch(m)
        for name, tensor in fresh.live.items():
            assert torch.equal(router.live[name], tensor), (m, name)
    assert torch.equal(router(**inputs, modality="digits").logits, pack_first)


def test_the_pack_routes_exactly_as_on_the_base_from_pretrained_loads(router, moe):
    base = load_base(moe["dirs"]["base"])
    reference = load_extension_pack(base, moe["pack"])
    inputs = pack_inputs()
    with torch.no_grad():
        expected = reference(**inputs).logits
    router.switch("audio")
    assert torch.equal(router(**inputs, modality="digits").logits, expected)
    assert router.state == BASE
    lm = router.packs["digits"].model.lm
    assert lm.get_parameter(GATE_UP).data_ptr() == router.live[GATE_UP].data_ptr()
    assert base_model_hash(lm) == router.packs["digits"].manifest["base"]["sha256"] == base_model_hash(base)


def test_a_pack_is_refused_when_one_experts_base_tensor_differs(moe):
    router = Router.from_pretrained(moe["merged"])
    _, w3, _ = expert_slots(moe)
    router.weights.base[w3] = router.weights.base[w3].clone()  # never touch the checkpoint's own storage
    router.weights.base[w3][0, 0] += 1e-3
    with pytest.raises(IncompatibleBaseError, match="tensors hash to"):
        router.add_extension(moe["pack"])
    assert router.extensions == [] and router.state == "vision"


def test_the_same_models_merged_from_fused_files_route_to_the_same_logits(router, moe):
    fused = Router.from_pretrained(moe["fused_merged"])
    assert not fused.live_layout.renamed and router.live_layout.renamed
    for m in MODALITIES:
        assert torch.equal(router(input_ids=TEXT, modality=m).logits, fused(input_ids=TEXT, modality=m).logits)
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 7, tiny_moe.HIDDEN, generator=g)
    groups = torch.tensor([[0, 1, 1, 0, 2, 2, 0], [0, 0, 2, 2, 1, 0, 0]])
    mixed = MixedInput(embeds, groups, torch.ones_like(groups))
    for cache in (True, False):
        got = router.expansion(cache_modality_weights=cache)(mixed).logits
        assert torch.equal(got, fused.expansion(cache_modality_weights=cache)(mixed).logits)
    assert router.state == MEAN


def test_an_explicit_device_map_may_name_the_in_memory_expert_modules(moe):
    modules = ["model.embed_tokens", "model.layers.0", "model.layers.1.self_attn", "model.layers.1.mlp"]
    modules += ["model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm", "lm_head"]
    placed = Router.from_pretrained(moe["merged"], device_map=dict.fromkeys(modules, "cpu"))
    plain = Router.from_pretrained(moe["merged"])
    for m in MODALITIES:
        assert torch.equal(placed(input_ids=TEXT, modality=m).logits, plain(input_ids=TEXT, modality=m).logits)


def test_expansion_on_one_modality_runs_its_weights_in_the_routed_modules_and_text_weights_elsewhere(router, moe):
    expansion = router.expansion()
    routed = {f"{module}.{leaf}" for module, wrapped in expansion.routed.items() for leaf in wrapped.names}
    assert not any(".experts." in n for n in routed)  # fused experts are not per-token modules (left on text)
    router.switch(MEAN)
    text = {n: t.clone() for n, t in router.live.items()}
    reference = rebuilt_model(moe, "vision")
    reference.load_state_dict({n: t if n in routed else text[n] for n, t in reference.state_dict().items()})
    embeds = torch.randn(2, 5, tiny_moe.HIDDEN, generator=torch.Generator().manual_seed(5))
    groups = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        expected = reference(inputs_embeds=embeds).logits
    assert torch.equal(expansion(MixedInput(embeds, groups, torch.ones_like(groups))).logits, expected)


def test_a_routed_module_takes_hidden_states_flattened_in_token_order(router):
    """Qwen2-MoE's shared expert sees [batch·seq, hidden]: each row keeps its token's group."""
    expansion = router.expansion()
    wrapped = expansion.routed["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 4, tiny_moe.HIDDEN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), expansion.routing(torch.tensor([[0, 1, 1, 2], [2, 2, 0, 1]])):
        per_token = wrapped(x)
        flat = wrapped(x.reshape(8, -1))
    assert flat.shape == (8, per_token.shape[-1]) and torch.equal(flat, per_token.reshape(8, -1))


def test_a_conversion_the_router_cannot_slice_or_a_wrong_expert_count_is_refused_naming_the_tensor():
    from transformers.core_model_loading import MergeModulelist, Transpose, WeightConverter

    from mmer.errors import LayoutError
    from mmer.route.live_layout import layout_from_mapping

    slots = {f"model.layers.0.mlp.experts.{e}.down_proj.weight": (4, 6) for e in range(3)}
    params = {"model.layers.0.mlp.experts.down_proj": (3, 4, 6)}

    def converter(*ops):
        return [WeightConverter("mlp.experts.*.down_proj.weight", "mlp.experts.down_proj", operations=list(ops))]

    fused = layout_from_mapping(slots, params, converter(MergeModulelist(dim=0)), "ckpt")
    assert fused.parts["model.layers.0.mlp.experts.2.down_proj.weight"].index == (("select", 0, 2, 0),)
    with pytest.raises(LayoutError, match="Transpose.*cannot map") as err:
        layout_from_mapping(slots, params, converter(MergeModulelist(dim=0), Transpose(1, 2)), "ckpt")
    assert err.value.tensor == "model.layers.0.mlp.experts.0.down_proj.weight"
    with pytest.raises(LayoutError, match=r"assemble into .* \(3, 4, 6\), but the base model holds it as \(4, 4, 6\)"):
        layout_from_mapping(
            slots, {"model.layers.0.mlp.experts.down_proj": (4, 4, 6)}, converter(MergeModulelist(0)), "ckpt"
        )
