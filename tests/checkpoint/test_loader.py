"""One validated way into a checkpoint: the manifest is read once, checked against its sidecar, parsed bounded and
validated before any of it is used; every file the loader opens resolves inside the checkpoint; and a base kept by
reference is checked against the sha256 recorded at the merge before anything is rebuilt from it."""

from __future__ import annotations

import ast
import builtins
import hashlib
import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_pipeline import recipe_for

import mmer
from mmer.checkpoint import decoupled
from mmer.checkpoint.decoupled import MaskFile, mask_metadata
from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME, Manifest
from mmer.errors import CheckpointFormatError, DecoupledFormatError, MmerError, NonFiniteError, UnsafePathError
from mmer.inspect import inspect_masks
from mmer.route.reconstruct import reconstruct
from mmer.verify import verify

LIBRARY = Path(mmer.__file__).parent


@pytest.fixture(scope="module")
def merged(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "out"
    mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}), out)
    return out


@pytest.fixture
def ckpt(merged, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(merged, copy, symlinks=True)
    return copy


def edit_manifest(ckpt: Path, edit, reseal: bool = True, raw: bytes | None = None) -> None:
    """Edit the manifest; with ``reseal`` recompute its sidecar too, as someone who edits a checkpoint would."""
    if raw is None:
        data = json.loads((ckpt / MANIFEST_NAME).read_text())
        edit(data)
        raw = (json.dumps(data, indent=2) + "\n").encode()
    (ckpt / MANIFEST_NAME).write_bytes(raw)
    if reseal:
        (ckpt / MANIFEST_SHA_NAME).write_text(hashlib.sha256(raw).hexdigest() + "\n")


def rename_modality(name: str):
    def edit(data):
        record = data["modalities"].pop("vision")
        record.update(name=name, mask_file=f"masks/{name}.safetensors", component_dir=f"components/{name}")
        data["modalities"][name] = record

    return edit


# ---------------------------------------------------------------------------------------------- round trip
def test_a_fresh_checkpoint_loads_and_rebuilds(merged, tiny_models):
    with mmer.load_decoupled(merged) as ckpt:
        assert ckpt.modalities == ["vision"]
        rebuilt = ckpt.llm_tensor("vision", "model.norm.weight")
    assert rebuilt.shape == tiny_models["base"]["model.norm.weight"].shape


def test_the_manifest_is_read_once_and_the_same_bytes_are_checked_and_parsed(merged, monkeypatch):
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file).endswith(MANIFEST_NAME):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    Manifest.read(merged)
    assert len(opened) == 1


# ------------------------------------------------------------------------------------------------- sidecar
def test_an_edited_manifest_with_a_stale_sidecar_is_refused_and_its_scale_never_used(ckpt, tmp_path):
    edit_manifest(ckpt, lambda d: d["modalities"]["vision"].update(scale=1000.0), reseal=False)
    with pytest.raises(DecoupledFormatError, match="sha256 differs") as info:
        mmer.load_decoupled(ckpt)
    assert "edited after the merge" in info.value.hint and "mmer verify" in info.value.hint
    with pytest.raises(DecoupledFormatError, match="sha256 differs"):
        reconstruct(ckpt, tmp_path / "rebuilt", ["vision"])
    assert not (tmp_path / "rebuilt").exists()


def test_a_missing_sidecar_is_refused(ckpt):
    (ckpt / MANIFEST_SHA_NAME).unlink()
    with pytest.raises(DecoupledFormatError, match="missing") as info:
        mmer.load_decoupled(ckpt)
    assert info.value.file.endswith(MANIFEST_SHA_NAME) and info.value.hint


@pytest.mark.parametrize(
    "reader",
    [
        inspect_masks,
        lambda path: mmer.Router.from_pretrained(path, "cpu"),
        lambda path: mmer.add_models(path, [mmer.ModelSpec("x", modality="new")], None, dry_run=True),
    ],
    ids=["inspect-masks", "router", "add"],
)
def test_every_reader_refuses_a_stale_sidecar(ckpt, reader):
    edit_manifest(ckpt, lambda d: d["modalities"]["vision"].update(scale=2.0), reseal=False)
    with pytest.raises(DecoupledFormatError, match="sha256 differs"):
        reader(ckpt)


def test_no_library_module_reads_a_manifest_around_the_loader():
    """Only the checkpoint package opens a manifest or mask file itself; everyone else calls load_decoupled."""
    around = []
    for path in sorted(LIBRARY.rglob("*.py")):
        if path.parent.name == "checkpoint" or path.name == "verify.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                text = ast.unparse(node.func)
                if text in ("Manifest.read", "Manifest.from_dict", "read_manifest", "DecoupledCheckpoint"):
                    around.append(f"{path.relative_to(LIBRARY)}: {text}")
    assert around == []


# -------------------------------------------------------------------------------------- hostile manifests
@pytest.mark.parametrize("name", ["../../X", "/tmp/mmer-loader-abs", "base"])
def test_a_resealed_manifest_with_a_hostile_modality_name_is_refused_and_nothing_is_written(ckpt, tmp_path, name):
    edit_manifest(ckpt, rename_modality(name))
    with pytest.raises(DecoupledFormatError, match="modality name"):
        mmer.load_decoupled(ckpt)
    with pytest.raises(DecoupledFormatError):
        reconstruct(ckpt, tmp_path / "out" / "rebuilt")
    assert not (tmp_path / "out").exists() and not Path("/tmp/mmer-loader-abs").exists()
    assert not (tmp_path / "X").exists() and not (ckpt.parent.parent / "X").exists()


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{}", b'{"format": "mmer-decoupled", "x": NaN}', b"", b"{" * 3],
    ids=["deep", "not-utf8", "nan", "empty", "truncated"],
)
def test_a_resealed_manifest_that_is_not_json_is_one_clean_error(ckpt, raw):
    edit_manifest(ckpt, None, raw=raw)
    with pytest.raises(DecoupledFormatError) as info:
        mmer.load_decoupled(ckpt)
    assert MANIFEST_NAME in info.value.message and info.value.hint


def test_wrong_json_types_in_a_resealed_manifest_are_refused_naming_the_key(ckpt):
    edit_manifest(ckpt, lambda d: d["modalities"]["vision"].update(kept="lots"))
    with pytest.raises(DecoupledFormatError) as info:
        mmer.load_decoupled(ckpt)
    assert info.value.key == "modalities.vision.kept"


# ------------------------------------------------------------------------------------ files stay inside
def _outside_copy(ckpt: Path, rel: str, tmp_path: Path) -> Path:
    """Move ``rel`` out of the checkpoint and leave a link to it where it was."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    target = elsewhere / Path(rel).name
    shutil.move(ckpt / rel, target)
    (ckpt / rel).symlink_to(target)
    return target


@pytest.mark.parametrize("rel", [MANIFEST_NAME, MANIFEST_SHA_NAME])
def test_a_manifest_or_sidecar_linking_out_of_the_checkpoint_is_refused(ckpt, tmp_path, rel):
    _outside_copy(ckpt, rel, tmp_path)
    with pytest.raises(UnsafePathError, match="outside"):
        mmer.load_decoupled(ckpt)


def test_a_mask_file_linking_out_of_the_checkpoint_is_refused(ckpt, tmp_path):
    _outside_copy(ckpt, "masks/vision.safetensors", tmp_path)
    with mmer.load_decoupled(ckpt) as opened, pytest.raises(UnsafePathError, match="vision.safetensors"):
        opened.mask("vision", "model.norm.weight")


def test_a_private_tensor_file_linking_out_of_the_checkpoint_is_refused(ckpt, tmp_path):
    _outside_copy(ckpt, "components/vision/llm_private.safetensors", tmp_path)
    with mmer.load_decoupled(ckpt) as opened, pytest.raises(UnsafePathError, match="llm_private"):
        opened.private_tensor("vision", "model.embed_tokens.weight")


@pytest.mark.parametrize("rel", [MANIFEST_NAME, MANIFEST_SHA_NAME])
def test_a_manifest_that_is_not_a_regular_file_is_refused_without_blocking(ckpt, rel):
    (ckpt / rel).unlink()
    os.mkfifo(ckpt / rel)  # opening a FIFO for reading would wait for a writer forever
    with pytest.raises(DecoupledFormatError, match="not a regular file"):
        mmer.load_decoupled(ckpt)


def test_links_that_stay_inside_the_checkpoint_are_followed(ckpt):
    (ckpt / "masks" / "real.safetensors").write_bytes((ckpt / "masks" / "vision.safetensors").read_bytes())
    (ckpt / "masks" / "vision.safetensors").unlink()
    (ckpt / "masks" / "vision.safetensors").symlink_to("real.safetensors")
    with mmer.load_decoupled(ckpt) as opened:
        assert opened.mask("vision", "model.norm.weight").dtype == torch.bool


# ------------------------------------------------------------------------------------------ reference base
@pytest.fixture
def by_reference(tiny_models, tmp_path):
    """A checkpoint whose base is kept by reference (with its sha256 recorded), and that base's directory."""
    base = tmp_path / "base"
    shutil.copytree(tiny_models["base_dir"], base)
    out = tmp_path / "ref"
    recipe = recipe_for(base, {"vision": tiny_models["vision_dir"]}, base_storage="reference", hash_inputs=True)
    mmer.run_merge(recipe, out)
    return out, base


def change_base(base: Path) -> None:
    state = load_file(base / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] + 1
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})


def test_an_unchanged_reference_base_is_checked_once_per_open(by_reference, monkeypatch):
    out, _ = by_reference
    hashed = []
    real = decoupled.file_sha256
    monkeypatch.setattr(decoupled, "file_sha256", lambda p: hashed.append(p) or real(p))
    with mmer.load_decoupled(out) as ckpt:
        ckpt.llm_tensor("vision", "model.norm.weight")
        ckpt.llm_tensor("vision", "lm_head.weight")
    recorded = [n for n, d in Manifest.read(out).base.files.items() if d]
    assert sorted(p.name for p in hashed) == sorted(recorded)


def test_a_reference_base_changed_after_the_merge_is_refused_naming_the_file(by_reference, tmp_path):
    out, base = by_reference
    change_base(base)
    with mmer.load_decoupled(out) as ckpt, pytest.raises(DecoupledFormatError, match="model.safetensors") as info:
        ckpt.llm_tensor("vision", "model.norm.weight")
    assert "differs from the one merged" in info.value.message and info.value.hint
    with pytest.raises(DecoupledFormatError, match="model.safetensors"):
        reconstruct(out, tmp_path / "rebuilt", ["vision"])
    assert not (tmp_path / "rebuilt").exists()


def test_a_missing_reference_base_file_is_refused(by_reference):
    out, base = by_reference
    (base / "model.safetensors").rename(base / "moved.safetensors")
    with mmer.load_decoupled(out) as ckpt, pytest.raises(MmerError):
        ckpt.llm_tensor("vision", "model.norm.weight")


# ------------------------------------------------------------------------------------------ mask metadata
def _mask_file(path: Path, metadata: dict, tensors: dict[str, bytes]) -> Path:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(tensors.values()))
    return path


@pytest.mark.parametrize(
    "shapes",
    ['{"w": [true, 8]}', '{"w": [2.0, 4]}', "[[8]]", '"w"', '{"w": [-8]}', "[" * 10_000, "{not json", '{"w": 8}'],
    ids=["bool-dim", "float-dim", "list", "string", "negative", "deep", "not-json", "not-a-list"],
)
def test_malformed_mask_shapes_are_a_clean_format_error(tmp_path, shapes):
    metadata = {**mask_metadata({}), "shapes": shapes}
    path = _mask_file(tmp_path / "m.safetensors", metadata, {"w": b"\xff"})
    with pytest.raises(DecoupledFormatError):
        MaskFile(path)


def test_a_mask_file_without_shapes_is_a_clean_format_error(tmp_path):
    metadata = {k: v for k, v in mask_metadata({"w": [8]}).items() if k != "shapes"}
    with pytest.raises(DecoupledFormatError, match="shapes"):
        MaskFile(_mask_file(tmp_path / "m.safetensors", metadata, {"w": b"\xff"}))


def test_any_bytes_in_a_mask_file_end_in_a_format_error_or_a_valid_mask(tmp_path):
    good = _mask_file(tmp_path / "good.safetensors", mask_metadata({"w": [3, 5]}), {"w": b"\xff\x7f"}).read_bytes()
    rng = random.Random(13)
    path = tmp_path / "fuzzed.safetensors"
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        path.write_bytes(bytes(data))
        try:
            masks = MaskFile(path)
            for name in masks.shapes:
                masks.mask(name)
        except (DecoupledFormatError, CheckpointFormatError):
            pass


# --------------------------------------------------------------------- stored tensors agree with the manifest
def rewrite_header(path: Path, edit) -> None:
    """Re-frame a safetensors file with an edited header over the same data bytes (a well-formed header that lies)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _transpose(name):
    def edit(header):
        header[name]["shape"] = header[name]["shape"][::-1]

    return edit


def _retype(name, dtype):
    def edit(header):
        header[name]["dtype"] = dtype

    return edit


def _rename(name):
    def edit(header):
        header[name + ".renamed"] = header.pop(name)

    return edit


LYING_HEADERS = {
    "base-retyped": ("base/model.safetensors", _retype("model.norm.weight", "I32")),
    "base-transposed": ("base/model.safetensors", _transpose("lm_head.weight")),
    "base-renamed": ("base/model.safetensors", _rename("model.norm.weight")),
    "tau-renamed": ("tau_star/model.safetensors", _rename("model.norm.weight")),
    "tau-transposed": ("tau_star/model.safetensors", _transpose("lm_head.weight")),
    "private-retyped": ("components/vision/llm_private.safetensors", _retype("lm_head.weight", "I32")),
    "private-transposed": ("components/vision/llm_private.safetensors", _transpose("lm_head.weight")),
}


@pytest.mark.parametrize("case", list(LYING_HEADERS))
def test_a_stored_header_that_disagrees_with_the_manifest_is_refused_naming_file_and_tensor(ckpt, tmp_path, case):
    """Class 7 (and 2): renamed, dropped, transposed or re-typed tensors are refused when their file is opened,
    from the headers alone, whichever tensor is asked for; verify reports the same refusal."""
    rel, edit = LYING_HEADERS[case]
    rewrite_header(ckpt / rel, edit)
    tensor = (
        "lm_head.weight" if "lm_head" in case or "private" in case or "transposed" in case else "model.norm.weight"
    )
    with mmer.load_decoupled(ckpt) as opened, pytest.raises(DecoupledFormatError) as info:
        for name in ("model.norm.weight", "lm_head.weight"):
            opened.llm_tensor("vision", name)
    assert rel.split("/")[0] in info.value.file and tensor in info.value.tensor
    assert "mmer verify" in info.value.hint
    with pytest.raises(DecoupledFormatError):
        reconstruct(ckpt, tmp_path / "rebuilt", ["vision"])
    report = verify(ckpt)
    assert not report.ok and any(info.value.message in p for p in report.problems)


def test_every_reader_inherits_the_header_check(ckpt):
    rewrite_header(ckpt / "base/model.safetensors", _retype("model.norm.weight", "I32"))
    with pytest.raises(DecoupledFormatError, match="model.norm.weight"):
        mmer.Router.from_pretrained(ckpt, "cpu")


def test_a_tensor_missing_from_a_checkpoint_directory_is_a_format_error_naming_it(merged):
    from mmer.io.reader import CheckpointReader

    with CheckpointReader(merged / "base") as reader, pytest.raises(CheckpointFormatError) as info:
        reader.get("model.no_such.weight")
    assert info.value.tensor == "model.no_such.weight" and str(merged / "base") in info.value.file
    assert info.value.hint


# ------------------------------------------------------------------------------------------------- scale
@pytest.mark.parametrize("scale", [1e308, 1e7, 0.0, -1.0])
def test_a_scale_outside_what_emr_computes_is_refused_by_the_schema(ckpt, tmp_path, scale):
    """Class 3: EMR's rescaler is a positive ratio of mean magnitudes, never near the float limits."""
    edit_manifest(ckpt, lambda d: d["modalities"]["vision"].update(scale=scale))
    with pytest.raises(DecoupledFormatError) as info:
        mmer.load_decoupled(ckpt)
    assert info.value.key == "modalities.vision.scale"
    with pytest.raises(DecoupledFormatError):
        reconstruct(ckpt, tmp_path / "rebuilt", ["vision"])
    assert not verify(ckpt).ok


def test_a_rebuilt_tensor_that_overflows_the_base_dtype_is_refused_naming_modality_and_tensor(ckpt, tmp_path):
    name = "model.norm.weight"
    with mmer.load_decoupled(ckpt) as opened:
        kept = opened.mask("vision", name).reshape(-1).nonzero()[0]
    tau = load_file(ckpt / "tau_star/model.safetensors")
    tau[name].reshape(-1)[kept] = 3e38
    save_file(tau, str(ckpt / "tau_star/model.safetensors"), metadata={"format": "mmer-tau-star/1"})
    edit_manifest(ckpt, lambda d: d["modalities"]["vision"].update(scale=2.0))
    with mmer.load_decoupled(ckpt) as opened, pytest.raises(NonFiniteError) as info:
        opened.llm_tensor("vision", name)
    assert info.value.tensor == name and "vision" in info.value.message and info.value.hint
    with pytest.raises(NonFiniteError):
        reconstruct(ckpt, tmp_path / "rebuilt", ["vision"])
    assert not (tmp_path / "rebuilt").exists()
    # Router.from_pretrained refuses it too: tests/route/test_switch_kernel.py (this fixture's components are stubs)


# ----------------------------------------------------------------------------------------- private records
def _private(data, name):
    return next(p for p in data["modalities"]["vision"]["private"] if p["name"] == name)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: _private(d, "lm_head.weight").update(row_start=0),
        lambda d: _private(d, "lm_head.weight").update(row_start=39),
        lambda d: _private(d, "lm_head.weight").update(shape=[2, 8]),
        lambda d: _private(d, "model.embed_tokens.weight").update(shape=[3, 16]),
        lambda d: d["modalities"]["vision"]["private"].append(dict(_private(d, "lm_head.weight"))),
        lambda d: _private(d, "lm_head.weight").update(name="model.norm.weight"),
    ],
    ids=[
        "whole-tensor-of-a-merged-slot",
        "not-after-the-base-rows",
        "other-width",
        "not-vocab-size",
        "twice",
        "not-a-vocabulary-tensor",
    ],
)
def test_a_private_record_that_the_writer_would_not_make_is_refused(ckpt, tmp_path, edit):
    """Class 4: row_start is the slot's rows (shared-rows) or 0 for a slot kept out (exclude), with the slot's
    width and the model's vocab_size rows; anything else would rebuild a tensor of another shape."""
    edit_manifest(ckpt, edit)
    with pytest.raises(DecoupledFormatError) as info:
        mmer.load_decoupled(ckpt)
    assert info.value.key.startswith("modalities.vision.private") and info.value.hint
    with pytest.raises(DecoupledFormatError):
        reconstruct(ckpt, tmp_path / "rebuilt", ["vision"])
    assert not verify(ckpt).ok


def test_checkpoints_under_vocab_policy_exclude_still_load_whole_private_tensors(tiny_models, tmp_path):
    out = tmp_path / "exclude"
    mmer.run_merge(
        recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}, vocab_policy="exclude"), out
    )
    assert verify(out).ok
    with mmer.load_decoupled(out) as opened:
        rebuilt = opened.llm_tensor("vision", "lm_head.weight")
    assert torch.equal(rebuilt, tiny_models["vision"]["lm_head.weight"])


# ------------------------------------------------------------------------------------------------- slots
@pytest.mark.parametrize("shape", [[], [640], [40, 16, 1]])
def test_a_vocabulary_slot_that_is_not_two_dimensional_is_refused(ckpt, tmp_path, shape):
    """Class 5: embeddings and lm_head are [rows, hidden]; private rows are appended to the first dimension."""
    edit_manifest(ckpt, lambda d: next(s for s in d["slots"] if s["name"] == "lm_head.weight").update(shape=shape))
    with pytest.raises(DecoupledFormatError):
        mmer.load_decoupled(ckpt)
    with pytest.raises(DecoupledFormatError):
        reconstruct(ckpt, tmp_path / "rebuilt", ["vision"])
    assert not verify(ckpt).ok


def test_a_slot_shape_that_disagrees_with_the_stored_tensor_is_refused_on_opening(ckpt):
    edit_manifest(ckpt, lambda d: next(s for s in d["slots"] if s["name"] == "model.norm.weight").update(shape=[8, 2]))
    with mmer.load_decoupled(ckpt) as opened, pytest.raises(DecoupledFormatError, match="model.norm.weight"):
        opened.llm_tensor("vision", "model.norm.weight")


# ------------------------------------------------------------------------------------------------- masks
def _mask_shapes(ckpt: Path, edit) -> None:
    def header_edit(header):
        shapes = json.loads(header["__metadata__"]["shapes"])
        edit(shapes)
        header["__metadata__"]["shapes"] = json.dumps(shapes)

    rewrite_header(ckpt / "masks/vision.safetensors", header_edit)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.update({"lm_head.weight": s["lm_head.weight"][::-1]}),
        lambda s: s.update({"lm_head.weight": [s["lm_head.weight"][0] * s["lm_head.weight"][1]]}),
    ],
    ids=["transposed", "flattened"],
)
def test_mask_shapes_that_fit_the_bytes_but_not_the_slot_are_refused(ckpt, tmp_path, edit):
    """Class 6: a claimed shape is checked against the manifest's slot, not only against the packed bytes."""
    _mask_shapes(ckpt, edit)
    with mmer.load_decoupled(ckpt) as opened, pytest.raises(DecoupledFormatError) as info:
        opened.llm_tensor("vision", "model.norm.weight")
    assert info.value.tensor == "lm_head.weight" and info.value.file.endswith("vision.safetensors")
    with pytest.raises(DecoupledFormatError):
        reconstruct(ckpt, tmp_path / "rebuilt", ["vision"])
    with pytest.raises(DecoupledFormatError):
        inspect_masks(ckpt)
    assert not verify(ckpt).ok


def test_two_tensors_written_back_under_one_key_are_refused(ckpt):
    """A rebuilt model writes each canonical tensor under its source's own key: two under one key would make
    reconstruct plan a file with a tensor twice (found by the manifest fuzzer)."""

    def collide(data):
        keys = data["modalities"]["vision"]["llm_keys"]
        first, second = sorted(keys)[:2]
        keys[second] = keys[first]

    edit_manifest(ckpt, collide)
    with pytest.raises(DecoupledFormatError) as info:
        mmer.load_decoupled(ckpt)
    assert info.value.key == "modalities.vision.llm_keys" and "same key" in info.value.message
