"""Opening a decoupled checkpoint treats it as untrusted input: format version, paths and mask headers are
checked before anything is allocated or followed."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch
from conftest import base_state, finetune_state, write_model
from test_pipeline import recipe_for

import mmer
from mmer.checkpoint.decoupled import MaskFile, mask_metadata
from mmer.checkpoint.manifest import Manifest
from mmer.errors import DecoupledFormatError


@pytest.fixture(scope="module")
def merged(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoupled") / "out"
    mmer.run_merge(recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]}), out)
    return out


def _copy_with_manifest(merged, tmp_path, edit):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    data = json.loads((copy / "mmer_manifest.json").read_text())
    edit(data)
    raw = json.dumps(data).encode()
    (copy / "mmer_manifest.json").write_bytes(raw)
    (copy / "mmer_manifest.json.sha256").write_text(hashlib.sha256(raw).hexdigest() + "\n")  # resealed too
    return copy


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda d: d.update(format_version="3.0"), "upgrade mmer"),
        (lambda d: d.update(format="something-else"), "not an mmer manifest"),
        (lambda d: d["modalities"]["vision"].update(mask_file="../../etc/passwd"), "outside the checkpoint"),
        (lambda d: d["modalities"]["vision"].update(component_dir="/abs/path"), "outside the checkpoint"),
        (lambda d: d.update(tau_star_dir="C:\\\\x"), "outside the checkpoint"),
        (lambda d: d["files"].update({"../x": "0" * 64}), "outside the checkpoint"),
        (lambda d: d.pop("slots"), "malformed manifest"),
    ],
)
def test_a_hostile_or_newer_manifest_is_refused(merged, tmp_path, edit, fragment):
    copy = _copy_with_manifest(merged, tmp_path, edit)
    with pytest.raises(DecoupledFormatError, match=fragment):
        mmer.load_decoupled(copy)


def test_a_directory_without_a_manifest_is_not_a_checkpoint(tmp_path):
    with pytest.raises(DecoupledFormatError, match="mmer_manifest.json") as info:
        mmer.load_decoupled(tmp_path)
    assert info.value.hint


def _mask_file(path, shapes, tensors):
    """A mask file written by hand: header claims ``shapes`` while ``tensors`` hold the actual bytes."""
    header = {"__metadata__": mask_metadata(shapes)}
    offset = 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(tensors.values()))
    return path


def test_a_mask_header_claiming_an_absurd_shape_is_refused_before_allocating(tmp_path):
    path = _mask_file(tmp_path / "m.safetensors", {"w": [1 << 40, 1 << 20]}, {"w": b"\xff"})
    with pytest.raises(DecoupledFormatError, match="refused before allocating"):
        MaskFile(path)


def test_a_mask_whose_shape_disagrees_with_its_bytes_is_refused(tmp_path):
    path = _mask_file(tmp_path / "m.safetensors", {"w": [4, 4]}, {"w": b"\xff"})  # 16 bits need 2 bytes
    with pytest.raises(DecoupledFormatError, match="claims shape"):
        MaskFile(path)


def test_a_well_formed_mask_file_unpacks_to_its_shape(tmp_path):
    path = _mask_file(tmp_path / "m.safetensors", {"w": [3, 3]}, {"w": b"\xff\x01"})
    assert MaskFile(path).mask("w").all()


def test_integer_tensors_and_buffers_are_kept_from_the_base_and_not_merged(tmp_path):
    base = base_state()
    base["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(4, dtype=torch.float32)
    base["model.layers.1.mlp.step_count"] = torch.tensor([3], dtype=torch.int64)
    tuned = finetune_state({k: v for k, v in base.items() if v.is_floating_point()}, seed=1)
    tuned["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(4, dtype=torch.float32) * 2
    tuned["model.layers.1.mlp.step_count"] = torch.tensor([7], dtype=torch.int64)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "tuned", tuned)
    mmer.run_merge(recipe_for(tmp_path / "base", {"vision": tmp_path / "tuned"}), tmp_path / "out")
    manifest = Manifest.read(tmp_path / "out")
    reasons = {s.name: s.reason for s in manifest.slots if not s.merged}
    assert reasons == {
        "model.layers.0.self_attn.rotary_emb.inv_freq": "buffer",
        "model.layers.1.mlp.step_count": "integer dtype",
    }
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        assert torch.equal(ckpt.base_tensor("model.layers.1.mlp.step_count"), torch.tensor([3]))
