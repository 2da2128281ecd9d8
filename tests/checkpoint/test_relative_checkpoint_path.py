"""A checkpoint given by a path relative to the working directory opens like one given absolutely: the manifest
and its sidecar are looked up inside the checkpoint once, not under the relative path joined to itself."""

from __future__ import annotations

from test_pipeline import recipe_for

import mmer
from mmer.checkpoint.decoupled import load_decoupled


def test_a_checkpoint_named_by_a_relative_path_opens(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "runs" / "out"
    mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}), out)
    monkeypatch.chdir(tmp_path)
    relative = load_decoupled("runs/out")
    absolute = load_decoupled(out)
    assert relative.modalities == absolute.modalities
    assert [s.name for s in relative.slots] == [s.name for s in absolute.slots]
