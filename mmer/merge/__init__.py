"""The math: pure functions on tensors. Imports torch and mmer.errors only."""

from mmer.merge import subspace  # noqa: F401,I001  (registers TSV-M, Iso-C, Iso-CTS and WUDI beside the others)
from mmer.merge.masks import MASKS, MaskRule, mmer_mask, rebuild_weight, register_mask
from mmer.merge.methods import METHODS, MergeMethod, disjoint_mean, elect_sign, register_method, ties
from mmer.merge.task_vectors import check_finite, task_vector
from mmer.merge.trim import GlobalThreshold, rank_to_threshold, tensor_threshold, trim

__all__ = [
    "MASKS",
    "METHODS",
    "GlobalThreshold",
    "MaskRule",
    "MergeMethod",
    "check_finite",
    "disjoint_mean",
    "elect_sign",
    "mmer_mask",
    "rank_to_threshold",
    "rebuild_weight",
    "register_mask",
    "register_method",
    "task_vector",
    "tensor_threshold",
    "ties",
    "trim",
]
