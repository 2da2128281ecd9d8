"""MoExtend: extend a pretrained Mixture-of-Experts LLM with new experts for a new modality or task.

Zhong et al., ACL 2024 SRW (arXiv 2408.03511); read beside docs/moextend.md. Three stages on transformers' own
Mixtral, Qwen2-MoE and OLMoE models, every pretrained tensor frozen throughout:

(a) :func:`align` trains a projector from a frozen encoder's features into the LLM;
(b) :func:`run_probe` tunes only the routers briefly and scores each layer by how much its routing moves
    (d_j); the top half of the layers is chosen;
(c) :func:`finetune` adds one expert per chosen layer (a copy of its most-used expert, with a copied router
    row and an identity-initialised calibration) and trains only those.

The result is an extension pack (:func:`write_pack`); :func:`load_extension_pack` puts it on the untouched
base and gives back a ready model computing exactly what the trained one did::

    from mmer.extend import load_data, run_moextend, load_extension_pack
    result = run_moextend(base_lm, load_data("train.safetensors"), "pack/")
    model = load_extension_pack(base_lm_again, "pack/")
    logits = model(input_ids, attention_mask, features).logits   # a transformers ModelOutput
"""

from mmer.extend.block import ExtendedMoeBlock, route
from mmer.extend.calibration import Calibration
from mmer.extend.data import ExtendData, ExtendDataset, load_data, save_data
from mmer.extend.datasets import ShardedData, TorchData, save_shards
from mmer.extend.extension import (
    expected_new_parameter_count,
    extend_model,
    new_parameters,
    remove_extension,
    set_trainable,
)
from mmer.extend.families import FAMILIES, family_of, moe_layer_indices
from mmer.extend.losses import lm_loss, load_balancing_loss
from mmer.extend.modality import MoExtendModel, Projector
from mmer.extend.options import (
    ExtendOptions,
    MoExtendRecipe,
    ProbeOptions,
    ProjectorOptions,
    TrainOptions,
    load_moextend_recipe,
    recipe_from_dict,
)
from mmer.extend.pack import (
    PACK_MANIFEST,
    base_model_hash,
    is_extension_pack,
    load_base,
    load_extension_pack,
    read_pack_manifest,
    unload_extension,
    write_pack,
)
from mmer.extend.probe import ProbeResult, run_probe
from mmer.extend.routing import RoutingCounts, RoutingTap, collect_routing_counts, count_top_k
from mmer.extend.selection import layer_scores, select_layers, source_experts
from mmer.extend.stages import ExtensionPlan, MoExtendResult, align, finetune, plan_extension, run_moextend
from mmer.extend.training import TrainReport, evaluate, train

__all__ = [
    "FAMILIES",
    "PACK_MANIFEST",
    "Calibration",
    "ExtendData",
    "ExtendDataset",
    "ExtendOptions",
    "ExtendedMoeBlock",
    "ExtensionPlan",
    "MoExtendModel",
    "MoExtendRecipe",
    "MoExtendResult",
    "ProbeOptions",
    "ProbeResult",
    "Projector",
    "ProjectorOptions",
    "RoutingCounts",
    "RoutingTap",
    "ShardedData",
    "TorchData",
    "TrainOptions",
    "TrainReport",
    "align",
    "base_model_hash",
    "collect_routing_counts",
    "count_top_k",
    "evaluate",
    "expected_new_parameter_count",
    "extend_model",
    "family_of",
    "finetune",
    "is_extension_pack",
    "layer_scores",
    "lm_loss",
    "load_balancing_loss",
    "load_base",
    "load_data",
    "load_extension_pack",
    "load_moextend_recipe",
    "moe_layer_indices",
    "new_parameters",
    "plan_extension",
    "read_pack_manifest",
    "recipe_from_dict",
    "remove_extension",
    "route",
    "run_moextend",
    "run_probe",
    "save_data",
    "save_shards",
    "select_layers",
    "set_trainable",
    "source_experts",
    "train",
    "unload_extension",
    "write_pack",
]
