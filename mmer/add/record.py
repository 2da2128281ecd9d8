"""The record ``mmer add`` leaves in the checkpoint it writes: its recipe, the model card's section, the history.

Which source each earlier modality used (its original model or its stand-in) is written three ways: in
``mmer_add.json`` (a history of every add, hashed with the rest in the manifest), as a comment at the top of
``mmer_recipe.yaml`` (whose models are the originals, so ``mmer merge --recipe`` on it gives the exact re-merge),
and in the model card.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mmer.add.report import STAND_IN, AddReport
from mmer.checkpoint.decoupled import DecoupledCheckpoint
from mmer.checkpoint.manifest import MANIFEST_SHA_NAME
from mmer.checkpoint.sources import base_spec
from mmer.config import Recipe
from mmer.errors import MmerError
from mmer.io.jsonfile import read_json_file
from mmer.pipeline import resolved_recipe
from mmer.plan import MergePlan
from mmer.version import __version__

HISTORY_NAME = "mmer_add.json"
HISTORY_FORMAT = "mmer-add/1"


def full_recipe(ckpt: DecoupledCheckpoint, plan: MergePlan, report: AddReport) -> Recipe:
    """All n+1 models as ``mmer merge`` would pin them; old modalities name their originals (stand-in or not)."""
    resolved = resolved_recipe(plan)
    models = tuple(
        replace(report.old[spec.modality].spec, lambda_=spec.lambda_)
        if spec.modality in report.old and report.old[spec.modality].source == STAND_IN
        else spec
        for spec in resolved.models
    )
    return Recipe(base_spec(ckpt), models, resolved.options)


def recipe_header(ckpt: DecoupledCheckpoint, report: AddReport) -> str:
    added = ", ".join(report.added)
    lines = [f"# Made by `mmer add` {__version__}: {added} added to {ckpt.path}."]
    stand_ins = [n for n, o in report.old.items() if o.source == STAND_IN]
    if stand_ins:
        lines += [
            f"# Stand-ins: the task vectors of {', '.join(stand_ins)} were their reconstructions from that",
            "# checkpoint (θ̂ᵢ − θ_base), not their original models. The models below are the originals: `mmer merge",
            "# --recipe` on this file gives the exact re-merge, close to but not equal to this checkpoint.",
        ]
    else:
        lines.append(
            "# Every model was read from its original: `mmer merge --recipe` on this file repeats it exactly."
        )
    return "\n".join(lines) + "\n"


def card_section(ckpt: DecoupledCheckpoint, report: AddReport) -> str:
    rows = "\n".join(f"| {name} | {info['kind']} | `{info['model']}` |" for name, info in report.added.items())
    old = "\n".join(
        f"| {name} | {o.source} | {o.density_before:.2%} → {o.density_after:.2%} |"
        for name, o in report.old.items()
        if o.density_after is not None
    )
    return f"""
## Added with `mmer add`

Models added to `{ckpt.path.name}` by re-merging every task vector into a new τ* with one mask each (MMER §3.2.3):

| modality | added as | model |
|---|---|---|
{rows}

| earlier modality | task vector from | mask density before → after |
|---|---|---|
{old}

A *stand-in* is the modality's reconstruction θ_base + mᵢ∘τ* from the earlier checkpoint, used where its original
model was not at hand. The full history is in `{HISTORY_NAME}`.
"""


def add_history(ckpt: DecoupledCheckpoint, report: AddReport) -> dict[str, Any]:
    previous: list[Any] = []
    path = ckpt.path / HISTORY_NAME
    if path.is_file():
        try:
            data = read_json_file(path, what="add history")
            previous = list(data.get("history", [])) if isinstance(data, dict) else []
        except MmerError:  # a damaged history is started afresh, not fatal: the manifest is the record
            previous = []
    sha_file = ckpt.path / MANIFEST_SHA_NAME
    entry = {
        "operation": "add",
        "mmer_version": __version__,
        "from": {
            "path": str(ckpt.path.resolve()),
            "manifest_sha256": sha_file.read_text(encoding="utf-8").strip() if sha_file.is_file() else None,
            "modalities": list(ckpt.modalities),
        },
        "added": report.added,
        "old": {
            name: {
                "source": o.source,
                "reason": o.reason,
                "density_before": o.density_before,
                "density_after": o.density_after,
                "mask_bits_changed": o.mask_bits_changed,
            }
            for name, o in report.old.items()
        },
        "exact": report.exact,
    }
    return {"format": HISTORY_FORMAT, "history": [*previous, entry]}
