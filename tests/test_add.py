"""`mmer add`: with the originals it is the from-scratch merge of all n+1 models, bit for bit; without them it is
the merge of the old modalities' reconstructions, bit for bit; either way it records what it did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from cli_runner import cli
from conftest import component_state, finetune_state, write_model
from test_pipeline import recipe_for

import mmer
from mmer.add import add_models
from mmer.add.gap import measure_gap
from mmer.add.record import HISTORY_NAME
from mmer.add.report import AddError
from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME
from mmer.config import load_recipe
from mmer.errors import ConfigError, IncompatibleBaseError, OutputExistsError
from mmer.verify import verify

PROVENANCE = {"README.md", "mmer_recipe.yaml", HISTORY_NAME}


# ---------------------------------------------------------------------------------------------------- helpers


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tensors_equal(a: Path, b: Path, subdirs=("tau_star", "masks")) -> None:
    fa, fb = files_of(a), files_of(b)
    names = sorted(n for n in fa if n.split("/")[0] in subdirs)
    assert names and names == sorted(n for n in fb if n.split("/")[0] in subdirs)
    for name in names:
        assert fa[name] == fb[name], name


def spec_file(directory: Path, model: Path, modality: str, **extra: Any) -> Path:
    path = directory / f"{modality}.yaml"
    path.write_text(yaml.safe_dump({"model": str(model), "modality": modality, **extra}), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def add_setup(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """merged/ (vision + audio, input hashes recorded), a new vision task and a new modality, and the exact add."""
    root = tmp_path_factory.mktemp("add")
    g = torch.Generator().manual_seed(5)
    task = {  # the vision MLLM fine-tuned further: its LLM moves again, its components stay
        n: t + torch.randn(t.shape, generator=g) * 0.02 * (torch.rand(t.shape, generator=g) < 0.25)
        for n, t in tiny_models["vision"].items()
    }
    task_dir = write_model(root / "vision_task", task, "hf_legacy", tiny_models["vision_components"])
    video_dir = write_model(
        root / "video",
        finetune_state(tiny_models["base"], seed=4, density=0.5),
        "hf_legacy",
        component_state(13, prefix="video_tower."),
    )
    old = {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    merged = root / "merged"
    mmer.run_merge(recipe_for(tiny_models["base_dir"], old, hash_inputs=True), merged)
    specs = root / "specs"
    specs.mkdir()
    task_spec = spec_file(specs, task_dir, "vision_task")
    exact = root / "exact"
    report = add_models(merged, [task_spec], exact)
    return SimpleNamespace(
        root=root,
        base_dir=tiny_models["base_dir"],
        old=old,
        merged=merged,
        task_dir=task_dir,
        video_dir=video_dir,
        task_spec=task_spec,
        exact=exact,
        exact_report=report,
    )


@pytest.fixture(scope="module")
def standin(add_setup) -> Path:
    out = add_setup.root / "standin"
    add_models(add_setup.merged, [add_setup.task_spec], out, mode="standin")
    return out


# -------------------------------------------------------------------------------------------------- exactness
def test_with_the_originals_the_add_equals_a_from_scratch_merge_of_all_models_bit_for_bit(add_setup, tmp_path):
    scratch = tmp_path / "scratch"
    models = {**add_setup.old, "vision_task": add_setup.task_dir}
    mmer.run_merge(recipe_for(add_setup.base_dir, models, hash_inputs=True), scratch)

    report = add_setup.exact_report
    assert report.exact and [o.source for o in report.old.values()] == ["original", "original"]
    ours, theirs = files_of(add_setup.exact), files_of(scratch)
    assert set(ours) == set(theirs) | {HISTORY_NAME}
    for name in theirs:
        if name not in PROVENANCE | {MANIFEST_NAME, MANIFEST_SHA_NAME}:
            assert ours[name] == theirs[name], name  # base, τ*, every mask, components, private rows
    ours_manifest = json.loads(ours[MANIFEST_NAME])
    theirs_manifest = json.loads(theirs[MANIFEST_NAME])
    for manifest in (ours_manifest, theirs_manifest):
        manifest["files"] = {k: v for k, v in manifest["files"].items() if k not in PROVENANCE}
    assert ours_manifest == theirs_manifest
    assert load_recipe(add_setup.exact / "mmer_recipe.yaml") == load_recipe(scratch / "mmer_recipe.yaml")


def test_without_the_originals_the_add_equals_merging_the_reconstructed_models_bit_for_bit(
    add_setup, standin, tmp_path
):
    from mmer.route.reconstruct import reconstruct

    rebuilt = tmp_path / "rebuilt"
    reconstruct(add_setup.merged, rebuilt)
    models = {"vision": rebuilt / "vision", "audio": rebuilt / "audio", "vision_task": add_setup.task_dir}
    mmer.run_merge(recipe_for(add_setup.base_dir, models), tmp_path / "via_rebuilt")

    tensors_equal(standin, tmp_path / "via_rebuilt")
    before, after = files_of(add_setup.merged), files_of(standin)
    for name in before:  # each old modality keeps its components and private vocabulary rows untouched
        if name.startswith(("components/vision/", "components/audio/")):
            assert after[name] == before[name], name
    with mmer.load_decoupled(add_setup.merged) as old, mmer.load_decoupled(standin) as new:
        for modality in ("vision", "audio"):
            assert new.modality(modality).source == old.modality(modality).source  # it stands for its original
            assert new.modality(modality).llm_keys == old.modality(modality).llm_keys


def test_the_gap_between_stand_ins_and_the_exact_re_merge_is_measured_and_zero_between_equal_checkpoints(
    add_setup, standin
):
    originals = {**add_setup.old, "vision_task": add_setup.task_dir}
    same = measure_gap(add_setup.exact, add_setup.exact, originals)
    assert same.tau_star_rel_l1 == 0.0
    for g in same.modalities.values():
        assert g["mask_agreement"] == 1.0 and g["rebuild_rel_l1"] == 0.0 and g["error_a"] == g["error_b"]

    gap = measure_gap(add_setup.exact, standin, originals)
    assert list(gap.modalities) == ["vision", "audio", "vision_task"]
    assert 0.0 < gap.tau_star_rel_l1 < 0.2
    for g in gap.modalities.values():
        assert 0.9 < g["mask_agreement"] < 1.0
        assert abs(g["error_b"] - g["error_a"]) < 0.1  # each modality's own rebuild error barely moves


# ------------------------------------------------------------------------------------------ finding originals
@pytest.fixture
def moved(add_setup, tmp_path) -> SimpleNamespace:
    """A checkpoint merged from copies of the originals, the copies then deleted (a user who kept the artifact)."""
    copies = {m: Path(shutil.copytree(p, tmp_path / f"copy_{m}")) for m, p in add_setup.old.items()}
    merged = tmp_path / "merged"
    mmer.run_merge(recipe_for(add_setup.base_dir, copies, hash_inputs=True), merged)
    for path in copies.values():
        shutil.rmtree(path)
    return SimpleNamespace(merged=merged, copies=copies)


def test_originals_that_are_gone_are_stood_in_for_and_found_again_where_the_caller_says(
    add_setup, standin, moved, tmp_path
):
    auto = add_models(moved.merged, [add_setup.task_spec], tmp_path / "auto")

    assert [o.source for o in auto.old.values()] == ["stand-in", "stand-in"]
    assert "not found" in auto.old["vision"].reason
    tensors_equal(tmp_path / "auto", standin)

    with pytest.raises(AddError, match="vision") as err:
        add_models(moved.merged, [add_setup.task_spec], tmp_path / "refused", mode="exact")
    assert err.value.key == "vision" and "--source vision=" in err.value.hint
    assert not (tmp_path / "refused").exists()

    found = add_models(moved.merged, [add_setup.task_spec], tmp_path / "found", mode="exact", sources=add_setup.old)
    assert found.exact
    tensors_equal(tmp_path / "found", add_setup.exact)


def test_an_original_changed_since_the_merge_is_caught_by_its_recorded_sha256(add_setup, moved, tmp_path):
    changed = Path(shutil.copytree(add_setup.old["vision"], moved.copies["vision"]))
    shutil.copytree(add_setup.old["audio"], moved.copies["audio"])
    tampered = {n: t.clone() for n, t in load_file_dict(changed / "model.safetensors").items()}
    first = sorted(tampered)[0]
    tampered[first] = tampered[first] + 1.0
    from safetensors.torch import save_file

    save_file(tampered, str(changed / "model.safetensors"), metadata={"format": "pt"})

    auto = add_models(moved.merged, [add_setup.task_spec], tmp_path / "auto")
    assert (auto.old["vision"].source, auto.old["audio"].source) == ("stand-in", "original")
    assert any("vision" in w and "changed since the merge" in w for w in auto.warnings)
    with pytest.raises(AddError, match="sha256") as err:
        add_models(moved.merged, [add_setup.task_spec], tmp_path / "exact", mode="exact")
    assert err.value.file == str(changed.resolve())
    unchecked = add_models(moved.merged, [add_setup.task_spec], tmp_path / "unchecked", check_sources=False)
    assert unchecked.exact


def load_file_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------------------ the record
def test_the_output_records_what_add_did_and_verifies(add_setup, standin, tmp_path):
    video_spec = spec_file(tmp_path, add_setup.video_dir, "video")
    again = add_models(standin, [video_spec], tmp_path / "again", mode="standin")

    assert add_setup.exact_report.added["vision_task"]["kind"] == "new task of vision"
    assert again.added["video"]["kind"] == "new modality"
    history = json.loads((tmp_path / "again" / HISTORY_NAME).read_text())["history"]
    assert [list(h["added"]) for h in history] == [["vision_task"], ["video"]]
    assert history[1]["old"]["vision_task"]["source"] == "stand-in" and history[1]["exact"] is False
    assert history[1]["from"]["manifest_sha256"] == (standin / MANIFEST_SHA_NAME).read_text().strip()
    recipe_text = (tmp_path / "again" / "mmer_recipe.yaml").read_text()
    assert (
        recipe_text.startswith("# Made by `mmer add`")
        and "Stand-ins: the task vectors of vision, audio, vision_task were" in recipe_text
    )
    _, models, _ = load_recipe(tmp_path / "again" / "mmer_recipe.yaml")
    assert [m.modality for m in models] == ["vision", "audio", "vision_task", "video"]
    assert models[0].model == str(add_setup.old["vision"].resolve())  # the original, not the stand-in
    assert "## Added with `mmer add`" in (tmp_path / "again" / "README.md").read_text()
    for out in (add_setup.exact, standin, tmp_path / "again"):
        assert verify(out).ok, verify(out).problems
    changed = again.old["vision"].mask_bits_changed
    with mmer.load_decoupled(standin) as before, mmer.load_decoupled(tmp_path / "again") as after:
        flips = sum(
            int((before.mask("vision", s.name) ^ after.mask("vision", s.name)).sum()) for s in before.merged_slots
        )
    assert changed == flips > 0


def test_a_dry_run_decides_everything_and_writes_nothing(add_setup, tmp_path):
    report = add_models(add_setup.merged, [add_setup.task_spec], tmp_path / "out", dry_run=True)
    assert report.dry_run and report.exact and report.merge.plan["models"][-1]["modality"] == "vision_task"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- refusals
def test_a_modality_name_already_in_the_checkpoint_is_refused_naming_the_file(add_setup, tmp_path):
    spec = spec_file(tmp_path, add_setup.task_dir, "vision")
    with pytest.raises(AddError, match="already in") as err:
        add_models(add_setup.merged, [spec], tmp_path / "out")
    assert (err.value.file, err.value.key) == (str(spec), "modality") and "vision_2" in err.value.hint


@pytest.mark.parametrize(
    "kwargs,error,key",
    [
        ({"sources": {"videos": "/nowhere"}}, ConfigError, "source"),
        ({"mode": "approximately"}, ConfigError, "mode"),
        ({"specs": []}, ConfigError, "specs"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_read(add_setup, tmp_path, kwargs, error, key):
    args = {"specs": [add_setup.task_spec], **kwargs}
    with pytest.raises(error) as err:
        add_models(add_setup.merged, args.pop("specs"), tmp_path / "out", **args)
    assert err.value.key == key and err.value.hint


def test_a_model_from_another_base_is_refused_naming_its_tensor(add_setup, tiny_models, tmp_path):
    other = {n: t.clone() for n, t in tiny_models["vision"].items()}
    other["model.norm.weight"] = torch.ones(7)
    spec = spec_file(tmp_path, write_model(tmp_path / "other", other, "hf_legacy"), "other")
    with pytest.raises(IncompatibleBaseError) as err:
        add_models(add_setup.merged, [spec], tmp_path / "out")
    assert err.value.tensor == "language_model.model.norm.weight"
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_left_alone(add_setup):
    before = files_of(add_setup.exact)
    with pytest.raises(OutputExistsError):
        add_models(add_setup.merged, [add_setup.task_spec], add_setup.exact)
    assert files_of(add_setup.exact) == before


def test_a_single_merged_model_cannot_stand_in_for_its_modalities(add_setup, tmp_path):
    single = tmp_path / "single"
    mmer.run_merge(recipe_for(add_setup.base_dir, add_setup.old, mask="none"), single)
    with pytest.raises(AddError, match="single merged model") as err:
        add_models(single, [add_setup.task_spec], tmp_path / "out", mode="standin")
    assert "--source" in err.value.hint
    add_models(single, [add_setup.task_spec], tmp_path / "with_originals")  # the originals are at hand
    mmer.run_merge(
        recipe_for(add_setup.base_dir, {**add_setup.old, "vision_task": add_setup.task_dir}, mask="none"),
        tmp_path / "scratch",
    )
    assert (
        files_of(tmp_path / "with_originals")["model.safetensors"]
        == files_of(tmp_path / "scratch")["model.safetensors"]
    )


# ------------------------------------------------------------------------------------------------------- CLI
def test_mmer_add_prints_json_and_errors_with_their_exit_code(add_setup, tmp_path):
    ok = cli("add", add_setup.merged, add_setup.task_spec, "-o", tmp_path / "out", "--mode", "standin", "--json")
    assert ok.exit_code == 0, ok
    data = ok.json()
    assert data["ok"] is True and data["exact"] is False and data["old"]["vision"]["source"] == "stand-in"
    assert data["merge"]["modalities"][-1]["modality"] == "vision_task"

    text = cli("add", add_setup.merged, add_setup.task_spec, "-o", tmp_path / "text", "--quiet")
    assert text.exit_code == 0, text
    assert "new task of vision" in text.stdout and "exact re-merge" in text.stdout

    bad = cli("add", add_setup.merged, add_setup.task_spec, "-o", tmp_path / "out", "--json")
    assert bad.exit_code == 2
    assert bad.json()["ok"] is False and bad.json()["error"] == "OutputExistsError"
    worse = cli("add", add_setup.merged, add_setup.task_spec, "-o", tmp_path / "x", "--source", "vision")
    assert worse.exit_code == 2 and "MODALITY=PATH" in worse.stderr
