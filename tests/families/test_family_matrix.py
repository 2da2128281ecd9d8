"""Every multimodal family the installed transformers ships has an explicit answer, and the answer holds.

``answers.json`` pins, for each family of the image-text-to-text, multimodal-LM and speech-to-text mappings,
what a tiny model of it does under mmer: ``works`` (merged against the plain causal LM of its text config,
rebuilt, loaded back with its own class, every tensor and the text logits equal to θ_base + mᵢ∘τ* computed by
hand, every source tensor accounted for), ``refused`` (mmer's own error, pinned word for word), ``skipped``
(it cannot be built tiny offline, and why) or ``fails`` (a known failure, expected to reproduce). The README's
family table is the same list. Regenerate with ``python tests/families/family_check.py [family ...]``.

A representative subset runs by default (the matrix takes minutes on two cores); ``MMER_ALL_FAMILIES=1`` runs
every family.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from family_builders import families
from family_check import ANSWERS, RECORDED_WITH, answer

PINNED: dict[str, list[str]] = json.loads(ANSWERS.read_text())
README = Path(__file__).resolve().parents[2] / "README.md"
# The list of families that must work; each is checked by default.
REQUIRED = (
    "llava",
    "llava_next",
    "llava_onevision",
    "video_llava",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "gemma3",
    "internvl",
    "idefics3",
    "smolvlm",
    "paligemma",
    "mistral3",
    "qwen2_audio",
    "qwen2_5_omni_thinker",
    "voxtral",
)
DEFAULT = ("llava", "qwen2_vl", "gemma3", "qwen2_audio", "qwen2_5_omni_thinker", "voxtral", "blip-2", "whisper")
SELECTED = sorted(PINNED) if os.environ.get("MMER_ALL_FAMILIES") == "1" else list(DEFAULT)


def test_every_family_in_the_mappings_has_an_answer():
    """Strict for the transformers the answers were recorded with; a newer release that adds families is
    reported (skipped, naming them and the command that answers them) rather than failing every install."""
    import transformers

    assert {a for a, _ in PINNED.values()} <= {"works", "refused", "skipped", "fails"}
    new = sorted(set(families()) - set(PINNED))
    recorded = RECORDED_WITH.read_text().strip()
    if new and transformers.__version__ != recorded:
        pytest.skip(
            f"answers were recorded with transformers {recorded}; {transformers.__version__} adds {', '.join(new)}: "
            f"run python tests/families/family_check.py {' '.join(new)}"
        )
    assert new == [], "new families: run python tests/families/family_check.py <family>"


def test_at_least_fifteen_families_work_including_every_required_one():
    works = {f for f, (a, _) in PINNED.items() if a == "works"}
    assert len(works) >= 15
    assert set(REQUIRED) - works == set()


def test_the_readme_table_is_the_pinned_answers():
    text = README.read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `") and "` | " in line:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if len(cells) == 3 and cells[1] in ("works", "refused", "skipped", "fails"):
                rows[cells[0].strip("`")] = cells[1]
    assert rows == {f: a for f, (a, _) in PINNED.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", SELECTED)
def test_the_family_does_what_its_answer_says(family, tmp_path):
    pinned = tuple(PINNED[family])
    got = answer(family, tmp_path)
    if pinned[0] == "fails" and got == pinned:
        pytest.xfail(pinned[1])
    assert got == pinned
