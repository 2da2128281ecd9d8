"""mmer: merge multimodal LLMs that share a base LLM into one decoupled checkpoint (MMER).

Public API::

    import mmer
    recipe = mmer.Recipe(base=mmer.ModelSpec("base/"), models=(mmer.ModelSpec("llava/", modality="vision"),))
    report = mmer.run_merge(recipe, "merged/")
    ckpt = mmer.load_decoupled("merged/")
    stats = mmer.inspect_masks("merged/")
"""

from mmer.add import add_models
from mmer.checkpoint.decoupled import DecoupledCheckpoint, load_decoupled
from mmer.compare import run_compare
from mmer.config import MergeOptions, ModelSpec, Recipe, load_recipe, load_spec
from mmer.errors import MmerError
from mmer.extend import load_extension_pack, run_moextend, unload_extension
from mmer.inspect import MaskStats, inspect_masks
from mmer.pipeline import MergeReport, run_merge
from mmer.plan import build_plan
from mmer.route import Router, reconstruct, reconstruct_modality
from mmer.tune import run_tune
from mmer.version import __version__

__all__ = [
    "DecoupledCheckpoint",
    "MaskStats",
    "MergeOptions",
    "MergeReport",
    "MmerError",
    "ModelSpec",
    "Recipe",
    "Router",
    "__version__",
    "add_models",
    "run_compare",
    "run_tune",
    "unload_extension",
    "build_plan",
    "inspect_masks",
    "load_decoupled",
    "load_extension_pack",
    "load_recipe",
    "load_spec",
    "reconstruct",
    "reconstruct_modality",
    "run_merge",
    "run_moextend",
]
