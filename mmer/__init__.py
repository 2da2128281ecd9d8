"""mmer: merge multimodal LLMs that share a base LLM into one decoupled checkpoint (MMER).

Public API::

    import mmer
    recipe = mmer.Recipe(base=mmer.ModelSpec("base/"), models=(mmer.ModelSpec("llava/", modality="vision"),))
    report = mmer.merge(recipe, "merged/")
    ckpt = mmer.load_decoupled("merged/")
    stats = mmer.inspect_masks("merged/")
"""

__version__ = "0.1.0"

from mmer.checkpoint.decoupled import DecoupledCheckpoint, load_decoupled  # noqa: E402
from mmer.config import MergeOptions, ModelSpec, Recipe, load_recipe, load_spec  # noqa: E402
from mmer.errors import MmerError  # noqa: E402
from mmer.inspect import MaskStats, inspect_masks  # noqa: E402
from mmer.pipeline import MergeReport, run_merge  # noqa: E402
from mmer.plan import build_plan  # noqa: E402

merge = run_merge

__all__ = [
    "DecoupledCheckpoint",
    "MaskStats",
    "MergeOptions",
    "MergeReport",
    "MmerError",
    "ModelSpec",
    "Recipe",
    "__version__",
    "build_plan",
    "inspect_masks",
    "load_decoupled",
    "load_recipe",
    "load_spec",
    "merge",
    "run_merge",
]
