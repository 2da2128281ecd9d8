"""Every failure a user can cause ends in one `error:`/`fix:` message (or one JSON document under --json) and an
exit code that says whose move it is: 2 for a usage error, 1 for a runtime failure, 130 when interrupted. Never a
traceback, whatever raised: a library error, the file system, click's option parser, or a bug in mmer."""

from __future__ import annotations

import errno
import importlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from cli_runner import cli

import mmer
import mmer.errors as errors
from mmer.errors import MmerError

USAGE = (errors.ConfigError, errors.OutputExistsError, errors.ModelNotFoundError)
RUNTIME = (
    errors.CheckpointFormatError,
    errors.LayoutError,
    errors.IncompatibleBaseError,
    errors.NonFiniteError,
    errors.DecoupledFormatError,
    errors.DiskFullError,
    errors.UnsafePathError,
    errors.OutputWriteError,
    errors.FileSystemError,
)


def one_json_failure(result, code: int) -> dict:
    """stdout is exactly one JSON document saying ``ok: false``; the exit code is ``code``; no traceback."""
    assert result.exit_code == code, result
    assert result.exception is None, result
    assert "Traceback" not in result.stdout + result.stderr, result
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["message"] and data["error"], data
    return data


def one_text_failure(result, code: int) -> str:
    assert result.exit_code == code, result
    assert result.exception is None, result
    assert "Traceback" not in result.stdout + result.stderr, result
    lines = result.stderr.splitlines()
    assert [line.startswith("error:") for line in lines].count(True) == 1, result
    assert [line.startswith("fix:") for line in lines].count(True) == 1, result
    return result.stderr


@pytest.fixture
def specs(tiny_models, tmp_path) -> dict[str, Path]:
    base = tmp_path / "base.yaml"
    base.write_text(f"model: {tiny_models['base_dir']}\n")
    vision = tmp_path / "vision.yaml"
    vision.write_text(f"model: {tiny_models['vision_dir']}\nmodality: vision\n")
    return {"base": base, "vision": vision}


# ------------------------------------------------------------------------------------------------ exit codes
@pytest.mark.parametrize("cls", USAGE, ids=lambda c: c.__name__)
def test_what_the_user_typed_or_wrote_is_a_usage_error_exiting_2(cls):
    assert cls("x").exit_code == 2


@pytest.mark.parametrize("cls", RUNTIME, ids=lambda c: c.__name__)
def test_what_the_inputs_or_the_machine_did_is_a_runtime_failure_exiting_1(cls):
    assert cls("x").exit_code == 1


@pytest.mark.parametrize(
    ("code", "cls", "says"),
    [
        (errno.ENOSPC, errors.DiskFullError, "free some space"),
        (errno.EROFS, errors.FileSystemError, "read-only"),
        (errno.ENAMETOOLONG, errors.FileSystemError, "shorter"),
        (errno.EBUSY, errors.FileSystemError, "in use"),
        (errno.EACCES, errors.FileSystemError, "permission"),
        (errno.EISDIR, errors.FileSystemError, "directory"),
    ],
    ids=["ENOSPC", "EROFS", "ENAMETOOLONG", "EBUSY", "EACCES", "EISDIR"],
)
def test_an_os_error_becomes_one_error_naming_the_path_with_a_fix(code, cls, says):
    err = errors.from_os_error(OSError(code, os.strerror(code), "/out/model.safetensors"))
    assert type(err) is cls and err.exit_code == 1
    assert err.file == "/out/model.safetensors" and err.message.startswith("/out/model.safetensors: ")
    assert says in f"{err.message} {err.hint}" and err.hint


# -------------------------------------------------------------------------------------------- usage errors
def test_an_unknown_option_under_json_is_one_json_document_exiting_2():
    data = one_json_failure(cli("merge", "--no-such-option", "--json"), 2)
    assert data["error"] == "CommandLineError" and "--no-such-option" in data["message"]
    assert "mmer merge --help" in data["hint"]


def test_a_missing_argument_under_json_is_one_json_document_exiting_2():
    data = one_json_failure(cli("verify", "--json"), 2)
    assert data["key"] == "path"


def test_a_bad_option_value_in_a_subcommand_group_under_json_is_one_json_document(tmp_path):
    data = one_json_failure(cli("extend", "eval", tmp_path, tmp_path, "--batch-size", "many", "--json"), 2)
    assert "--batch-size" in data["message"] and "mmer extend eval --help" in data["hint"]


def test_an_unknown_option_without_json_is_one_error_and_fix_on_stderr():
    text = one_text_failure(cli("merge", "--no-such-option"), 2)
    assert "--no-such-option" in text and "mmer merge --help" in text


def test_an_unknown_command_is_a_usage_error():
    one_json_failure(cli("merj", "--json"), 2)


@pytest.mark.parametrize("device", ["meta", "cuda:x", "tpu", "CPU"])
def test_a_device_that_is_not_cpu_cuda_or_mps_is_a_usage_error(specs, tmp_path, device):
    result = cli("merge", specs["base"], specs["vision"], "-o", tmp_path / "out", "--device", device, "--json")
    data = one_json_failure(result, 2)
    assert data["key"] == "device" and "cpu" in data["hint"]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_a_usage_error(specs, tmp_path):
    result = cli("merge", specs["base"], specs["vision"], "-o", tmp_path / "out", "--device", "cuda", "--json")
    assert one_json_failure(result, 2)["key"] == "device"


def test_a_png_into_a_missing_directory_is_refused_before_any_work(specs, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the chart's directory is checked before the comparison runs")

    monkeypatch.setattr("mmer.compare.run_compare", no_work)
    png = tmp_path / "charts" / "compare.png"
    data = one_json_failure(cli("compare", specs["base"], specs["vision"], "--png", png, "--json"), 2)
    assert data["key"] == "png" and str(png.parent) in data["message"] and "mkdir -p" in data["hint"]
    assert not png.parent.exists()


def test_inspect_masks_png_into_a_missing_directory_is_one_error(tmp_path):
    text = one_text_failure(cli("inspect-masks", tmp_path, "--png", tmp_path / "no" / "m.png"), 2)
    assert f"directory {tmp_path / 'no'} does not exist" in text


def test_a_png_into_a_directory_never_replaces_a_file_mmer_did_not_write_there(tmp_path):
    # A directory receives DIR/mask_density.png (tests/cli/test_small_fixes.py); a user's file of that name stays.
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "mask_density.png").write_bytes(b"mine")
    assert one_json_failure(cli("inspect-masks", tmp_path, "--png", tmp_path / "plots", "--json"), 2)["key"] == "png"
    assert (tmp_path / "plots" / "mask_density.png").read_bytes() == b"mine"


def test_a_yaml_alias_bomb_through_the_cli_is_refused_at_once(specs, tmp_path):
    from test_bounded_parsing import ALIAS_BOMB

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB + "\nmodel: x\n")
    started = time.perf_counter()
    data = one_json_failure(cli("merge", bomb, specs["vision"], "-o", tmp_path / "out", "--json"), 2)
    assert time.perf_counter() - started < 1.0
    assert data["file"] == str(bomb) and "alias" in data["hint"]


# ------------------------------------------------------------------------------------------- hostile files
HOSTILE = {
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "huge-int": b'{"hidden_size": ' + b"9" * 5000 + b"}",
    "nan": b'{"hidden_size": NaN}',
    "not-utf8": b'{"model_type": "\xff"}',
}


def _with(tiny_models, tmp_path, name: str, raw: bytes) -> Path:
    import shutil

    model = tmp_path / "vision"
    shutil.copytree(tiny_models["vision_dir"], model)
    if name == "model.safetensors":
        raw = len(raw).to_bytes(8, "little") + raw
    if name == "model.safetensors.index.json":
        (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    (model / name).write_bytes(raw)
    spec = tmp_path / "hostile.yaml"
    spec.write_text(f"model: {model}\nmodality: vision\n")
    return spec


@pytest.mark.parametrize("raw", list(HOSTILE.values()), ids=list(HOSTILE))
@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "model.safetensors"])
def test_a_hostile_json_file_in_a_model_is_one_runtime_failure(specs, tiny_models, tmp_path, name, raw):
    spec = _with(tiny_models, tmp_path, name, raw)
    data = one_json_failure(cli("merge", specs["base"], spec, "-o", tmp_path / "out", "--json"), 1)
    assert data["error"] == "CheckpointFormatError" and name in data["file"]
    text = one_text_failure(cli("merge", specs["base"], spec, "-o", tmp_path / "out"), 1)
    assert name in text


# --------------------------------------------------------------------------------- OS errors, bugs, Ctrl-C
OS_ERRORS = [errno.EROFS, errno.ENOSPC, errno.ENAMETOOLONG, errno.EBUSY, errno.EACCES, errno.EISDIR]


@pytest.mark.parametrize("code", OS_ERRORS, ids=[errno.errorcode[c] for c in OS_ERRORS])
def test_an_os_error_late_in_a_merge_is_one_message_exiting_1(specs, tmp_path, monkeypatch, code):
    import mmer.pipeline as pipeline

    real = pipeline.merge_slots

    def fails_late(plan, staging, *args, **kwargs):
        real(plan, staging, *args, **kwargs)
        raise OSError(code, os.strerror(code), str(staging / "tau_star.safetensors"))

    monkeypatch.setattr(pipeline, "merge_slots", fails_late)
    out = tmp_path / "out"
    data = one_json_failure(cli("merge", specs["base"], specs["vision"], "-o", out, "--json"), 1)
    assert "tau_star.safetensors" in data["message"] and data["hint"]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "mmer-staging" in p.name]
    one_text_failure(cli("merge", specs["base"], specs["vision"], "-o", out), 1)


def _raiser(exc: BaseException):
    def raise_it(*args, **kwargs):
        raise exc

    return raise_it


# Each command's library entry point, patched to fail, and arguments that get past click to it.
COMMANDS = {
    "merge": ("mmer.build_plan", lambda s, t: ["merge", s["base"], s["vision"], "-o", t / "out"]),
    "compare": ("mmer.compare.run_compare", lambda s, t: ["compare", s["base"], s["vision"]]),
    "verify": ("mmer.verify.verify", lambda s, t: ["verify", t]),
    "inspect-masks": ("mmer.inspect_masks", lambda s, t: ["inspect-masks", t]),
    "reconstruct": ("mmer.route.reconstruct:reconstruct", lambda s, t: ["reconstruct", t, "-o", t / "o", "--all"]),
    "add": ("mmer.add.add_models", lambda s, t: ["add", t, s["vision"], "-o", t / "out"]),
    "tune": ("mmer.tune.run_tune", lambda s, t: ["tune", s["base"], s["vision"], "-o", t / "tune"]),
    "extend inspect": ("mmer.extend.read_pack_manifest", lambda s, t: ["extend", "inspect", t]),
}


def _patch(monkeypatch, target: str, replacement) -> None:
    module, sep, name = target.partition(":")
    if sep:
        monkeypatch.setattr(importlib.import_module(module), name, replacement)
    else:
        monkeypatch.setattr(target, replacement)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_renders_an_os_error_as_one_json_failure(specs, tmp_path, monkeypatch, command):
    target, args = COMMANDS[command]
    _patch(monkeypatch, target, _raiser(OSError(errno.EBUSY, os.strerror(errno.EBUSY), "/models/x.safetensors")))
    data = one_json_failure(cli(*args(specs, tmp_path), "--json"), 1)
    assert data["error"] == "FileSystemError" and data["file"] == "/models/x.safetensors"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_renders_a_library_error_with_its_exit_code(specs, tmp_path, monkeypatch, command):
    target, args = COMMANDS[command]
    _patch(monkeypatch, target, _raiser(errors.ConfigError("bad key", key="k", hint="fix it")))
    data = one_json_failure(cli(*args(specs, tmp_path), "--json"), 2)
    assert data["error"] == "ConfigError" and data["key"] == "k"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unforeseen_exception_is_reported_as_a_bug_exiting_1(specs, tmp_path, monkeypatch, command):
    target, args = COMMANDS[command]
    _patch(monkeypatch, target, _raiser(ValueError("boom")))
    data = one_json_failure(cli(*args(specs, tmp_path), "--json", env={"MMER_DEBUG": None}), 1)
    assert data["error"] == "InternalError" and "ValueError" in data["message"] and "boom" in data["message"]
    assert "bug" in data["hint"] and "MMER_DEBUG=1" in data["hint"]
    text = one_text_failure(cli(*args(specs, tmp_path), env={"MMER_DEBUG": None}), 1)
    assert "internal error" in text


def test_with_mmer_debug_an_unforeseen_exception_is_raised_with_its_traceback(specs, tmp_path, monkeypatch):
    monkeypatch.setattr("mmer.build_plan", _raiser(ValueError("boom")))
    result = cli("merge", specs["base"], specs["vision"], "-o", tmp_path / "out", env={"MMER_DEBUG": "1"})
    assert isinstance(result.exception, ValueError) and result.exit_code == 1


def test_ctrl_c_under_json_is_one_json_document_exiting_130(specs, tmp_path, monkeypatch):
    monkeypatch.setattr("mmer.build_plan", _raiser(KeyboardInterrupt()))
    data = one_json_failure(cli("merge", specs["base"], specs["vision"], "-o", tmp_path / "out", "--json"), 130)
    assert data["error"] == "Interrupted" and "nothing was written" in data["message"]


def test_a_successful_json_run_prints_exactly_one_document(specs, tmp_path):
    result = cli("merge", specs["base"], specs["vision"], "-o", tmp_path / "out", "--json", "--dry-run")
    assert result.exit_code == 0, result
    assert json.loads(result.stdout)["ok"] is True


def test_an_mmer_error_subclass_defined_outside_errors_keeps_the_usage_default():
    class Custom(MmerError):
        pass

    assert Custom("x").exit_code == 2
    assert mmer.MmerError is MmerError


def test_paths_that_look_like_rich_markup_are_printed_as_they_are(specs, tmp_path):
    out = tmp_path / "runs[" / "x]" / "merged"  # the path holds "[/x]", which rich would read as a closing tag
    out.parent.mkdir(parents=True)
    merged = cli("merge", specs["base"], specs["vision"], "-o", out)
    assert merged.exit_code == 0, merged
    assert "merged into" in merged.stdout
    shown = cli("inspect-masks", out, "--png", out.parent / "m.png")
    assert shown.exit_code == 0, shown
    assert f"heatmap written to {out.parent / 'm.png'}" in shown.stdout


def test_extend_inspect_of_a_pack_manifest_with_wrong_types_is_one_json_failure(tmp_path):
    from test_bounded_parsing import pack_manifest, write_pack_manifest

    good = write_pack_manifest(tmp_path / "good", pack_manifest())
    shown = cli("extend", "inspect", good)
    assert shown.exit_code == 0, shown
    bad = pack_manifest()
    bad["layers"][0]["score"] = "high"
    data = one_json_failure(cli("extend", "inspect", write_pack_manifest(tmp_path / "bad", bad), "--json"), 1)
    assert data["key"] == "layers[0].score"


def test_ctrl_c_in_a_command_without_its_own_handler_is_reported_too(tmp_path, monkeypatch):
    monkeypatch.setattr("mmer.verify.verify", _raiser(KeyboardInterrupt()))
    assert one_json_failure(cli("verify", tmp_path, "--json"), 130)["error"] == "Interrupted"
    assert "interrupted" in one_text_failure(cli("verify", tmp_path), 130)
