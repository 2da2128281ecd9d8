"""Stage b″: put the wrapper blocks into the chosen layers and initialise them (Eq. 7-8); freeze per stage.

For every chosen layer and every new expert j with source expert s (§2.3):

* new expert j = an exact copy of expert s's ``gate_up_proj[s]`` and ``down_proj[s]``;
* new router row j = a copy of router row s (``copy``), zeros (``zero``) or the mean of the m rows (``mean``);
* the calibration starts as the identity (see :mod:`mmer.extend.calibration`).

Copying the row gives the copy exactly its source's logit, so wherever the source was top-1 the top-2 becomes
{source, copy}: the extended model is not function-preserving at step 0 (ties go the way ``torch.topk``
breaks them). That is the paper's design, not a bug; tests must not expect the base's output there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmer.extend.block import ExtendedMoeBlock
from mmer.extend.calibration import calibration_parameter_count
from mmer.extend.families import block_shape, decoder_layers, family_of, is_moe_block, moe_block
from mmer.extend.modality import MoExtendModel, parameter_count
from mmer.extend.options import ExtendOptions


def model_dtype(lm: nn.Module) -> torch.dtype:
    return next(p for p in lm.parameters() if p.is_floating_point()).dtype


def new_params_dtype(lm: nn.Module, options: ExtendOptions) -> torch.dtype:
    return torch.float32 if options.new_params_dtype == "float32" else model_dtype(lm)


def calibration_std(lm: nn.Module, options: ExtendOptions) -> float:
    if options.calibration_init_std is not None:
        return options.calibration_init_std
    return float(getattr(lm.config, "initializer_range", 0.02))


def wrap_layers(
    lm: nn.Module, layers: Mapping[int, int], options: ExtendOptions, dtype: torch.dtype
) -> dict[int, ExtendedMoeBlock]:
    """Replace ``lm``'s MoE blocks in ``layers`` (layer → new experts) by wrappers with zeroed new tensors."""
    family = family_of(lm)
    decoder = decoder_layers(lm)
    std = calibration_std(lm, options)
    wrapped = {}
    for layer, n_new in sorted(layers.items()):
        block = moe_block(lm, layer)
        if isinstance(block, ExtendedMoeBlock):
            raise ValueError(f"layer {layer} is already extended")
        wrapper = ExtendedMoeBlock(
            block, family, layer, n_new, options.calibration, options.calibration_hidden, std, dtype
        )
        decoder[layer].mlp = wrapper
        wrapped[layer] = wrapper
    return wrapped


@torch.no_grad()
def initialise(
    blocks: Mapping[int, ExtendedMoeBlock],
    sources: Mapping[int, Sequence[int]],
    router_init: str,
    generator: torch.Generator,
) -> None:
    """Copy experts and router rows from their sources (Eq. 7-8) and reset the calibrations."""
    for layer, block in sorted(blocks.items()):
        old_rows = block.gate.weight
        for j, source in enumerate(sources[layer]):
            block.new_experts.gate_up_proj[j].copy_(block.experts.gate_up_proj[source])
            block.new_experts.down_proj[j].copy_(block.experts.down_proj[source])
            if router_init == "copy":
                block.new_router.weight[j].copy_(old_rows[source])
            elif router_init == "zero":
                block.new_router.weight[j].zero_()
            elif router_init == "mean":
                block.new_router.weight[j].copy_(old_rows.float().mean(0))
            else:
                raise ValueError(f"unknown router init {router_init!r}")
        block.calibration.reset_parameters(generator)


def extend_model(
    model: MoExtendModel,
    sources: Mapping[int, Sequence[int]],
    options: ExtendOptions,
    seed: int = 42,
) -> dict[int, ExtendedMoeBlock]:
    """Extend ``model.lm`` in place: one wrapper per layer in ``sources``, initialised from its source experts."""
    lm = model.lm
    wrapped = wrap_layers(lm, {layer: len(s) for layer, s in sources.items()}, options, new_params_dtype(lm, options))
    initialise(wrapped, sources, options.router_init, torch.Generator().manual_seed(seed))
    return wrapped


def extended_blocks(lm: nn.Module) -> dict[int, ExtendedMoeBlock]:
    return {i: layer.mlp for i, layer in enumerate(decoder_layers(lm)) if isinstance(layer.mlp, ExtendedMoeBlock)}


def remove_extension(lm: nn.Module) -> nn.Module:
    """Put the original transformers blocks back; the base's tensors were never touched, so it is the base again."""
    for i, layer in enumerate(decoder_layers(lm)):
        if isinstance(layer.mlp, ExtendedMoeBlock):
            decoder_layers(lm)[i].mlp = layer.mlp.original_block()
    return lm


NEW_MODULES = ("new_router", "new_experts", "calibration")


def is_new_parameter(name: str) -> bool:
    """Whether a parameter name of an extended LM belongs to MoExtend's new tensors (not the base)."""
    return any(f".mlp.{module}." in name for module in NEW_MODULES)


def new_parameters(model: MoExtendModel) -> dict[str, nn.Parameter]:
    """The extension's new tensors, by their names in ``model.lm``."""
    return {n: p for n, p in model.lm.named_parameters() if is_new_parameter(n)}


def base_parameters(model: MoExtendModel) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.lm.named_parameters() if not is_new_parameter(n)}


def router_parameters(model: MoExtendModel) -> dict[str, nn.Parameter]:
    """Every MoE layer's old router weight (what stage b tunes)."""
    family = family_of(model.lm)
    return {
        f"model.layers.{i}.mlp.gate.weight": layer.mlp.gate.weight
        for i, layer in enumerate(decoder_layers(model.lm))
        if is_moe_block(layer.mlp, family)
    }


def set_trainable(model: MoExtendModel, stage: str, train_projector: bool = True) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze what ``stage`` trains; returns those parameters by name.

    ``align``: the projector. ``probe``: every MoE layer's router. ``finetune``: the new experts, new router
    rows and calibrations (+ the projector when ``train_projector``). ``full``: everything (the baseline).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    trainable: dict[str, nn.Parameter] = {}
    projector = {} if model.projector is None else {f"projector.{n}": p for n, p in model.projector.named_parameters()}
    if stage == "align":
        trainable = projector
    elif stage == "probe":
        trainable = router_parameters(model)
    elif stage == "finetune":
        trainable = {f"lm.{n}": p for n, p in new_parameters(model).items()}
        if train_projector:
            trainable |= projector
    elif stage == "full":
        trainable = dict(model.named_parameters())
    else:
        raise ValueError(f"unknown stage {stage!r}")
    if stage == "probe":
        trainable = {f"lm.{n}": p for n, p in trainable.items()}
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable


def expected_new_parameter_count(model: MoExtendModel, train_projector: bool = True) -> int:
    """New experts + router rows + calibrations (+ projector): what ``finetune`` must train, from the shapes."""
    total = 0
    for layer, block in extended_blocks(model.lm).items():
        shape = block_shape(block, layer)
        n = block.num_new
        total += n * (2 * shape.intermediate * shape.hidden + shape.hidden * shape.intermediate)  # experts
        total += n * shape.hidden  # router rows
        total += calibration_parameter_count(block.calibration_form, block.num_experts, block.calibration_hidden)
    if train_projector:
        total += parameter_count(model.projector)
    return total
