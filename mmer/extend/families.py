"""Which MoE layouts MoExtend can extend, and where their routers and experts live.

transformers 5.x lays Mixtral, Qwen2-MoE and OLMoE out the same way: the decoder layer's ``mlp`` is a sparse
block with a ``gate`` router (``weight`` [E, D], returning raw logits first) and an ``experts`` module holding
fused 3-D tensors ``gate_up_proj`` [E, 2F, D] (gate half first) and ``down_proj`` [E, D, F]. They differ in
three details, recorded per family here: whether the top-k weights are renormalised, the dtype the weights
are handed to the experts in, and Qwen2-MoE's always-on shared expert. Everything is checked on the live
module (shapes, and that the router's first output is its logits) rather than trusted from a version number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mmer.errors import ConfigError, LayoutError


@dataclass(frozen=True)
class MoeFamily:
    """One transformers MoE family.

    Attributes:
        model_type: the ``config.model_type`` it is recognised by.
        block_class: class name of its sparse MoE block.
        renormalises: whether the kept top-k weights are divided by their sum (Mixtral always; Qwen2-MoE and
            OLMoE when ``norm_topk_prob``), read from the live block.
        weights_in_logits_dtype: the router hands its top-k weights to the experts in the logits' dtype
            (Qwen2-MoE, OLMoE) rather than float32 (Mixtral).
        shared_expert: the block adds a sigmoid-gated shared expert (Qwen2-MoE), kept frozen and untouched.
        jitter: the block multiplies its input by uniform noise in training when ``jitter_noise`` > 0 (Mixtral).
    """

    model_type: str
    block_class: str
    renormalises: Callable[[nn.Module], bool]
    weights_in_logits_dtype: bool
    shared_expert: bool
    jitter: bool


FAMILIES: dict[str, MoeFamily] = {
    f.model_type: f
    for f in (
        MoeFamily("mixtral", "MixtralSparseMoeBlock", lambda block: True, False, False, True),
        MoeFamily(
            "qwen2_moe", "Qwen2MoeSparseMoeBlock", lambda block: bool(block.gate.norm_topk_prob), True, True, False
        ),
        MoeFamily("olmoe", "OlmoeSparseMoeBlock", lambda block: bool(block.gate.norm_topk_prob), True, False, False),
    )
}


def family_of(model: nn.Module) -> MoeFamily:
    """The family of a transformers causal LM, from its config; refuses anything else by name."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise LayoutError(
            f"model type {model_type!r} is not a Mixture-of-Experts family MoExtend knows",
            key="model_type",
            hint=f"MoExtend extends {', '.join(sorted(FAMILIES))} models as laid out by transformers 5.x",
        )
    return family


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``*ForCausalLM`` (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise LayoutError(
            f"{type(model).__name__} has no decoder layers at model.layers",
            hint="pass the causal LM itself (e.g. MixtralForCausalLM), not its inner model or a wrapper",
        )
    return layers


def is_moe_block(block: nn.Module, family: MoeFamily) -> bool:
    """A sparse MoE block of ``family`` (Qwen2-MoE's dense ``mlp_only_layers`` are not)."""
    from mmer.extend.block import ExtendedMoeBlock

    return type(block).__name__ == family.block_class or isinstance(block, ExtendedMoeBlock)


def moe_layer_indices(model: nn.Module) -> list[int]:
    """Indices of the decoder layers whose ``mlp`` is a sparse MoE block."""
    family = family_of(model)
    return [i for i, layer in enumerate(decoder_layers(model)) if is_moe_block(layer.mlp, family)]


def moe_block(model: nn.Module, layer: int) -> nn.Module:
    """The MoE block of decoder layer ``layer``, checked."""
    family = family_of(model)
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ConfigError(  # the layers are the user's choice (--layers, the recipe's extend.layers): a usage error
            f"layer {layer} does not exist: the model has {len(layers)} decoder layers (0-{len(layers) - 1})",
            key="layers",
            hint="layer indices are 0-based",
        )
    block = layers[layer].mlp
    if not is_moe_block(block, family):
        raise LayoutError(
            f"layer {layer} is a dense MLP ({type(block).__name__}), not a sparse MoE block",
            key="layers",
            hint=f"MoE layers of this model: {moe_layer_indices(model)}",
        )
    return block


@dataclass(frozen=True)
class BlockShape:
    """The sizes of one MoE block, read from its tensors."""

    num_experts: int
    hidden: int
    intermediate: int
    top_k: int


def block_shape(block: nn.Module, layer: int) -> BlockShape:
    """Read and check the router and expert tensors' shapes; refuse a layout that is not the fused one."""
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    weight = getattr(gate, "weight", None)
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(weight, torch.Tensor) and isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        raise LayoutError(
            f"layer {layer}: the MoE block has no gate.weight / experts.gate_up_proj / experts.down_proj",
            key=f"model.layers.{layer}.mlp",
            hint="MoExtend needs transformers >= 5 (fused 3-D expert tensors); upgrade transformers",
        )
    num_experts, hidden = weight.shape
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != num_experts or gate_up.shape[2] != hidden:
        raise LayoutError(
            f"layer {layer}: experts.gate_up_proj has shape {list(gate_up.shape)}, "
            f"expected [{num_experts}, 2F, {hidden}]",
            tensor=f"model.layers.{layer}.mlp.experts.gate_up_proj",
            hint="the expert tensors are not in transformers 5's fused layout",
        )
    intermediate = gate_up.shape[1] // 2
    if tuple(down.shape) != (num_experts, hidden, intermediate):
        raise LayoutError(
            f"layer {layer}: experts.down_proj has shape {list(down.shape)}, expected "
            f"[{num_experts}, {hidden}, {intermediate}]",
            tensor=f"model.layers.{layer}.mlp.experts.down_proj",
            hint="the expert tensors are not in transformers 5's fused layout",
        )
    return BlockShape(num_experts, hidden, intermediate, int(gate.top_k))


def check_router_returns_logits(gate: nn.Module, layer: int) -> None:
    """The router's first output must be its raw logits (some revisions returned the softmax there)."""
    weight = gate.weight
    probe = torch.linspace(-1.0, 1.0, weight.shape[1], dtype=weight.dtype, device=weight.device).unsqueeze(0)
    with torch.no_grad():
        first = gate(probe)[0]
        expected = F.linear(probe, weight)
    if first.shape != expected.shape or not torch.equal(first, expected):
        raise LayoutError(
            f"layer {layer}: the router's first output is not its logits W·x",
            key=f"model.layers.{layer}.mlp.gate",
            hint="this transformers version's router differs from the one MoExtend was written for; report it",
        )
