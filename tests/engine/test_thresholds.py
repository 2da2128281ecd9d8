"""Specifies mmer/engine/thresholds.py: thresholds found while streaming, in as few reads as the data allows.

A fine-tune that left most of its entries unchanged has a global threshold of 0, and a bf16 fine-tune's
threshold sits in a block of tied magnitudes: both are found in the one counting pass (no second read), even
when the sample's window is wrong. A per-tensor trim is found slot by slot in chunks, and writes exactly what
ranking each whole tensor defines.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import base_state, write_model
from test_pipeline import recipe_for

import mmer
import mmer.runtime
from mmer.engine import read_slot
from mmer.merge.slot import merge_slot
from mmer.plan import build_plan
from mmer.progress import ProgressSink

trim = importlib.import_module("mmer.merge.trim")  # the module (mmer.merge re-exports a function `trim`)


class Stages(ProgressSink):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def start(self, stage: str, total: float, unit: str = "B") -> None:
        self.seen.append(stage)


def _bf16_models(root, unchanged: float, seed: int = 0) -> dict:
    """A bf16 base and two fine-tunes moving (1 − ``unchanged``) of their entries by whole bf16 steps."""
    base = base_state(seed, dtype=torch.bfloat16)
    write_model(root / "base", base)
    g = torch.Generator().manual_seed(seed + 1)
    models = {}
    for label in ("vision", "audio"):
        state = {}
        for name, t in base.items():
            steps = torch.randint(-3, 4, t.shape, generator=g) * (torch.rand(t.shape, generator=g) >= unchanged)
            moved = t.view(torch.int16) + steps.to(torch.int16)  # neighbouring bf16 patterns: quantised moves
            state[name] = moved.view(torch.bfloat16)
        models[label] = write_model(root / label, state)
    return models


def _wrong_window(self) -> None:
    self._samples.clear()
    self._lo, self._hi = 1, 3  # denormal magnitudes only: nothing the data holds


def test_a_threshold_of_zero_is_found_in_the_counting_pass_even_when_the_sample_misses(tmp_path, monkeypatch):
    models = _bf16_models(tmp_path, unchanged=0.6)
    right = Stages()
    mmer.run_merge(recipe_for(tmp_path / "base", models, k=0.8), tmp_path / "right", progress=right)
    monkeypatch.setattr(trim.WindowedThreshold, "open_window", _wrong_window)
    wrong = Stages()
    report = mmer.run_merge(recipe_for(tmp_path / "base", models, k=0.8), tmp_path / "wrong", progress=wrong)
    assert right.seen == ["merge"]  # the sample pinned 0 and the merge's own counts confirmed it
    assert wrong.seen == ["threshold", "merge"]
    assert any("threshold is 0" in w for w in report.warnings)
    for rel in ("tau_star/model.safetensors", "masks/vision.safetensors", "masks/audio.safetensors"):
        assert (tmp_path / "right" / rel).read_bytes() == (tmp_path / "wrong" / rel).read_bytes()


def test_a_missed_window_needs_one_histogram_pass_when_the_threshold_is_a_tied_bf16_value(tmp_path, monkeypatch):
    models = _bf16_models(tmp_path, unchanged=0.3)
    right = Stages()
    mmer.run_merge(recipe_for(tmp_path / "base", models, k=0.2), tmp_path / "right", progress=right)
    monkeypatch.setattr(trim.WindowedThreshold, "open_window", _wrong_window)
    wrong = Stages()
    mmer.run_merge(recipe_for(tmp_path / "base", models, k=0.2), tmp_path / "wrong", progress=wrong)
    assert right.seen == ["merge"]  # the sample pinned the tie block and the merge's own counts confirmed it
    assert wrong.seen == ["threshold", "threshold pass 1/2", "merge"]  # no second histogram pass
    for rel in ("tau_star/model.safetensors", "masks/vision.safetensors", "masks/audio.safetensors"):
        assert (tmp_path / "right" / rel).read_bytes() == (tmp_path / "wrong" / rel).read_bytes()


@pytest.mark.parametrize("window", ["sampled", "missed"])
@pytest.mark.parametrize("k", [0.2, 0.5, 0.8])
def test_a_per_tensor_trim_found_in_chunks_writes_what_ranking_each_whole_tensor_defines(
    tmp_path, monkeypatch, window, k
):
    models = _bf16_models(tmp_path, unchanged=0.4)
    monkeypatch.setattr(mmer.runtime, "CPU_CHUNK", 64)  # every tensor spans several chunks
    if window == "missed":
        monkeypatch.setattr(trim.WindowedThreshold, "open_window", _wrong_window)
    recipe = recipe_for(tmp_path / "base", models, k=k, trim_scope="per-tensor")
    stages = Stages()
    mmer.run_merge(recipe, tmp_path / "out", progress=stages)
    assert stages.seen == ["merge"]  # each tensor's threshold is found as its slot is merged: one read
    with build_plan(recipe) as plan, mmer.load_decoupled(tmp_path / "out") as ckpt:
        assert not plan.variant.elementwise  # the definition ranks whole tensors
        for slot in plan.merged_slots:
            _, raw = read_slot(plan, slot.name, torch.device("cpu"))
            expected = merge_slot(raw, plan.variant, slot.name, slot.dtype)
            assert torch.equal(ckpt.tau_star(slot.name).view(torch.int16), expected.stored.view(torch.int16))
            for label, mask in zip(("vision", "audio"), expected.masks, strict=True):
                assert torch.equal(ckpt.mask(label, slot.name), mask), (label, slot.name)
