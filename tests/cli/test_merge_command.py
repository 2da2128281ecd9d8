"""`mmer merge`: what it writes, what it prints, how flags reach the recipe, and how it refuses bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

# ---------------------------------------------------------------------------------------------------- runner
from cli_runner import cli
from safetensors.torch import load_file, save_file

import mmer


@dataclass(frozen=True)
class Merged:
    path: Path
    report: dict[str, Any]


@pytest.fixture(scope="module")
def merged(demo_models, tmp_path_factory: pytest.TempPathFactory) -> Merged:
    """``mmer merge base.yaml vision.yaml audio.yaml -o OUT --json`` on the demo models, run once."""
    out = tmp_path_factory.mktemp("merged") / "out"
    result = cli("merge", *demo_models.specs, "-o", out, "--json")
    assert result.exit_code == 0, result
    return Merged(out, result.json())


BAD_TENSOR = "language_model.model.layers.0.mlp.down_proj.weight"


def sha256_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def staging_dirs(parent: Path) -> list[Path]:
    return sorted(parent.glob(".*.mmer-*"))


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n"), readme[:200]
    head, sep, _ = readme[4:].partition("\n---\n")
    assert sep, "the front matter is not closed by ---"
    return yaml.safe_load(head)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ a good merge
def test_a_quiet_merge_writes_the_whole_decoupled_checkpoint_and_leaves_no_staging_directory(demo_models, tmp_path):
    out = tmp_path / "merged"
    result = cli("merge", *demo_models.specs, "-o", out, "--quiet")

    assert result.exit_code == 0, result
    for name in ("mmer_manifest.json", "mmer_recipe.yaml", "README.md"):
        assert (out / name).is_file(), name
    for name in ("base", "tau_star", "components/vision", "components/audio"):
        assert (out / name).is_dir(), name
    assert any((out / "base").glob("*.safetensors"))
    assert any((out / "tau_star").glob("*.safetensors"))
    assert (out / "masks" / "vision.safetensors").is_file()
    assert (out / "masks" / "audio.safetensors").is_file()
    assert staging_dirs(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_the_model_card_has_yaml_front_matter_with_tags_naming_the_modalities(merged):
    meta = front_matter((merged.path / "README.md").read_text(encoding="utf-8"))

    assert "mmer" in meta["tags"]
    assert {"vision", "audio"} <= set(meta["tags"])


def test_json_output_is_one_valid_document_with_ok_and_a_density_in_0_1_per_modality(merged):
    report = merged.report

    assert report["ok"] is True
    assert report["dry_run"] is False
    assert Path(report["output"]) == merged.path
    by_name = {m["modality"]: m for m in report["modalities"]}
    assert set(by_name) == {"vision", "audio"}
    for m in by_name.values():
        assert 0.0 <= m["density"] <= 1.0
        assert m["density"] == pytest.approx(m["kept"] / m["total"])


def test_json_output_keeps_stdout_clean_of_progress_and_tables(demo_models, tmp_path):
    result = cli("merge", *demo_models.specs, "-o", tmp_path / "out", "--json")

    assert result.exit_code == 0, result
    assert json.loads(result.stdout)["ok"] is True  # the whole of stdout parses


def test_the_manifest_records_the_same_densities_as_the_json_report(merged):
    manifest = json.loads((merged.path / "mmer_manifest.json").read_text(encoding="utf-8"))

    for m in merged.report["modalities"]:
        assert manifest["modalities"][m["modality"]]["density"] == pytest.approx(m["density"])
        assert manifest["modalities"][m["modality"]]["lambda"] == m["lambda"]


def test_a_merge_without_quiet_or_json_prints_the_estimate_and_the_result_table(demo_models, tmp_path):
    result = cli("merge", *demo_models.specs, "-o", tmp_path / "out")

    assert result.exit_code == 0, result
    assert "memory estimate" in result.stderr
    assert "vision" in result.stdout and "audio" in result.stdout
    assert "mask density" in result.stdout


# ----------------------------------------------------------------------------------------------------- dry run
def test_dry_run_json_prints_the_plan_with_a_memory_estimate_and_creates_nothing(demo_models, tmp_path):
    out = tmp_path / "out"
    result = cli("merge", *demo_models.specs, "-o", out, "--dry-run", "--json")

    assert result.exit_code == 0, result
    data = result.json()
    assert data["ok"] is True and data["dry_run"] is True
    assert [m["modality"] for m in data["plan"]["models"]] == ["vision", "audio"]
    assert data["plan"]["estimate"]["peak_bytes"] > 0
    assert data["modalities"] == []
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_dry_run_needs_no_output_directory(demo_models, tmp_path):
    result = cli("merge", *demo_models.specs, "--dry-run")

    assert result.exit_code == 0, result
    assert "merge plan" in result.stdout
    assert "vision" in result.stdout and "audio" in result.stdout
    assert "memory estimate" in result.stdout


def test_dry_run_json_without_an_output_directory_reports_output_null(demo_models):
    result = cli("merge", *demo_models.specs, "--dry-run", "--json")

    assert result.exit_code == 0, result
    assert result.json()["output"] is None


def test_global_lambda_flag_is_a_default_that_a_model_yaml_lambda_overrides(demo_models):
    result = cli("merge", *demo_models.specs, "--dry-run", "--json", "--lambda", "0.7")

    assert result.exit_code == 0, result
    lambdas = {m["modality"]: m["lambda"] for m in result.json()["plan"]["models"]}
    assert lambdas == {"vision": 0.7, "audio": 0.8}  # audio.yaml of the demo says lambda: 0.8


# ------------------------------------------------------------------------------------------ flags reach recipe
@pytest.fixture(scope="module")
def flagged(demo_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("flagged") / "out"
    result = cli(
        "merge",
        *demo_models.specs,
        "-o",
        out,
        "--json",
        "--quiet",
        "--k",
        "0.5",
        "--lambda",
        "0.7",
        "--lambda-for",
        "audio=0.3",
        "--trim-scope",
        "per-tensor",
    )
    assert result.exit_code == 0, result
    return out, result.json()


def test_flags_are_written_into_the_recipe_options(flagged):
    out, _ = flagged
    recipe = yaml.safe_load((out / "mmer_recipe.yaml").read_text(encoding="utf-8"))

    assert recipe["options"]["k"] == 0.5
    assert recipe["options"]["lambda"] == 0.7
    assert recipe["options"]["trim_scope"] == "per-tensor"


def test_lambda_for_wins_over_the_lambda_in_the_model_yaml(flagged):
    out, report = flagged
    recipe = yaml.safe_load((out / "mmer_recipe.yaml").read_text(encoding="utf-8"))
    manifest = json.loads((out / "mmer_manifest.json").read_text(encoding="utf-8"))

    models = {m["modality"]: m for m in recipe["models"]}
    assert models["audio"]["lambda"] == 0.3
    assert models["vision"].get("lambda", recipe["options"]["lambda"]) == 0.7
    assert {name: m["lambda"] for name, m in manifest["modalities"].items()} == {"vision": 0.7, "audio": 0.3}
    assert {m["modality"]: m["lambda"] for m in report["modalities"]} == {"vision": 0.7, "audio": 0.3}


def test_flags_are_recorded_in_the_manifest_options(flagged):
    out, report = flagged
    options = json.loads((out / "mmer_manifest.json").read_text(encoding="utf-8"))["options"]

    assert options["k"] == 0.5
    assert options["lambda"] == 0.7
    assert options["trim_scope"] == "per-tensor"
    assert report["plan"]["options"] == options


def test_per_tensor_trim_reports_no_global_threshold(flagged):
    _, report = flagged

    assert all(m["trim_threshold"] is None for m in report["modalities"])


# -------------------------------------------------------------------------------------------------- determinism
def test_rerunning_the_written_recipe_gives_bit_identical_tau_star_and_masks(merged, tmp_path):
    again = tmp_path / "again"
    result = cli("merge", "--recipe", merged.path / "mmer_recipe.yaml", "-o", again, "--quiet")

    assert result.exit_code == 0, result
    for part in ("tau_star", "masks", "base", "components"):
        first, second = sha256_tree(merged.path / part), sha256_tree(again / part)
        assert first, f"{part} is empty"
        assert first == second, part
    assert (again / "mmer_recipe.yaml").read_text() == (merged.path / "mmer_recipe.yaml").read_text()


def test_zero_sign_majority_records_its_census_and_a_rerun_of_the_recipe_counts_it_again(demo_models, tmp_path):
    out, again = tmp_path / "out", tmp_path / "again"
    result = cli("merge", *demo_models.specs, "-o", out, "--json", "--zero-sign", "majority", "--mask", "sign_only")

    assert result.exit_code == 0, result
    census = json.loads((out / "mmer_manifest.json").read_text(encoding="utf-8"))["options"]["sign_census"]
    assert census["positive"] + census["negative"] > 0 and census["majority_sign"] in (-1, 1)
    assert result.json()["plan"]["options"]["sign_census"] == census
    recipe = yaml.safe_load((out / "mmer_recipe.yaml").read_text(encoding="utf-8"))
    assert recipe["options"]["zero_sign"] == "majority" and "sign_census" not in recipe["options"]
    assert cli("merge", "--recipe", out / "mmer_recipe.yaml", "-o", again, "--quiet").exit_code == 0
    for part in ("tau_star", "masks"):
        assert sha256_tree(out / part) == sha256_tree(again / part), part
    assert json.loads((again / "mmer_manifest.json").read_text(encoding="utf-8"))["options"]["sign_census"] == census


def test_model_yamls_on_the_command_line_replace_the_models_of_a_recipe_file(demo_models, merged, tmp_path):
    recipe_file = write_yaml(tmp_path / "options.yaml", {"options": {"k": 0.6}})
    result = cli("merge", *demo_models.specs, "--recipe", recipe_file, "--dry-run", "--json")

    assert result.exit_code == 0, result
    plan = result.json()["plan"]
    assert plan["options"]["k"] == 0.6
    assert [m["modality"] for m in plan["models"]] == ["vision", "audio"]


# ------------------------------------------------------------------------------------------------------ errors
@dataclass
class ErrorCase:
    """A bad invocation: ``args(demo, tmp_path, out)`` builds the argument list; ``says`` must be on stderr."""

    args: Callable[..., list]
    says: list[str]
    json_fields: dict = field(default_factory=dict)
    error: str = "ConfigError"
    code: int = 2  # usage errors exit 2; runtime failures (the inputs themselves are unusable) exit 1


def _bad_key_spec(demo, tmp):
    return write_yaml(tmp / "vision_typo.yaml", {"model": str(demo.vision), "modality": "vision", "lamda": 0.5})


def _vision_with_wrong_shape(demo, tmp) -> Path:
    """A copy of the demo vision model whose layer-0 down_proj lost a column: not fine-tuned from this base."""
    model = tmp / "vision_other_base"
    shutil.copytree(demo.vision, model)
    state = load_file(str(model / "model.safetensors"))
    assert BAD_TENSOR in state, sorted(state)[:5]
    state[BAD_TENSOR] = state[BAD_TENSOR][:, :-1].contiguous()
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    return write_yaml(tmp / "vision_other_base.yaml", {"model": str(model), "modality": "vision"})


def _duplicate_modality(demo, tmp):
    return write_yaml(tmp / "audio_as_vision.yaml", {"model": str(demo.audio), "modality": "vision"})


def _existing_output(out: Path) -> Path:
    out.mkdir()
    (out / "keep.txt").write_text("old")
    return out


ERRORS = {
    "unknown key in a model yaml": ErrorCase(
        lambda d, t, o: ["merge", d.specs[0], _bad_key_spec(d, t), d.specs[2], "-o", o],
        ["'lamda'", "did you mean 'lambda'"],
        {"key": "lamda", "file": "vision_typo.yaml"},
    ),
    "missing spec file": ErrorCase(
        lambda d, t, o: ["merge", d.specs[0], t / "nope.yaml", d.specs[2], "-o", o],
        ["nope.yaml", "no such file"],
        {"file": "nope.yaml"},
    ),
    "base yaml with a modality given first": ErrorCase(
        lambda d, t, o: ["merge", d.specs[1], d.specs[0], d.specs[2], "-o", o],
        ["vision.yaml", "first YAML is the base", "'vision'"],
        {"key": "modality", "file": "vision.yaml"},
    ),
    "duplicate modality names": ErrorCase(
        lambda d, t, o: ["merge", d.specs[0], d.specs[1], _duplicate_modality(d, t), "-o", o],
        ["'vision'", "twice"],
        {"key": "modality"},
    ),
    "k out of range": ErrorCase(
        lambda d, t, o: ["merge", *d.specs, "--k", "1.5", "-o", o],
        ["k = 1.5", "out of range"],
        {"key": "k"},
    ),
    "lambda-for without a value": ErrorCase(
        lambda d, t, o: ["merge", *d.specs, "--lambda-for", "audio", "-o", o],
        ["--lambda-for 'audio'", "MODALITY=VALUE"],
        {"key": "lambda-for"},
    ),
    "lambda-for with a non-number": ErrorCase(
        lambda d, t, o: ["merge", *d.specs, "--lambda-for", "audio=loud", "-o", o],
        ["audio=loud", "MODALITY=VALUE"],
        {"key": "lambda-for"},
    ),
    "lambda-for an unknown modality": ErrorCase(
        lambda d, t, o: ["merge", *d.specs, "--lambda-for", "speech=0.5", "-o", o],
        ["'speech'", "no model has"],
        {"key": "speech"},
    ),
    "lambda-for a negative value": ErrorCase(
        lambda d, t, o: ["merge", *d.specs, "--lambda-for", "audio=-1", "-o", o],
        ["lambda for audio", "out of range"],
    ),
    "output exists without --overwrite": ErrorCase(
        lambda d, t, o: ["merge", *d.specs, "-o", _existing_output(o)],
        ["already exists", "--overwrite"],
        {"file": "out"},
        error="OutputExistsError",
    ),
    "a model fine-tuned from another base": ErrorCase(
        lambda d, t, o: ["merge", d.specs[0], _vision_with_wrong_shape(d, t), d.specs[2], "-o", o],
        [BAD_TENSOR, "vision_other_base", "[64, 127]", "[64, 128]"],
        {"tensor": BAD_TENSOR},
        error="IncompatibleBaseError",
        code=1,
    ),
    "unknown method": ErrorCase(
        lambda d, t, o: ["merge", *d.specs, "--method", "average-everything", "-o", o],
        ["'average-everything'", "ties"],
        {"key": "method"},
    ),
    "cuda device without a gpu": ErrorCase(
        lambda d, t, o: ["merge", *d.specs, "--device", "cuda", "-o", o],
        ["'cuda'", "no CUDA GPU"],
        {"key": "device"},
    ),
    "unknown mask rule": ErrorCase(
        lambda d, t, o: ["merge", *d.specs, "--mask", "bogus", "-o", o],
        ["'bogus'", "mmer"],
        {"key": "mask"},
    ),
    "unknown trim scope": ErrorCase(
        lambda d, t, o: ["merge", *d.specs, "--trim-scope", "per_tensor", "-o", o],
        ["trim_scope", "'per_tensor'", "did you mean 'per-tensor'"],
        {"key": "trim_scope"},
    ),
    "shard size that is not a size": ErrorCase(
        lambda d, t, o: ["merge", *d.specs, "--shard-size", "huge", "-o", o],
        ["'huge'", "not a size"],
        {"key": "shard_size"},
    ),
    "no model yaml at all": ErrorCase(
        lambda d, t, o: ["merge", "-o", o],
        ["no base model"],
    ),
    "no output directory and no dry run": ErrorCase(
        lambda d, t, o: ["merge", *d.specs],
        ["no output directory", "-o"],
        {"key": "output"},
    ),
}


def _error_params():
    for name, case in ERRORS.items():
        marks = []
        if name == "cuda device without a gpu":
            marks.append(pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available"))
        for as_json in (False, True):
            yield pytest.param(case, as_json, id=f"{name}{' --json' if as_json else ''}", marks=marks)


def _snapshot(path: Path) -> list[str] | None:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else None


@pytest.mark.parametrize(("case", "as_json"), list(_error_params()))
def test_bad_input_exits_with_its_code_names_the_problem_and_writes_nothing(demo_models, tmp_path, case, as_json):
    specs_dir = tmp_path / "specs"
    specs_dir.mkdir()
    out = tmp_path / "out"
    args = case.args(demo_models, specs_dir, out)
    before = _snapshot(out)

    result = cli(*args, *(["--json"] if as_json else []))

    assert result.exit_code == case.code, result
    assert result.exception is None, result
    if as_json:
        data = result.json()
        assert result.stderr == ""
        assert data["ok"] is False
        assert data["error"] == case.error
        text = f"{data['message']} {data['hint']}"
        assert all(fragment in text for fragment in case.says), (case.says, data)
        for key, expected in case.json_fields.items():
            assert data[key] is not None, (key, data)
            assert data[key] == expected or data[key].endswith(expected), (key, data)
    else:
        assert "error:" in result.stderr
        for fragment in case.says:
            assert fragment in result.stderr, (fragment, str(result))
    assert _snapshot(out) == before  # no output directory appeared, an existing one is untouched
    assert staging_dirs(tmp_path) == []


def test_an_existing_mmer_output_is_replaced_with_overwrite(demo_models, tmp_path):
    from mmer.io.outputs import MARKER_NAME, marker_bytes

    out = _existing_output(tmp_path / "out")
    (out / MARKER_NAME).write_bytes(marker_bytes("decoupled-checkpoint"))  # what mmer wrote (others: never replaced)

    result = cli("merge", *demo_models.specs, "-o", out, "--overwrite", "--quiet")

    assert result.exit_code == 0, result
    assert not (out / "keep.txt").exists()
    assert (out / "mmer_manifest.json").is_file()
    assert staging_dirs(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_unknown_key_error_on_stderr_names_the_yaml_file_it_was_found_in(demo_models, tmp_path):
    bad = _bad_key_spec(demo_models, tmp_path)

    result = cli("merge", demo_models.specs[0], bad, demo_models.specs[2], "-o", tmp_path / "out")

    assert result.exit_code == 2, result
    assert "vision_typo.yaml" in result.stderr


@pytest.mark.parametrize(
    "directory",
    [
        pytest.param("[/models]", id="closing-tag-like"),
        pytest.param("[bold]specs", id="style-tag-like"),
        pytest.param("[1]", id="not-a-tag"),
    ],
)
def test_an_error_message_quoting_a_path_with_square_brackets_is_printed_verbatim(demo_models, tmp_path, directory):
    odd = tmp_path / directory / "nope.yaml"

    result = cli("merge", demo_models.specs[0], odd, "-o", tmp_path / "out")

    assert result.exception is None, result
    assert result.exit_code == 2, result
    assert str(odd) in result.stderr


def test_the_version_option_prints_the_library_version():
    result = cli("--version")

    assert result.exit_code == 0, result
    assert result.stdout.strip() == f"mmer {mmer.__version__}"
