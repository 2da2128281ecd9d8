"""The MoExtend miniature (examples/moextend) end to end on a few steps: every arm, every seed, the report.

Checks the experiment's design, not its numbers (a few steps learn nothing): every arm at every learning rate
and seed, the Table 3 placements on the layers they name, the text-only share of the mix, MoExtend measured
through its reloaded pack, and statistics that are those of the per-seed runs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from mmer.extend import MoExtendModel, Projector

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "moextend"


def _load_run():
    spec = importlib.util.spec_from_file_location("moextend_example_run", EXAMPLE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run():
    return _load_run()


@pytest.fixture(scope="module")
def tiny(run, tmp_path_factory):
    work = tmp_path_factory.mktemp("moextend_example")
    argv = ["--tiny", "--seeds", "0", "1", "--lrs", "1e-3", "3e-3", "--placement-lrs", "3e-3"]
    summary = run.main([*argv, "--workdir", str(work), "--results", str(work / "results")])
    return summary, work


def _digits(run, count: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:count], dtype=torch.float32)
    return images, torch.tensor(digits.target[:count])


def test_a_text_only_sample_in_the_mix_leaves_every_digit_sample_its_own_features(run):
    text = run.corpus()
    tokenizer = run.CharTokenizer(text)
    questions = run.digit_data(tokenizer, *_digits(run, 6), run.QUESTION)
    mix = run.MixedData(questions, run.text_data(tokenizer, text, 4, 0, run.MIX_TEXT_LENGTH))
    assert len(mix) == 10 and mix.feature_dim == run.FEATURE_DIM
    torch.manual_seed(0)
    projector = Projector("mlp2x_gelu", run.FEATURE_DIM, 64)
    model = MoExtendModel(run.tiny_mixtral(len(tokenizer)), projector, run.IMAGE).eval()
    index = [7, 2, 0, 9, 5, 6]  # text, digit, digit, text, digit, text
    batch = mix.fetch(index)
    assert batch["features"].shape[0] == 3  # only the digit samples carry features
    with torch.no_grad():
        mixed = model(batch["input_ids"], batch["attention_mask"], batch["features"]).logits
        digits_alone = model(questions.input_ids[[2, 0, 5]], None, questions.features[[2, 0, 5]]).logits
        text_alone = model(mix.input_ids[[7, 9, 6]]).logits
    torch.testing.assert_close(mixed[[1, 2, 4]], digits_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[[0, 3, 5]], text_alone, rtol=1e-5, atol=1e-5)


def test_the_text_share_counts_samples_and_zero_means_the_questions_alone(run):
    text = run.corpus()
    tokenizer = run.CharTokenizer(text)
    questions = run.digit_data(tokenizer, *_digits(run, 94), run.QUESTION)
    mix = run.mixed_data(questions, tokenizer, text, 0.06, 0)
    assert len(mix) - len(questions) == 6  # 6 of 100 samples are text-only
    assert int((mix.input_ids[len(questions) :] == run.IMAGE).sum()) == 0
    assert run.mixed_data(questions, tokenizer, text, 0.0, 0) is questions


@pytest.mark.slow
def test_every_arm_runs_at_every_learning_rate_and_seed_and_the_report_says_so(tiny):
    summary, work = tiny
    results = work / "results"
    assert json.loads((results / "results.json").read_text())["mode"] == "tiny"
    assert (results / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (results / "results.md").read_text()
    for name in ("MoExtend", "full fine-tuning", "all layers", "first half", "second half", "every other", "± "):
        assert name in md
    main, placements = ["MoExtend", "full fine-tuning", "MoExtend, all layers"], list(EXAMPLE_PLACEMENTS)
    expected = {(1e-3, arm, s) for arm in main for s in (0, 1)} | {
        (3e-3, arm, s) for arm in main + placements for s in (0, 1)
    }
    assert {(r["lr"], r["arm"], r["seed"]) for r in summary["runs"]} == expected
    assert summary["mix"] == {"digit samples": 1257, "text-only samples": 80}
    assert summary["steps"]["probe"] == 2 and summary["fine-tuning learning rates"] == [1e-3, 3e-3]


EXAMPLE_PLACEMENTS = {"first half": [0, 1], "second half": [2, 3], "every other": [0, 2]}


@pytest.mark.slow
def test_each_arm_extends_the_layers_it_names_and_moextend_the_probes(tiny):
    summary, _ = tiny
    total = summary["base parameters"] + summary["projector parameters"]
    half = None
    for r in summary["runs"]:
        if r["arm"] == "MoExtend":
            assert r["layers"] == summary["probes"][r["seed"]]["layers"] and len(r["layers"]) == 2
        elif r["arm"] in EXAMPLE_PLACEMENTS:
            assert r["layers"] == EXAMPLE_PLACEMENTS[r["arm"]]
        else:
            assert r["layers"] == [0, 1, 2, 3]
        if r["arm"] == "full fine-tuning":
            assert r["trainable parameters"] == total
        elif r["arm"] == "MoExtend, all layers":
            all_layers = r["trainable parameters"]
        else:  # two new experts, router rows and calibrations, plus the projector, wherever they go
            half = half or r["trainable parameters"]
            assert r["trainable parameters"] == half
    assert half - summary["projector parameters"] == (all_layers - summary["projector parameters"]) // 2


@pytest.mark.slow
def test_the_table_is_the_mean_and_spread_of_the_seeds_runs(tiny):
    summary, _ = tiny
    for row in summary["rows"].values():
        group = [r for r in summary["runs"] if r["arm"] == row["arm"] and r["lr"] == row["lr"]]
        assert len(group) == 2
        for measure in ("digit accuracy", "text loss change"):
            values = [r[measure] for r in group]
            assert row[measure]["values"] == values
            assert row[measure]["mean"] == pytest.approx(statistics.fmean(values))
            assert row[measure]["sd"] == pytest.approx(statistics.stdev(values))
    assert {"cpu", "torch threads", "cpu capability", "torch"} <= set(summary["machine"])


@pytest.mark.slow
def test_single_seed_runs_merge_into_the_table_one_run_of_all_seeds_prints(run, tiny, tmp_path):
    summary, _ = tiny
    files = []
    base = run.main(["--tiny", "--pretrain-only", "--workdir", str(tmp_path / "pretrained")])["base"]
    for seed in ("1", "0"):
        work = tmp_path / seed
        shutil.copytree(base, work / "base")  # every seed's process starts from the one pretrained base
        argv = ["--tiny", "--seeds", seed, "--lrs", "3e-3", "--placement-lrs", "3e-3"]
        run.main([*argv, "--workdir", str(work), "--results", str(work / "results")])
        files.append(str(work / "results" / "results.json"))
    merged = run.main(["--merge", *files, "--results", str(tmp_path / "merged")])
    assert merged["seeds"] == [1, 0]
    assert "the sum of 2 single-seed runs" in (tmp_path / "merged" / "results.md").read_text()

    def measured(runs):
        keep = ("arm", "lr", "seed", "layers", "trainable parameters", "digit accuracy", "text loss change")
        return sorted(tuple(str(r[k]) for k in keep) for r in runs if r["lr"] == 3e-3)

    assert measured(merged["runs"]) == measured(summary["runs"])
    with pytest.raises(SystemExit, match="seeds"):
        run.main(["--merge", files[0], files[0], "--results", str(tmp_path / "again")])
