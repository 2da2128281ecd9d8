"""A merge plan holds its models' files open from ``build_plan`` until it is closed, and nothing else does.

Every command that plans (merge, its dry run, compare, tune, add) closes what it opened, also when a check
refuses the inputs; a caller that shows the plan first (the CLI's memory estimate) builds it once.
"""

from __future__ import annotations

import pytest
from cli_runner import cli
from conftest import write_model
from test_pipeline import recipe_for

import mmer
import mmer.plan as plan_module
from mmer.compare import run_compare
from mmer.errors import IncompatibleBaseError
from mmer.io.reader import CheckpointReader


@pytest.fixture
def readers(monkeypatch) -> dict[str, set[int]]:
    """The ids of every CheckpointReader opened and closed while the test runs."""
    seen: dict[str, set[int]] = {"opened": set(), "closed": set()}
    init, close = CheckpointReader.__init__, CheckpointReader.close

    def opened(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen["opened"].add(id(self))

    def closed(self):
        seen["closed"].add(id(self))
        close(self)

    monkeypatch.setattr(CheckpointReader, "__init__", opened)
    monkeypatch.setattr(CheckpointReader, "close", closed)
    return seen


def _recipe(tiny_models, **options):
    return recipe_for(
        tiny_models["base_dir"], {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}, **options
    )


def test_a_dry_run_closes_every_model_it_opened(tiny_models, tmp_path, readers):
    mmer.run_merge(_recipe(tiny_models), tmp_path / "out", dry_run=True)
    assert readers["opened"] and readers["opened"] <= readers["closed"]


def test_a_merge_closes_every_model_it_opened(tiny_models, tmp_path, readers):
    mmer.run_merge(_recipe(tiny_models), tmp_path / "out")
    assert readers["opened"] and readers["opened"] <= readers["closed"]


def test_a_plan_refused_by_its_checks_closes_the_models_it_had_opened(tiny_models, tmp_path, readers):
    state = dict(tiny_models["audio"])
    del state["model.layers.1.mlp.down_proj.weight"]
    broken = write_model(tmp_path / "broken", state)
    recipe = recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"], "audio": broken})
    with pytest.raises(IncompatibleBaseError):
        mmer.build_plan(recipe)
    assert len(readers["opened"]) == 3 and readers["opened"] <= readers["closed"]


def test_a_plan_given_to_run_merge_stays_open_for_its_caller_and_closes_on_leaving_its_block(
    tiny_models, tmp_path, readers
):
    with mmer.build_plan(_recipe(tiny_models)) as plan:
        report = mmer.run_merge(plan, tmp_path / "out")
        assert not readers["opened"] & readers["closed"]
        assert plan.base.reader.get(next(iter(plan.base.reader.tensors))).numel() > 0  # still readable
    assert readers["opened"] <= readers["closed"]
    assert report.output == str(tmp_path / "out") and (tmp_path / "out" / "mmer_manifest.json").is_file()


def test_compare_closes_every_model_it_opened(tiny_models, readers):
    run_compare(_recipe(tiny_models), ["ties/mmer"])
    assert readers["opened"] and readers["opened"] <= readers["closed"]


def test_mmer_merge_opens_and_checks_the_models_once_for_estimate_and_merge(tiny_models, tmp_path, monkeypatch):
    built = []
    real = plan_module.build_plan

    def counted(recipe, **kwargs):
        built.append(recipe)
        return real(recipe, **kwargs)

    monkeypatch.setattr(plan_module, "build_plan", counted)
    monkeypatch.setattr(mmer, "build_plan", counted)
    (tmp_path / "base.yaml").write_text(f"model: {tiny_models['base_dir']}\n")
    (tmp_path / "vision.yaml").write_text(f"model: {tiny_models['vision_dir']}\nmodality: vision\n")
    result = cli("merge", tmp_path / "base.yaml", tmp_path / "vision.yaml", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert len(built) == 1
