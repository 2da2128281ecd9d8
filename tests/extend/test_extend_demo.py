"""`mmer extend demo`: MoExtend end to end on a tiny model, offline, in seconds; the README's quick start runs as
written (its commands are read from README.md, so the two cannot drift); a pack answers like a modality does."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch
from cli_runner import cli
from tiny_moe import FEATURE_DIM, HIDDEN, PLACEHOLDER, VOCAB, build_lm, make_data, single_thread  # noqa: F401
from transformers.utils import ModelOutput

from mmer.extend import MoExtendModel, Projector, lm_loss, read_pack_manifest

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start() -> list[list[str]]:
    """Each `mmer ...` line of the README's fenced block that runs `mmer extend demo`, as argv (comments cut)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    [block] = [b for b in blocks if "mmer extend demo" in b]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("mmer ")]


def test_the_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = quick_start()
    assert [c[:3] for c in commands][0] == ["mmer", "extend", "demo"] and len(commands) >= 2
    for argv in commands:
        result = cli(*argv[1:])
        assert result.exit_code == 0, (argv, result)
    demo = tmp_path / "moextend-demo"
    manifest = read_pack_manifest(demo / "pack")
    assert manifest["layers"] and manifest["projector"]["placeholder_id"] == 3


def test_the_demo_trains_a_pack_that_reads_the_new_modality(tmp_path):
    result = cli("extend", "demo", "--workdir", tmp_path / "d", "--json")
    assert result.exit_code == 0, result
    data = result.json()
    assert data["ok"] and set(data["reports"]) == {"align", "finetune"} and data["layers"]
    assert data["held_out"]["accuracy"] > 0.5  # chance is under 1/43 per token: the features were read
    for name in ("base", "train", "held_out", "text", "recipe"):
        assert Path(data["files"][name]).exists()
    again = cli("extend", "demo", "--workdir", tmp_path / "d", "--json")  # its own directory is reused
    assert again.exit_code == 0 and again.json()["held_out"] == data["held_out"]  # and the run is reproducible


def test_the_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = cli("extend", "demo", "--workdir", tmp_path / "mine")
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_pack_answers_with_a_model_output_as_a_modality_does():
    model = MoExtendModel(build_lm("mixtral"), Projector("linear", FEATURE_DIM, HIDDEN), PLACEHOLDER)
    batch = make_data(n=4).batch(torch.arange(4))
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["features"], labels=batch["labels"])
    assert isinstance(out, ModelOutput) and out.logits.shape == (*batch["input_ids"].shape, VOCAB)
    assert torch.allclose(out.loss, lm_loss(out.logits, batch["labels"]))
