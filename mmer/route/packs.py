"""MoExtend extension packs served by the modality router beside the MMER modalities (issue #7).

A pack (``mmer.extend.pack``) adds experts to an MoE LLM and is only correct on the exact base it was trained
on. A decoupled checkpoint of MoE fine-tunes holds that base: θ_base. So the router serves a pack with no copy
of the LLM: each pack gets its own causal LM of the base's class whose base parameters are views of the
router's live weights (like every modality's model), extended once, when the pack is added, by
:func:`mmer.extend.load_extension_pack`. Routing to a pack puts the live weights in the ``BASE`` state, θ_base
written from the router's stored θ_base, never by subtracting a modality's delta; routing back to a modality
rebuilds θ_base + mᵢ∘τ*. The wrapper blocks live only in the pack's own LM, so nothing has to be unloaded
on a switch and the modalities' models never see them.

Checked when a pack is added, against the router's base (refused with both files named):

* the checkpoint stores θ_base (a single merged model, mask rule ``none``, stores θ* instead);
* the base is a Mixture-of-Experts family MoExtend knows, of the pack's model type;
* the pack's recorded base (layers, width, experts per layer; with ``check_base_model="full"``, the default,
  the sha256 of every base tensor, dtype included) is this base.

Expansion mode (per-token weights, §4a) does not take packs: a pack changes the expert set and router width of
its layers, which has no per-token mixing with MMER's masked weights in either paper. Route whole prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmer.checkpoint.decoupled import DecoupledCheckpoint
from mmer.errors import IncompatibleBaseError, LayoutError
from mmer.route.models import (
    attach_generation_config,
    bind_model,
    causal_lm_class,
    empty_model,
    llm_layout,
    load_config,
)
from mmer.route.weights import DeviceWeights, base_config_dir


@dataclass
class PackModality:
    """One extension pack as the router holds it: its extended LM (base views + new tensors) and manifest."""

    name: str
    pack_dir: Path
    manifest: dict[str, Any]
    model: Any  # mmer.extend.MoExtendModel

    def nbytes(self) -> int:
        """Bytes of the pack's own tensors (new experts, router rows, calibration, projector)."""
        from mmer.extend.extension import is_new_parameter

        lm = sum(p.nbytes for n, p in self.model.lm.named_parameters() if is_new_parameter(n))
        projector = self.model.projector
        return lm + (0 if projector is None else sum(p.nbytes for p in projector.parameters()))


def _refusal(
    ckpt: DecoupledCheckpoint, pack_dir: Path, why: str, hint: str, key: str | None = None
) -> IncompatibleBaseError:
    from mmer.extend.pack import PACK_MANIFEST

    return IncompatibleBaseError(
        f"{pack_dir / PACK_MANIFEST}: cannot run on the base of {ckpt.path}: {why}",
        file=str(pack_dir / PACK_MANIFEST),
        key=key,
        hint=hint,
    )


def check_pack_against_checkpoint(ckpt: DecoupledCheckpoint, manifest: dict[str, Any], pack_dir: Path) -> None:
    """The checks that need no model: the checkpoint holds θ_base, of the pack's MoE model type."""
    from mmer.extend.families import FAMILIES

    pack_base = manifest["base"]
    trained_on = pack_base.get("name_or_path") or f"a {pack_base['model_type']} model"
    if ckpt.is_single_model:
        raise _refusal(
            ckpt,
            pack_dir,
            "the checkpoint is a single merged model (mask rule none): it stores θ* = θ_base + τ*, not θ_base",
            "merge with a mask rule (the default, --mask mmer) so the checkpoint keeps θ_base, or apply the pack "
            "to its base directly with mmer.extend.load_extension_pack",
            key="mask",
        )
    config_file = base_config_dir(ckpt) / "config.json"
    model_type = getattr(load_config(config_file.parent), "model_type", None)
    if model_type not in FAMILIES:
        raise _refusal(
            ckpt,
            pack_dir,
            f"its base ({config_file}) is a {model_type} model, not a Mixture-of-Experts family, and the pack "
            f"extends {trained_on}",
            f"open the router on a checkpoint merged from the pack's base ({trained_on}); MoExtend extends "
            f"{', '.join(sorted(FAMILIES))} models",
            key="model_type",
        )
    if model_type != pack_base["model_type"]:
        raise _refusal(
            ckpt,
            pack_dir,
            f"its base ({config_file}) is a {model_type} model and the pack extends {trained_on}",
            f"open the router on a checkpoint merged from the pack's base ({trained_on})",
            key="model_type",
        )


def base_lm(ckpt: DecoupledCheckpoint, weights: DeviceWeights, views: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base's causal LM with its parameters bound to ``views``, the live weights' θ_base rows (no allocation).

    ``views`` are keyed by in-memory parameter name (``Router.views(BASE)``): for a Mixture-of-Experts base
    saved per expert, the fused expert parameters whose slices the router rebuilds, so the pack's base-hash
    check reads exactly the tensors ``from_pretrained`` would give (:mod:`mmer.route.live_layout`).
    """
    directory = base_config_dir(ckpt)
    config = load_config(directory)
    lm = empty_model(causal_lm_class(config, directory), config)
    bind_model(lm, llm_layout(lm), views.get, None, weights.device, str(directory))
    attach_generation_config(lm, directory)
    return lm


def load_pack(
    ckpt: DecoupledCheckpoint,
    weights: DeviceWeights,
    views: dict[str, torch.Tensor],
    name: str,
    pack_dir: str | Path,
    check_base_model: str,
) -> PackModality:
    """Extend a fresh base LM bound to ``views`` with the pack; they must hold θ_base (the BASE state)."""
    from mmer.extend.pack import load_extension_pack, read_pack_manifest

    pack_dir = Path(pack_dir)
    manifest = read_pack_manifest(pack_dir)
    check_pack_against_checkpoint(ckpt, manifest, pack_dir)
    lm = base_lm(ckpt, weights, views)
    try:
        model = load_extension_pack(lm, pack_dir, check_base_model=check_base_model)
    except (IncompatibleBaseError, LayoutError) as err:
        trained_on = manifest["base"].get("name_or_path") or "the base it was trained on"
        raise _refusal(
            ckpt,
            pack_dir,
            err.message.removeprefix(f"{pack_dir}: "),
            f"open the router on a checkpoint merged from the pack's base ({trained_on}), in the dtype the pack "
            f"was trained in ({manifest['base'].get('dtype')}), or retrain the pack on this checkpoint's base",
            key=err.key,
        ) from None
    return PackModality(name, pack_dir, manifest, model)
