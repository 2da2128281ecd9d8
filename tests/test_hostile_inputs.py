"""Every hostile input once reported against mmer, replayed through the CLI as an attacker would send it.

Each case builds a hostile file, runs the `mmer` command a CI pipeline would run, and checks the outcome a user
must get: one clear `error:` (exit 1 for a runtime failure, 2 for a usage error), one valid JSON document with
``"ok": false`` under ``--json``, no traceback, nothing written outside the output and nothing of the user's lost.
The narrower tests of each rule live beside the code that keeps it; this module is the promise end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from conftest import HIDDEN, base_state, write_model
from safetensors.torch import load_file, save_file
from test_pipeline import recipe_for

import mmer
from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME


def spec(path: Path, model: Path, modality: str | None = None) -> Path:
    lines = [f"model: {model}"] + ([f"modality: {modality}"] if modality else [])
    path.write_text("\n".join(lines) + "\n")
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) with a digest, to show nothing was changed or lost."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[p.relative_to(root).as_posix()] = "link:" + os.readlink(p)
        elif p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(result, code: int | None = None) -> dict:
    """The shape of every refusal under --json: exit code, one JSON document, no traceback."""
    assert result.exit_code in ((1, 2) if code is None else (code,)), result
    assert "Traceback" not in result.stdout + result.stderr, result
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["message"], data
    return data


def reseal(ckpt: Path) -> None:
    """Recompute the manifest's file hashes and sidecar, as an attacker who edits a checkpoint would."""
    manifest_path = ckpt / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    for rel in list(manifest["files"]):
        if (ckpt / rel).is_file():
            manifest["files"][rel] = hashlib.sha256((ckpt / rel).read_bytes()).hexdigest()
    raw = (json.dumps(manifest, indent=2) + "\n").encode()
    manifest_path.write_bytes(raw)
    (ckpt / MANIFEST_SHA_NAME).write_text(hashlib.sha256(raw).hexdigest() + "\n")


@pytest.fixture(scope="module")
def work(tiny_models, tmp_path_factory):
    """The tiny models as specs, and one merged checkpoint, in a directory the attacks may not leave."""
    root = tmp_path_factory.mktemp("hostile")
    models = root / "models"
    for name in ("base", "vision", "audio"):
        shutil.copytree(tiny_models[f"{name}_dir"], models / name)
    specs = {
        "base": spec(root / "base.yaml", models / "base"),
        "vision": spec(root / "vision.yaml", models / "vision", "vision"),
        "audio": spec(root / "audio.yaml", models / "audio", "audio"),
    }
    merged = root / "merged"
    mmer.run_merge(recipe_for(models / "base", {"vision": models / "vision", "audio": models / "audio"}), merged)
    return {"root": root, "models": models, "specs": specs, "merged": merged}


@pytest.fixture
def copy_of(work, tmp_path):
    def make(name: str = "merged") -> Path:
        target = tmp_path / name
        shutil.copytree(work["merged"], target, symlinks=True)
        return target

    return make


# --------------------------------------------------------------------------------- writes outside the output
@pytest.mark.parametrize("name", ["../../X", "/tmp/mmer-hostile-abs", "Vision", "base", "a" * 200])
def test_a_modality_name_that_is_not_a_name_is_refused_by_every_reader(copy_of, tmp_path, name):
    ckpt = copy_of()
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    record = manifest["modalities"].pop("vision")
    record["name"] = name
    manifest["modalities"][name] = record
    raw = (json.dumps(manifest, indent=2) + "\n").encode()
    (ckpt / MANIFEST_NAME).write_bytes(raw)
    (ckpt / MANIFEST_SHA_NAME).write_text(hashlib.sha256(raw).hexdigest() + "\n")
    before = snapshot(tmp_path.parent)

    assert json.loads(cli("verify", ckpt, "--json").stdout)["ok"] is False
    refused(cli("reconstruct", ckpt, "-o", tmp_path / "out", "--all", "--json"), 1)
    refused(cli("inspect-masks", ckpt, "--json"), 1)
    assert not (tmp_path / "out").exists()
    assert not Path("/tmp/mmer-hostile-abs").exists()
    assert snapshot(tmp_path.parent) == before


# ---------------------------------------------------------------------------------------- reads from outside
@pytest.mark.parametrize("target", ["/proc/self/environ", "/etc/passwd"])
def test_a_side_file_linking_out_of_its_model_is_refused_not_copied(work, tmp_path, target):
    vision = tmp_path / "vision"
    shutil.copytree(work["models"] / "vision", vision)
    (vision / "tokenizer.json").symlink_to(target)
    result = cli(
        "merge", work["specs"]["base"], spec(tmp_path / "v.yaml", vision, "vision"), "-o", tmp_path / "out", "--json"
    )
    data = refused(result, 1)
    assert "tokenizer.json" in data["message"]
    assert not (tmp_path / "out").exists()


def test_a_weight_file_linking_out_of_its_model_is_refused(work, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    vision = tmp_path / "vision"
    shutil.copytree(work["models"] / "vision", vision)
    shutil.move(vision / "model.safetensors", outside / "model.safetensors")
    (vision / "model.safetensors").symlink_to(outside / "model.safetensors")
    data = refused(
        cli(
            "merge", work["specs"]["base"], spec(tmp_path / "v.yaml", vision, "vision"), "-o", tmp_path / "o", "--json"
        )
    )
    assert "model.safetensors" in data["message"]


def test_verify_sources_never_opens_a_path_taken_from_the_manifest(copy_of):
    ckpt = copy_of()
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["modalities"]["vision"]["source"]["files"] = {"../../../etc/shadow": "0" * 64}
    raw = (json.dumps(manifest, indent=2) + "\n").encode()
    (ckpt / MANIFEST_NAME).write_bytes(raw)
    (ckpt / MANIFEST_SHA_NAME).write_text(hashlib.sha256(raw).hexdigest() + "\n")
    result = cli("verify", ckpt, "--sources", "--json")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is False and any("etc/shadow" in p for p in data["problems"])


# ------------------------------------------------------------------------------------------------ data loss
@pytest.mark.parametrize("victim", ["input model", "parent of the inputs", "unrelated directory", "plain file"])
def test_overwrite_never_deletes_what_mmer_did_not_make(work, tmp_path, victim):
    unrelated = tmp_path / "thesis"
    unrelated.mkdir()
    (unrelated / "chapter1.tex").write_text("years of work")
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    target = {
        "input model": work["models"] / "audio",
        "parent of the inputs": work["models"],
        "unrelated directory": unrelated,
        "plain file": plain,
    }[victim]
    before = snapshot(work["root"]) | {f"tmp/{k}": v for k, v in snapshot(tmp_path).items()}
    specs = work["specs"]
    result = cli("merge", specs["base"], specs["vision"], specs["audio"], "-o", target, "--overwrite", "--json")
    refused(result, 2)
    after = snapshot(work["root"]) | {f"tmp/{k}": v for k, v in snapshot(tmp_path).items()}
    assert after == before


def test_overwrite_replaces_a_previous_mmer_output(work, tmp_path):
    specs = work["specs"]
    out = tmp_path / "out"
    assert cli("merge", specs["base"], specs["vision"], "-o", out, "--json").exit_code == 0
    result = cli("merge", specs["base"], specs["vision"], specs["audio"], "-o", out, "--overwrite", "--json")
    assert result.exit_code == 0, result
    assert set(json.loads((out / MANIFEST_NAME).read_text())["modalities"]) == {"vision", "audio"}


def test_reconstruct_cannot_overwrite_the_checkpoint_it_reads(copy_of):
    ckpt = copy_of()
    before = snapshot(ckpt)
    refused(cli("reconstruct", ckpt, "-o", ckpt, "-m", "vision", "--overwrite", "--json"), 2)
    assert snapshot(ckpt) == before


def test_demo_never_takes_over_an_existing_directory(tmp_path):
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "merged").mkdir()
    (workdir / "merged" / "results.csv").write_text("do not delete")
    before = snapshot(workdir)
    refused(cli("demo", "--workdir", workdir, "--json"), 2)
    assert snapshot(workdir) == before


def test_a_staging_directory_left_by_a_killed_run_is_removed_and_named(work, tmp_path):
    specs = work["specs"]
    out = tmp_path / "out"
    # A run killed with SIGKILL leaves its staging directory behind; the pid in its name no longer exists.
    assert cli("merge", specs["base"], specs["vision"], "-o", tmp_path / "model", "--json").exit_code == 0
    dead_pid = 2**22 + 17  # above Linux's default pid_max: never a live process
    leftover = tmp_path / f".out.mmer-staging-{dead_pid}-deadbeef"
    shutil.copytree(tmp_path / "model", leftover)
    result = cli("merge", specs["base"], specs["vision"], "-o", out, "--json")
    assert result.exit_code == 0, result
    assert not leftover.exists()
    assert any("staging" in w for w in result.json()["warnings"])


# ------------------------------------------------------------------------------ silently wrong results
def test_a_reference_base_changed_after_the_merge_is_refused(work, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(work["models"] / "base", base)
    out = tmp_path / "out"
    recipe = recipe_for(base, {"vision": work["models"] / "vision"}, base_storage="reference", hash_inputs=True)
    mmer.run_merge(recipe, out)
    state = load_file(base / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] + 1
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads(cli("verify", out, "--json").stdout)["ok"] is False
    data = refused(cli("reconstruct", out, "-o", tmp_path / "rebuilt", "-m", "vision", "--json"), 1)
    assert "model.safetensors" in data["message"]


def test_an_integer_llm_tensor_in_a_fine_tune_is_refused_naming_it(work, tmp_path):
    vision = tmp_path / "vision"
    shutil.copytree(work["models"] / "vision", vision)
    state = load_file(vision / "model.safetensors")
    name = next(n for n in state if n.endswith("layers.0.mlp.up_proj.weight"))
    state[name] = (state[name] * 1e9).to(torch.int32)
    save_file(state, str(vision / "model.safetensors"), metadata={"format": "pt"})
    data = refused(
        cli(
            "merge", work["specs"]["base"], spec(tmp_path / "v.yaml", vision, "vision"), "-o", tmp_path / "o", "--json"
        )
    )
    assert "up_proj" in data["message"]


@pytest.mark.parametrize(("dtype", "big"), [(torch.float32, 3e38), (torch.float16, 60000.0)])
@pytest.mark.parametrize("fused", ["1", "0"])
def test_finite_weights_whose_difference_overflows_are_refused(tmp_path, monkeypatch, dtype, big, fused):
    monkeypatch.setenv("MMER_FUSED", fused)
    base = base_state(dtype=dtype)
    tuned = {n: t.clone() for n, t in base.items()}
    base["model.norm.weight"][0] = -big
    tuned["model.norm.weight"][0] = big
    base_dir = write_model(tmp_path / "base", base)
    tuned_dir = write_model(tmp_path / "tuned", tuned)
    data = refused(
        cli(
            "merge",
            spec(tmp_path / "b.yaml", base_dir),
            spec(tmp_path / "t.yaml", tuned_dir, "vision"),
            "-o",
            tmp_path / "out",
            "--json",
        ),
        1,
    )
    assert "model.norm.weight" in data["message"] or "norm" in str(data.get("tensor"))
    assert not (tmp_path / "out").exists()


def test_a_modality_cannot_be_named_base(work, tmp_path):
    refused(
        cli(
            "merge",
            work["specs"]["base"],
            spec(tmp_path / "v.yaml", work["models"] / "vision", "base"),
            "-o",
            tmp_path / "o",
            "--json",
        ),
        2,
    )


def test_text_configs_are_compared_wherever_they_sit(work, tmp_path):
    vision = tmp_path / "vision"
    shutil.copytree(work["models"] / "vision", vision)
    config = json.loads((vision / "config.json").read_text())
    text = config.pop("text_config")
    config["llm_cfg"] = text | {"rms_norm_eps": 1e-6}
    (vision / "config.json").write_text(json.dumps(config))
    result = cli(
        "merge", work["specs"]["base"], spec(tmp_path / "v.yaml", vision, "vision"), "-o", tmp_path / "o", "--json"
    )
    if result.exit_code == 0:  # a warning is an acceptable answer too, as long as it is said
        assert any("rms_norm_eps" in w for w in result.json()["warnings"])
    else:
        assert "rms_norm_eps" in refused(result)["message"]


def test_an_edited_manifest_with_a_stale_sidecar_is_never_used(copy_of, tmp_path):
    ckpt = copy_of()
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["modalities"]["vision"]["scale"] = 1000.0
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    refused(cli("reconstruct", ckpt, "-o", tmp_path / "out", "-m", "vision", "--json"), 1)
    with pytest.raises(mmer.MmerError):
        mmer.load_decoupled(ckpt)


# --------------------------------------------------------------------------------- hangs and tracebacks
def test_a_yaml_alias_bomb_is_refused_at_once(work, tmp_path):
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\nmodel: x\n")
    refused(cli("merge", tmp_path / "bomb.yaml", work["specs"]["vision"], "-o", tmp_path / "o", "--json"), 2)


@pytest.mark.parametrize(
    "config",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"hidden_size": ' + b"9" * 5000 + b"}",
        b"\xff\xfe{}",
        b'{"hidden_size": NaN}',
    ],
    ids=["deep", "huge-int", "not-utf8", "nan"],
)
def test_a_hostile_config_json_is_one_clean_error(work, tmp_path, config):
    vision = tmp_path / "vision"
    shutil.copytree(work["models"] / "vision", vision)
    (vision / "config.json").write_bytes(config)
    data = refused(
        cli(
            "merge", work["specs"]["base"], spec(tmp_path / "v.yaml", vision, "vision"), "-o", tmp_path / "o", "--json"
        )
    )
    assert "config.json" in data["message"]


def test_a_deeply_nested_safetensors_header_is_one_clean_error(work, tmp_path):
    vision = tmp_path / "vision"
    shutil.copytree(work["models"] / "vision", vision)
    header = b"[" * 50_000 + b"]" * 50_000
    (vision / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    refused(
        cli(
            "merge", work["specs"]["base"], spec(tmp_path / "v.yaml", vision, "vision"), "-o", tmp_path / "o", "--json"
        ),
        1,
    )


def test_wrong_json_types_in_a_manifest_are_one_clean_error(copy_of, tmp_path):
    ckpt = copy_of()
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["modalities"]["vision"]["kept"] = "lots"
    manifest["slots"][0]["shape"] = {"rows": HIDDEN}
    raw = (json.dumps(manifest, indent=2) + "\n").encode()
    (ckpt / MANIFEST_NAME).write_bytes(raw)
    (ckpt / MANIFEST_SHA_NAME).write_text(hashlib.sha256(raw).hexdigest() + "\n")
    for args in (("inspect-masks", ckpt), ("reconstruct", ckpt, "-o", tmp_path / "o", "-m", "vision")):
        refused(cli(*args, "--json"), 1)


def test_device_meta_is_a_usage_error(work, tmp_path):
    specs = work["specs"]
    refused(cli("merge", specs["base"], specs["vision"], "-o", tmp_path / "o", "--device", "meta", "--json"), 2)


def test_a_png_into_a_missing_directory_is_not_a_traceback(work, tmp_path):
    result = cli("inspect-masks", work["merged"], "--png", tmp_path / "no" / "such" / "dir" / "m.png", "--json")
    assert "Traceback" not in result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is (result.exit_code == 0)


def test_a_read_only_output_filesystem_is_one_clean_error(work, tmp_path, monkeypatch):
    import errno

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    specs = work["specs"]
    data = refused(cli("merge", specs["base"], specs["vision"], "-o", tmp_path / "out", "--json"), 1)
    assert "Read-only" in data["message"] or "read-only" in data["message"]


def test_an_over_long_output_name_is_one_clean_error(work, tmp_path):
    specs = work["specs"]
    refused(cli("merge", specs["base"], specs["vision"], "-o", tmp_path / ("x" * 300), "--json"), 1)


@pytest.mark.parametrize("config", [b"[" * 100_000 + b"]" * 100_000, b'{"model_type": 1e999}', b"[]"])
def test_the_router_reads_a_component_config_only_after_bounding_it(tmp_path, config):
    from mmer.route.models import load_config

    (tmp_path / "config.json").write_bytes(config)
    with pytest.raises(mmer.MmerError, match="config.json"):
        load_config(tmp_path)


def test_the_router_never_follows_a_component_config_out_of_the_checkpoint(tmp_path):
    from mmer.route.models import load_config

    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "component").mkdir()
    (tmp_path / "component" / "config.json").symlink_to(outside)
    with pytest.raises(mmer.MmerError, match="outside"):
        load_config(tmp_path / "component")


def test_tune_never_replaces_report_files_or_recipes_it_did_not_write(work, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "tune.json").write_text('{"my": "own results"}')
    specs = work["specs"]
    data = refused(cli("tune", specs["base"], specs["vision"], "-o", out, "--lambdas", "0.9", "--json"), 2)
    assert "tune.json" in data["message"]
    assert (out / "tune.json").read_text() == '{"my": "own results"}'
    mine = tmp_path / "mine.yaml"
    mine.write_text("# hand-written\n")
    data = refused(
        cli("tune", specs["base"], specs["vision"], "-o", tmp_path / "r2", "--write-recipe", mine, "--json"), 2
    )
    assert mine.read_text() == "# hand-written\n"
    ok = cli("tune", specs["base"], specs["vision"], "-o", tmp_path / "r3", "--lambdas", "0.9", "--json")
    assert ok.exit_code == 0, ok
    again = cli("tune", specs["base"], specs["vision"], "-o", tmp_path / "r3", "--lambdas", "0.6", "--json")
    refused(again, 2)  # an earlier tune's report is kept unless asked...
    again = cli(
        "tune", specs["base"], specs["vision"], "-o", tmp_path / "r3", "--lambdas", "0.6", "--overwrite", "--json"
    )
    assert again.exit_code == 0, again  # ...and replaced with --overwrite, since mmer wrote it


def test_compare_never_replaces_a_png_it_did_not_write(work, tmp_path):
    png = tmp_path / "figure.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nsomeone else's figure")
    specs = work["specs"]
    refused(cli("compare", specs["base"], specs["vision"], "--png", png, "--json"), 2)
    assert png.read_bytes().endswith(b"someone else's figure")
