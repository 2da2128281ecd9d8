"""mmer.extend.block / extension / calibration: the wrapper block around transformers' own MoE blocks."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_moe import (
    FAMILY_NAMES,
    HIDDEN,
    build_lm,
    single_thread,  # noqa: F401  (autouse: one thread per module)
)

from mmer.errors import LayoutError
from mmer.extend import Calibration, ExtendedMoeBlock, ExtendOptions, MoExtendModel, extend_model, route
from mmer.extend.extension import expected_new_parameter_count, remove_extension, set_trainable
from mmer.extend.families import moe_layer_indices


def hidden_states(seed: int = 5, tokens: int = 40) -> torch.Tensor:
    return torch.randn(2, tokens // 2, HIDDEN, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- routing (Eq. 9)
OLD = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
NEW = torch.tensor([[-2.0]])  # never in the top-2, but it takes softmax mass


def test_a_renormalising_router_keeps_the_old_top_k_weights_when_the_new_expert_is_not_chosen():
    base_weights, base_index = route(OLD, 2, None, renormalise=True, weights_dtype=None)
    weights, index = route(torch.cat([OLD, NEW], -1), 2, None, renormalise=True, weights_dtype=None)
    assert torch.equal(index, base_index)
    assert torch.allclose(weights, base_weights, atol=1e-7)


def test_without_renormalisation_the_extra_softmax_term_dilutes_every_old_weight_eq_9():
    base_weights, _ = route(OLD, 2, None, renormalise=False, weights_dtype=None)
    weights, _ = route(torch.cat([OLD, NEW], -1), 2, None, renormalise=False, weights_dtype=None)
    z = sum(math.exp(v) for v in OLD[0].tolist())
    shrink = z / (z + math.exp(-2.0))  # s′_j = s_j · Z / (Z + e^{l_new}) < s_j
    assert torch.allclose(weights, base_weights * shrink, atol=1e-7)
    assert bool((weights < base_weights).all())


def test_top_k_is_chosen_before_calibration_and_the_weights_are_gathered_after_it():
    calibration = Calibration("additive_vector", 5)
    with torch.no_grad():
        calibration.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0]))  # would make expert 3 the favourite
    logits = torch.cat([OLD, NEW], -1)
    weights, index = route(logits, 2, calibration, renormalise=False, weights_dtype=None)
    probs = torch.softmax(logits, -1)
    assert index.tolist() == [[0, 1]]  # selection ignores the calibration
    assert torch.allclose(weights, probs[:, :2])  # expert 3's boost is not gathered


@pytest.mark.parametrize(
    "form", ["additive_mlp", "multiplicative_mlp", "additive_vector", "multiplicative_vector", "none"]
)
def test_every_calibration_form_is_the_identity_at_initialisation(form):
    calibration = Calibration(form, 5, hidden=16, init_std=0.02)
    calibration.reset_parameters(torch.Generator().manual_seed(0))
    probs = torch.softmax(torch.randn(7, 5), -1)
    assert torch.equal(calibration(probs), probs)


def test_the_additive_mlp_has_the_codes_shapes_and_init():
    calibration = Calibration("additive_mlp", 9, hidden=16, init_std=0.02)
    calibration.reset_parameters(torch.Generator().manual_seed(0))
    first, last = calibration.mlp[0].weight, calibration.mlp[2].weight
    assert first.shape == (16, 9) and last.shape == (9, 16)  # 288 parameters per layer, as in the code
    assert calibration.mlp[0].bias is None and calibration.mlp[2].bias is None
    assert bool((last == 0).all()) and 0.005 < float(first.detach().std()) < 0.05


# ------------------------------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_new_expert_and_router_row_are_exact_copies_of_the_source_expert(family):
    lm = build_lm(family)
    model = MoExtendModel(lm)
    layer = moe_layer_indices(lm)[-1]
    extend_model(model, {layer: [2]}, ExtendOptions(layers="all"))
    block = lm.model.layers[layer].mlp
    assert isinstance(block, ExtendedMoeBlock)
    assert torch.equal(block.new_experts.gate_up_proj[0], block.experts.gate_up_proj[2])
    assert torch.equal(block.new_experts.down_proj[0], block.experts.down_proj[2])
    assert torch.equal(block.new_router.weight[0], block.gate.weight[2])
    x = hidden_states().reshape(-1, HIDDEN)
    logits = block.router_logits(x)
    assert torch.equal(logits[:, :4], torch.nn.functional.linear(x, block.gate.weight))  # old logits: the base's
    torch.testing.assert_close(logits[:, 4], logits[:, 2], rtol=0, atol=1e-5)  # the copy ties its source (§2.3)


@pytest.mark.parametrize(
    "router_init,expected", [("zero", lambda w: torch.zeros_like(w[0])), ("mean", lambda w: w.mean(0))]
)
def test_the_router_row_ablations_of_table_4(router_init, expected):
    lm = build_lm()
    extend_model(MoExtendModel(lm), {0: [1]}, ExtendOptions(layers="all", router_init=router_init))
    block = lm.model.layers[0].mlp
    assert torch.equal(block.new_router.weight[0], expected(block.gate.weight))


def test_several_new_experts_per_layer_each_copy_their_own_source():
    lm = build_lm()
    extend_model(MoExtendModel(lm), {1: [3, 0]}, ExtendOptions(layers="all", experts_per_layer=2))
    block = lm.model.layers[1].mlp
    assert block.num_experts == 6
    for j, source in enumerate((3, 0)):
        assert torch.equal(block.new_experts.down_proj[j], block.experts.down_proj[source])


# ------------------------------------------------------------------------------------------------- the wrapper
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_wrapper_keeps_every_pretrained_parameter_under_its_name_and_storage(family):
    lm = build_lm(family)
    before = dict(lm.named_parameters())
    extend_model(MoExtendModel(lm), {moe_layer_indices(lm)[0]: [0]}, ExtendOptions(layers="all"))
    after = dict(lm.named_parameters())
    for name, param in before.items():
        assert after[name] is param, name
    added = sorted(set(after) - set(before))
    assert added and all(".mlp.new_" in n or ".mlp.calibration." in n for n in added)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_removing_the_extension_puts_the_original_transformers_block_back(family):
    lm = build_lm(family)
    layer = moe_layer_indices(lm)[0]
    original = lm.model.layers[layer].mlp
    x = hidden_states()
    with torch.no_grad():
        expected = original(x)
    extend_model(MoExtendModel(lm), {layer: [1]}, ExtendOptions(layers="all"))
    remove_extension(lm)
    assert lm.model.layers[layer].mlp is original
    with torch.no_grad():
        assert torch.equal(original(x), expected)


@pytest.mark.parametrize("family,renormalises", [("mixtral", True), ("qwen2_moe", False), ("olmoe", False)])
def test_tokens_that_do_not_pick_the_new_expert_keep_the_base_output_only_under_renormalisation(family, renormalises):
    lm = build_lm(family)
    layer = moe_layer_indices(lm)[0]
    original = lm.model.layers[layer].mlp
    extend_model(MoExtendModel(lm), {layer: [0]}, ExtendOptions(layers="all", router_init="zero"))
    block = lm.model.layers[layer].mlp
    x = hidden_states(tokens=200)
    with torch.no_grad():
        base = original(x).reshape(-1, HIDDEN)
        ours = block(x).reshape(-1, HIDDEN)
        _, index = route(block.router_logits(x.reshape(-1, HIDDEN)), block.top_k, None, True, None)
    untouched = ~(index == 4).any(-1)
    assert 0 < int(untouched.sum()) < untouched.numel()
    same = torch.allclose(ours[untouched], base[untouched], atol=1e-6)
    assert same is renormalises


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradients_reach_only_the_new_tensors_and_the_trainable_count_is_exact(family):
    lm = build_lm(family)
    model = MoExtendModel(lm)
    layers = moe_layer_indices(lm)[:2]
    extend_model(model, {layer: [0] for layer in layers}, ExtendOptions(layers="all"))
    trainable = set_trainable(model, "finetune")
    ids = torch.randint(4, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids).logits.float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        if name in trainable:
            continue
        assert param.grad is None, name
    block = lm.model.layers[layers[0]].mlp
    d, f = HIDDEN, block.experts.down_proj.shape[-1]
    per_layer = (3 * d * f) + d + 2 * 5 * 16  # expert (gate, up, down) + router row + 5-wide calibration MLP
    assert sum(p.numel() for p in trainable.values()) == 2 * per_layer == expected_new_parameter_count(model)


def test_a_dense_layer_of_qwen2_moe_cannot_be_extended():
    lm = build_lm("qwen2_moe")
    assert moe_layer_indices(lm) == [0, 2, 3]
    with pytest.raises(LayoutError, match="layer 1 is a dense MLP") as info:
        extend_model(MoExtendModel(lm), {1: [0]}, ExtendOptions(layers=(1,)))
    assert "MoE layers of this model: [0, 2, 3]" in info.value.hint


def test_a_model_that_is_not_a_known_moe_family_is_refused_by_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(LayoutError, match="model type 'llama' is not a Mixture-of-Experts family") as info:
        extend_model(MoExtendModel(lm), {0: [0]}, ExtendOptions(layers="all"))
    assert "mixtral" in info.value.hint
