"""The small things a new user tripped on: --png given a directory, tune's overwrite rule, verify --source,
tables outside a terminal, and progress counted in steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from cli_runner import cli
from mmer_cli.render import RichProgress, _AmountColumn, _SpeedColumn
from rich.progress import Progress

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def spec(directory: Path, name: str, data: dict) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """A merge of copies of the tiny models (so a test may move one), and its specs."""
    root = tmp_path_factory.mktemp("small")
    models = {m: shutil.copytree(tiny_models[f"{m}_dir"], root / m) for m in ("vision", "audio")}
    specs = [spec(root, "base", {"model": str(tiny_models["base_dir"])})]
    specs += [spec(root, m, {"model": str(p), "modality": m}) for m, p in models.items()]
    merged = root / "merged"
    assert cli("merge", *specs, "-o", merged, "-q").exit_code == 0
    return root, specs, merged, models


@pytest.mark.parametrize(("command", "name"), [("inspect-masks", "mask_density.png"), ("compare", "compare.png")])
def test_a_png_given_a_directory_is_written_inside_it_and_the_file_is_reported(setup, tmp_path, command, name):
    _, specs, merged, _ = setup
    args = [merged] if command == "inspect-masks" else [*specs, "--variant", "ties/mmer"]
    result = cli(command, *args, "--png", tmp_path, "--json")
    assert result.exit_code == 0, result
    assert result.json()["png"] == str(tmp_path / name)
    assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC and not Path(f"{tmp_path}.png").exists()
    text = cli(command, *args, "--png", tmp_path)
    assert text.exit_code == 0 and f"written to {tmp_path / name}" in text.stdout


def test_tune_refuses_to_replace_its_earlier_outputs_without_overwrite(setup, tmp_path):
    _, specs, _, _ = setup
    out, recipe = tmp_path / "tune", tmp_path / "tuned.yaml"
    first = cli("tune", *specs, "--lambdas", "0.9", "-o", out, "--write-recipe", recipe, "-q")
    assert first.exit_code == 0, first
    before = (out / "tune.json").read_bytes()

    again = cli("tune", *specs, "--lambdas", "0.5", "-o", out, "--json")
    assert again.exit_code == 2 and again.json()["key"] == "output" and "--overwrite" in again.json()["hint"]
    assert (out / "tune.json").read_bytes() == before  # refused before any work, nothing replaced
    recipe_only = cli("tune", *specs, "--lambdas", "0.5", "-o", tmp_path / "new", "--write-recipe", recipe, "--json")
    assert recipe_only.exit_code == 2 and recipe_only.json()["key"] == "recipe"

    replaced = cli("tune", *specs, "--lambdas", "0.5", "-o", out, "--write-recipe", recipe, "--overwrite", "-q")
    assert replaced.exit_code == 0, replaced
    assert (out / "tune.json").read_bytes() != before

    (tmp_path / "mine.yaml").write_text("# my own recipe\n")
    never = cli("tune", *specs, "-o", out, "--write-recipe", tmp_path / "mine.yaml", "--overwrite", "--json")
    assert never.exit_code == 2 and (tmp_path / "mine.yaml").read_text() == "# my own recipe\n"


def test_verify_sources_finds_a_moved_source_where_source_says(setup, tmp_path):
    root, _, merged, models = setup
    moved = tmp_path / "vision-moved"
    shutil.move(models["vision"], moved)
    try:
        lost = cli("verify", merged, "--sources", "--json")
        assert lost.exit_code != 0
        found = cli("verify", merged, "--source", f"vision={moved}", "--json")  # --source implies --sources
        assert found.exit_code == 0, found
        assert found.json()["reconstruction"]["vision"]["source_hashes_match"] is True
        assert set(found.json()["reconstruction"]) == {"vision", "audio"}
        unknown = cli("verify", merged, "--source", f"video={moved}", "--json")
        assert unknown.exit_code == 2 and unknown.json()["key"] == "source"
        malformed = cli("verify", merged, "--source", "vision", "--json")
        assert malformed.exit_code == 2 and "MODALITY=PATH" in malformed.json()["message"]
    finally:
        shutil.move(moved, models["vision"])


def test_outside_a_terminal_tables_are_not_cut_at_80_columns(setup, tmp_path):
    _, specs, _, _ = setup
    deep = tmp_path / ("a-directory-name-long-enough-to-overflow-eighty-columns-" * 2) / "base"
    shutil.copytree(Path(yaml.safe_load(specs[0].read_text())["model"]), deep)
    long_specs = [spec(tmp_path, "base", {"model": str(deep)}), *specs[1:]]
    result = cli("merge", *long_specs, "-o", tmp_path / "out", "--dry-run", env={"COLUMNS": None})
    assert result.exit_code == 0, result
    assert any(str(deep) in line for line in result.stdout.splitlines()), result  # whole, on one line
    assert "…" not in result.stdout


def test_progress_counts_steps_in_steps_and_bytes_as_sizes():
    progress = Progress(_AmountColumn(), _SpeedColumn())
    steps = progress.add_task("align", total=40, unit="steps")
    progress.update(steps, completed=12)
    amount = str(_AmountColumn().render(progress.tasks[steps]))
    assert amount == "12/40 steps"
    size = progress.add_task("merge", total=2_000_000, unit="B")
    progress.update(size, completed=1_000_000)
    assert "MB" in str(_AmountColumn().render(progress.tasks[size]))

    sink = RichProgress(enabled=False)
    sink.start("finetune", 10, unit="step")
    assert sink._progress.tasks[0].fields["unit"] == "steps" and sink._progress.tasks[0].description == "finetune"
