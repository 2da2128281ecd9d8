"""Specifies guessed thresholds (engine.thresholds ``unverified``, engine.merge_pass): when the sample narrows every
model's window to one magnitude (a threshold of 0, or one block of tied bf16 magnitudes), the threshold pass is
skipped and the merge counts each τᵢ against that magnitude as it goes, so the merge reads the models once.

The output must be byte for byte what the exact search writes, whether the guess holds or not: a guess the counts
refute is corrected (from the counts when they locate the k-th value, else by the full search) and the merge
runs again.
"""

from __future__ import annotations

import importlib

import pytest
from test_pipeline import recipe_for
from test_thresholds import Stages, _bf16_models

import mmer
import mmer.pipeline

trim = importlib.import_module("mmer.merge.trim")
pytest.importorskip("numba")

FILES = ("base/model.safetensors", "tau_star/model.safetensors", "masks/vision.safetensors", "masks/audio.safetensors")


def _merge(tmp_path, models, k, name):
    stages = Stages()
    report = mmer.run_merge(recipe_for(tmp_path / "base", models, k=k), tmp_path / name, progress=stages)
    return stages.seen, [m.threshold for m in report.modalities]


def _exact(tmp_path, models, k, monkeypatch):
    """The same merge without guessing: the threshold pass, then the merge."""
    with monkeypatch.context() as m:
        m.setattr(mmer.pipeline, "verifies_guesses", lambda plan: False)
        return _merge(tmp_path, models, k, "exact")


def _same_files(tmp_path, name):
    for rel in FILES:
        assert (tmp_path / "exact" / rel).read_bytes() == (tmp_path / name / rel).read_bytes(), rel


def _guess(pattern: int):
    def open_window(self) -> None:
        self._samples.clear()
        self._lo = self._hi = pattern

    return open_window


def test_a_threshold_of_zero_the_sample_shows_is_confirmed_by_the_merge_alone(tmp_path, monkeypatch):
    models = _bf16_models(tmp_path, unchanged=0.6)
    exact_stages, exact = _exact(tmp_path, models, 0.8, monkeypatch)
    stages, thresholds = _merge(tmp_path, models, 0.8, "guessed")
    assert exact_stages == ["threshold", "merge"]
    assert stages == ["merge"]
    assert thresholds == exact == [0.0, 0.0]
    _same_files(tmp_path, "guessed")


def test_a_refuted_guess_is_corrected_from_the_merges_counts_and_merged_again(tmp_path, monkeypatch):
    models = _bf16_models(tmp_path, unchanged=0.6)
    _, exact = _exact(tmp_path, models, 0.8, monkeypatch)
    monkeypatch.setattr(trim.WindowedThreshold, "open_window", _guess(1))  # a denormal no entry holds
    stages, thresholds = _merge(tmp_path, models, 0.8, "guessed")
    assert stages == ["merge", "merge"]  # the counts located 0: no threshold pass
    assert thresholds == exact
    _same_files(tmp_path, "guessed")


def test_a_guess_whose_counts_miss_the_kth_value_takes_the_full_search_then_merges_again(tmp_path, monkeypatch):
    models = _bf16_models(tmp_path, unchanged=0.3)
    _, exact = _exact(tmp_path, models, 0.2, monkeypatch)
    monkeypatch.setattr(trim.WindowedThreshold, "open_window", _guess(1))
    stages, thresholds = _merge(tmp_path, models, 0.2, "guessed")
    assert stages[0] == "merge" and stages[-1] == "merge" and "threshold" in stages
    assert thresholds == exact and all(t > 0 for t in exact)
    _same_files(tmp_path, "guessed")
