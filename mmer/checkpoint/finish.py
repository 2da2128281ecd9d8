"""The last files every writer of a decoupled checkpoint (merge, add) ends with, in the order they must come.

The recipe and the model card are files of the checkpoint like any other, so they are written before the
sha256 of every file is taken; the manifest, which holds those hashes, is written last of all, so a manifest
only ever describes finished files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mmer.checkpoint.card import write_card
from mmer.checkpoint.decoupled import RECIPE_NAME
from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME, Manifest
from mmer.io.hashing import hash_tree


def finish_checkpoint(
    staging: Path, manifest: Manifest, report: Any, recipe_yaml: str, card_section: str = ""
) -> None:
    """Write the recipe, the card (with ``card_section`` after the standard text), the file hashes and the
    manifest into ``staging``; the time spent hashing goes to ``report.seconds["hash_outputs"]``.

    A writer's own record files (``add``'s history) must already be in ``staging``: the manifest covers them.
    """
    (staging / RECIPE_NAME).write_text(recipe_yaml, encoding="utf-8")
    card = write_card(staging, manifest, report, recipe_yaml)
    if card_section:
        with open(card, "a", encoding="utf-8") as f:
            f.write(card_section)
    started = time.perf_counter()
    manifest.files = hash_tree(staging, exclude={MANIFEST_NAME, MANIFEST_SHA_NAME})
    manifest.write(staging)
    report.seconds["hash_outputs"] = time.perf_counter() - started
