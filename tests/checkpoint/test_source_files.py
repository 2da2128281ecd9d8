"""mmer.checkpoint.decoupled.check_source_files: the one rule that compares a source model's weight files with
the sha256 recorded at the merge (a reference base, ``mmer verify``, ``add`` and ``tune`` all call it)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mmer.checkpoint.decoupled import check_source_files
from mmer.checkpoint.manifest import SourceRecord
from mmer.io.hashing import file_sha256

WEIGHTS = "model.safetensors"


def _model(directory: Path) -> Path:
    directory.mkdir()
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(directory / WEIGHTS))
    return directory


def _record(files: dict[str, str | None]) -> SourceRecord:
    return SourceRecord("local", None, None, "llama", ["F32"], None, files)


def test_the_files_merged_pass_with_their_hashes(tmp_path):
    model = _model(tmp_path / "m")
    digest = file_sha256(model / WEIGHTS)
    for every_file in (False, True):
        checked = check_source_files(_record({WEIGHTS: digest}), model, every_file=every_file)
        assert checked.problems == [] and checked.recorded and checked.hashes == {WEIGHTS: digest}


def test_a_changed_file_is_named_with_both_hashes(tmp_path):
    model = _model(tmp_path / "m")
    checked = check_source_files(_record({WEIGHTS: "0" * 64}), model)
    assert len(checked.problems) == 1
    assert str(model / WEIGHTS) in checked.problems[0] and "000000000000" in checked.problems[0]


def test_a_missing_recorded_file_is_a_difference(tmp_path):
    model = _model(tmp_path / "m")
    checked = check_source_files(_record({"gone.safetensors": "a" * 64}), model)
    assert len(checked.problems) == 1 and "gone.safetensors: missing" in checked.problems[0]


def test_without_recorded_hashes_nothing_is_checked_and_it_says_so(tmp_path):
    model = _model(tmp_path / "m")
    checked = check_source_files(_record({WEIGHTS: None}), model, every_file=True)
    assert checked.problems == [] and not checked.recorded and checked.hashes == {WEIGHTS: None}


def test_re_merging_needs_exactly_the_files_merged(tmp_path):
    model = _model(tmp_path / "m")
    digest = file_sha256(model / WEIGHTS)
    record = _record({WEIGHTS: digest, "model-2.safetensors": digest})
    assert check_source_files(record, model).problems  # the recorded extra file is missing either way
    checked = check_source_files(record, model, every_file=True)
    assert checked.problems == ["its weight files differ from those merged (model-2.safetensors)"]
