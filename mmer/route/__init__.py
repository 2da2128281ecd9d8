"""Inference on a decoupled checkpoint: rebuild one modality, route whole models, route per token.

- :func:`reconstruct` / :func:`reconstruct_modality` write θ_base + mᵢ∘τ* back out as a standalone checkpoint
  in the source model's own layout (``mmer reconstruct``);
- :class:`Router` runs every modality's transformers model from one shared LLM on a device (retention);
- :class:`ExpansionModel` (``router.expansion()``) runs one mixed-modality sequence with per-token weights;
- MoExtend extension packs on the same MoE base are routed beside the modalities (:mod:`mmer.route.packs`).
"""

from mmer.route.expansion import ExpansionModel, MixedInput
from mmer.route.models import RoutingInputError
from mmer.route.reconstruct import ReconstructReport, reconstruct, reconstruct_modality
from mmer.route.router import Router
from mmer.route.weights import BASE, MEAN

__all__ = [
    "BASE",
    "MEAN",
    "ExpansionModel",
    "MixedInput",
    "ReconstructReport",
    "Router",
    "RoutingInputError",
    "reconstruct",
    "reconstruct_modality",
]
