"""Every YAML and JSON file mmer reads may be hostile: each is parsed in bounded time and memory, and each way it
can be wrong (alias bombs, nesting, huge integers, NaN, bytes that are not UTF-8, the wrong JSON type) is one
MmerError naming the file, never a hang, a RecursionError or a raw ValueError."""

from __future__ import annotations

import json
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
from safetensors.torch import save_file

from mmer.config import MAX_YAML_BYTES, load_recipe, load_spec
from mmer.errors import CheckpointFormatError, ConfigError, MmerError
from mmer.extend import load_moextend_recipe
from mmer.io.reader import CheckpointReader, read_json, read_safetensors_header

# A "billion laughs": 468 bytes whose nine levels of aliases expand to 9**9 strings.
ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
)

HOSTILE_JSON = {
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "nested past the depth cap": b'{"a": ' * 100 + b"1" + b"}" * 100,
    "a huge integer": b'{"hidden_size": ' + b"9" * 5000 + b"}",
    "NaN": b'{"hidden_size": NaN}',
    "a float that overflows": b'{"rms_norm_eps": 1e999}',
    "bytes that are not UTF-8": b'{"model_type": "\xff\xfe"}',
}


def bounded(loader, path: Path) -> MmerError:
    """Run ``loader(path)``, which must refuse, fast and in little memory; return the error."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(MmerError) as info:
            loader(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 20 * 1024 * 1024, f"{peak} bytes"
    assert str(path) in (info.value.file or "") or str(path) in info.value.message
    assert info.value.hint
    return info.value


# ---------------------------------------------------------------------------------------------------- YAML
@pytest.mark.parametrize("loader", [load_spec, load_recipe, load_moextend_recipe], ids=["spec", "recipe", "moextend"])
def test_a_yaml_alias_bomb_is_refused_at_once_in_little_memory(tmp_path, loader):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB + "\n")
    assert bomb.stat().st_size < 500

    err = bounded(loader, bomb)

    assert type(err) is ConfigError and err.exit_code == 2
    assert "anchor" in err.message and "line 1" in err.message
    assert "alias" in err.hint


def test_an_alias_is_refused_even_when_it_expands_to_little(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: &m /models/llava\nrevision: *m\n")
    with pytest.raises(ConfigError, match="anchor"):
        load_spec(spec)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("model: " + "[" * 5000 + "]" * 5000, "nests more than"),
        ("model: x\nlambda: " + "9" * 5000, "integer of 5000 characters"),
        ("model: x\nmodality: !!python/object/apply:os.system [echo]", "not valid YAML"),
        ("model: x\n\x00", "not valid YAML"),
        ("- model: x\n", "must be a mapping"),
    ],
    ids=["deep", "huge-int", "python-tag", "nul", "a-list"],
)
def test_a_hostile_spec_is_one_config_error_naming_the_file(tmp_path, text, says):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(ConfigError, match=says) as info:
        load_spec(spec)
    assert info.value.file == str(spec)


def test_a_spec_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"model: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text .* at byte 10") as info:
        load_spec(spec)
    assert info.value.file == str(spec) and "UTF-8" in info.value.hint


def test_a_yaml_file_larger_than_any_recipe_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match="too large"):
        load_recipe(big)


def test_a_directory_given_as_a_spec_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_spec(tmp_path)


# ---------------------------------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("raw", list(HOSTILE_JSON.values()), ids=list(HOSTILE_JSON))
def test_a_hostile_config_json_is_a_checkpoint_format_error(tmp_path, raw):
    config = tmp_path / "config.json"
    config.write_bytes(raw)
    err = bounded(read_json, config)
    assert type(err) is CheckpointFormatError and err.exit_code == 1


def test_a_config_json_of_the_wrong_type_is_refused(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("[1, 2, 3]")
    with pytest.raises(CheckpointFormatError, match="not a JSON object"):
        read_json(config)


def sharded(tmp_path: Path, tiny_models) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_models["base_dir"], model)
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    return model


@pytest.mark.parametrize("raw", list(HOSTILE_JSON.values()), ids=list(HOSTILE_JSON))
def test_a_hostile_index_is_a_checkpoint_format_error(tmp_path, tiny_models, raw):
    model = sharded(tmp_path, tiny_models)
    (model / "model.safetensors.index.json").write_bytes(raw)
    err = bounded(CheckpointReader, model)
    assert type(err) is CheckpointFormatError and "index" in err.message


def test_an_index_whose_weight_map_is_the_wrong_type_is_refused(tmp_path, tiny_models):
    model = sharded(tmp_path, tiny_models)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(CheckpointFormatError, match="weight_map"):
        CheckpointReader(model)


def header_file(path: Path, header: bytes) -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


@pytest.mark.parametrize("raw", list(HOSTILE_JSON.values()), ids=list(HOSTILE_JSON))
def test_a_hostile_safetensors_header_is_a_checkpoint_format_error(tmp_path, raw):
    err = bounded(read_safetensors_header, header_file(tmp_path / "model.safetensors", raw))
    assert type(err) is CheckpointFormatError


def test_a_header_naming_a_tensor_twice_is_still_refused(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    path = header_file(tmp_path / "model.safetensors", f'{{"w": {entry}, "w": {entry}}}'.encode())
    with pytest.raises(CheckpointFormatError, match="'w' twice"):
        read_safetensors_header(path)


@pytest.mark.parametrize("metadata", [[1, 2], {"format": 3}, "pt"], ids=["a-list", "a-number-value", "a-string"])
def test_header_metadata_that_is_not_strings_to_strings_is_refused(tmp_path, metadata):
    path = header_file(tmp_path / "model.safetensors", json.dumps({"__metadata__": metadata}).encode())
    with pytest.raises(CheckpointFormatError, match="__metadata__"):
        read_safetensors_header(path)


def test_a_well_formed_header_still_reads(tmp_path):
    import torch

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2, 3)}, str(path), metadata={"format": "pt"})
    infos, metadata = read_safetensors_header(path)
    assert infos["w"].shape == (2, 3) and metadata == {"format": "pt"}


# ------------------------------------------------------------------------------------ extension pack manifest
def pack_manifest() -> dict:
    """A well-formed MoExtend pack manifest (what `mmer extend train` writes), without its tensors."""
    from mmer.extend.pack import PACK_FORMAT, PACK_FORMAT_VERSION

    return {
        "format": PACK_FORMAT,
        "format_version": PACK_FORMAT_VERSION,
        "modality": "vision",
        "stage": "extend",
        "base": {
            "model_type": "olmoe",
            "architecture": "OlmoeForCausalLM",
            "sha256": "0" * 64,
            "dtype": "float32",
            "num_hidden_layers": 2,
            "hidden_size": 16,
            "moe_layers": {"0": 4, "1": 4},
        },
        "layers": [{"layer": 1, "base_experts": 4, "new_experts": 2, "source_experts": [0, 3], "score": 0.5}],
        "calibration": {"form": "additive_mlp", "hidden": 8, "dtype": "float32"},
        "projector": None,
        "tensors": {
            "file": "extension.safetensors",
            "sha256": None,
            "parameters": 10,
            "entries": {"x": {"dtype": "F32", "shape": [10]}},
        },
    }


def write_pack_manifest(directory: Path, manifest: dict) -> Path:
    from mmer.extend import PACK_MANIFEST

    directory.mkdir(parents=True, exist_ok=True)
    (directory / PACK_MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_a_well_formed_pack_manifest_reads(tmp_path):
    from mmer.extend import read_pack_manifest

    assert read_pack_manifest(write_pack_manifest(tmp_path, pack_manifest()))["modality"] == "vision"


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("modality",), 5),
        (("base",), "olmoe"),
        (("base", "num_hidden_layers"), "2"),
        (("base", "hidden_size"), True),
        (("layers",), {"layer": 1}),
        (("layers", 0), [1, 2]),
        (("layers", 0, "new_experts"), 2.5),
        (("layers", 0, "score"), "high"),
        (("tensors", "entries"), []),
        (("tensors", "entries", "x", "shape"), "10"),
        (("calibration", "hidden"), None),
        (("projector",), {"kind": "mlp", "in_features": "8", "placeholder_id": 3}),
    ],
    ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else type(v).__name__,
)
def test_a_pack_manifest_field_of_the_wrong_type_is_refused_naming_it(tmp_path, where, value):
    from mmer.extend import read_pack_manifest

    manifest = pack_manifest()
    node = manifest
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(CheckpointFormatError, match="must be|not an object") as info:
        read_pack_manifest(write_pack_manifest(tmp_path, manifest))
    assert info.value.key and info.value.exit_code == 1
