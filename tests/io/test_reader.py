"""CheckpointReader: every malformed checkpoint is refused with a named, actionable error; good ones read back."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmer.errors import CheckpointFormatError
from mmer.io.reader import (
    BIN_INDEX,
    BIN_SINGLE,
    MAX_HEADER_BYTES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    CheckpointReader,
    read_safetensors_header,
)

# ----------------------------------------------------------------------------------------------- helpers


def raw_safetensors(path: Path, header: dict | bytes | str, data: bytes = b"") -> Path:
    """Write a safetensors file by hand: 8-byte little-endian header length, header bytes, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def one_tensor(dtype="F32", shape=(2,), offsets=(0, 8), data_len=8, name="w") -> tuple[dict, bytes]:
    entry = {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": offsets}
    if isinstance(offsets, tuple):
        entry["data_offsets"] = list(offsets)
    return {name: entry}, b"\x00" * data_len


def write_index(directory: Path, weight_map: dict[str, str], name: str = SAFETENSORS_INDEX) -> Path:
    index = directory / name
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def shard(directory: Path, name: str, names: list[str]) -> Path:
    path = directory / name
    save_file({n: torch.full((2,), float(i)) for i, n in enumerate(names)}, str(path))
    return path


@dataclass
class Expect:
    """What the error must say: the file it is about, and the tensor where there is one."""

    file: Path
    tensor: str | None = None
    says: str = ""


# ---------------------------------------------------------------------------------------- bad input cases


def short_file(d: Path) -> Expect:
    f = d / SAFETENSORS_SINGLE
    f.write_bytes(b"\x01\x02\x03")
    return Expect(f, says="truncated")


def header_length_beyond_file(d: Path) -> Expect:
    f = d / SAFETENSORS_SINGLE
    f.write_bytes(struct.pack("<Q", 4096) + b'{"w": {}}')
    return Expect(f, says="truncated")


def header_length_over_cap(d: Path) -> Expect:
    f = d / SAFETENSORS_SINGLE
    f.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    return Expect(f, says="limit")


def header_not_json(d: Path) -> Expect:
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, b'{"w": {"dtype": '), says="not valid JSON")


def header_not_utf8(d: Path) -> Expect:
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, b"\xff\xfe\xfd\xfc"), says="not UTF-8")


def header_not_an_object(d: Path) -> Expect:
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, b"[1, 2, 3]"), says="not a JSON object")


def entry_not_an_object(d: Path) -> Expect:
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, {"w": [1, 2]}), tensor="w", says="not an object")


def unknown_dtype(d: Path) -> Expect:
    header, data = one_tensor(dtype="F7")
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="unknown dtype 'F7'")


def negative_shape(d: Path) -> Expect:
    header, data = one_tensor(shape=[-2])
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="shape")


def float_shape(d: Path) -> Expect:
    header, data = one_tensor(shape=[2.0])
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="shape")


def string_shape(d: Path) -> Expect:
    header, data = one_tensor(shape=["2"])
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="shape")


def bool_shape(d: Path) -> Expect:
    header, data = one_tensor(shape=[True, True])
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="shape")


def shape_not_a_list(d: Path) -> Expect:
    header, data = one_tensor(shape=2)
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="shape")


def offsets_not_a_pair(d: Path) -> Expect:
    header, data = one_tensor(offsets=[0])
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="data_offsets")


def offsets_past_the_data(d: Path) -> Expect:
    header, data = one_tensor(offsets=(0, 8), data_len=4)
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="outside")


def offsets_reversed(d: Path) -> Expect:
    header, data = one_tensor(offsets=(8, 0), data_len=8)
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="outside")


def offsets_negative(d: Path) -> Expect:
    header, data = one_tensor(offsets=(-8, 0), data_len=8)
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="outside")


def byte_count_disagrees_with_shape(d: Path) -> Expect:
    header, data = one_tensor(dtype="F32", shape=(3,), offsets=(0, 8), data_len=8)
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="need 12")


def byte_count_disagrees_with_dtype(d: Path) -> Expect:
    header, data = one_tensor(dtype="BF16", shape=(2,), offsets=(0, 8), data_len=8)
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, header, data), tensor="w", says="need 4")


def duplicate_name_in_header(d: Path) -> Expect:
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = '{"w": ' + entry + ', "w": ' + entry + "}"
    return Expect(raw_safetensors(d / SAFETENSORS_SINGLE, raw, b"\x00" * 4), tensor="w", says="twice")


def index_names_missing_shard(d: Path) -> Expect:
    shard(d, "model-00001-of-00002.safetensors", ["a"])
    write_index(d, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    return Expect(d / "model-00002-of-00002.safetensors", says="missing")


def index_names_tensor_not_in_shard(d: Path) -> Expect:
    shard(d, "model-00001-of-00001.safetensors", ["a"])
    write_index(d, {"a": "model-00001-of-00001.safetensors", "ghost": "model-00001-of-00001.safetensors"})
    return Expect(d / "model-00001-of-00001.safetensors", tensor="ghost", says="does not hold")


def index_puts_tensor_in_the_wrong_shard(d: Path) -> Expect:
    shard(d, "model-00001-of-00002.safetensors", ["a"])
    shard(d, "model-00002-of-00002.safetensors", ["b"])
    write_index(d, {"a": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    return Expect(d / "model-00002-of-00002.safetensors", tensor="a", says="does not hold")


def index_names_tensor_twice(d: Path) -> Expect:
    shard(d, "model-00001-of-00001.safetensors", ["a"])
    index = d / SAFETENSORS_INDEX
    index.write_text(
        '{"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors", '
        '"a": "model-00001-of-00001.safetensors"}}'
    )
    return Expect(index, tensor="a", says="twice")


def index_shard_path_escapes(d: Path) -> Expect:
    inner = d / "ckpt"
    inner.mkdir()
    shard(d, "evil.safetensors", ["a"])  # exists, so only the path check can refuse it
    index = write_index(inner, {"a": "../evil.safetensors"})
    return Expect(index, says="outside the checkpoint")


def index_shard_path_absolute(d: Path) -> Expect:
    inner = d / "ckpt"
    inner.mkdir()
    evil = shard(d, "evil.safetensors", ["a"])
    index = write_index(inner, {"a": str(evil)})
    return Expect(index, says="outside the checkpoint")


def index_not_json(d: Path) -> Expect:
    shard(d, "model-00001-of-00001.safetensors", ["a"])
    index = d / SAFETENSORS_INDEX
    index.write_text('{"weight_map": ')
    return Expect(index, says="not valid JSON")


def index_without_weight_map(d: Path) -> Expect:
    shard(d, "model-00001-of-00001.safetensors", ["a"])
    index = d / SAFETENSORS_INDEX
    index.write_text(json.dumps({"metadata": {}}))
    return Expect(index, says="weight_map")


def two_shards_hold_the_same_tensor(d: Path) -> Expect:
    shard(d, "model-00001-of-00002.safetensors", ["a", "b"])
    shard(d, "model-00002-of-00002.safetensors", ["b", "c"])
    write_index(
        d,
        {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    )
    return Expect(d / "model-00002-of-00002.safetensors", tensor="b", says="stored twice")


def no_weight_files(d: Path) -> Expect:
    (d / "config.json").write_text("{}")
    return Expect(d, says="no weight files")


def bin_is_garbage(d: Path) -> Expect:
    f = d / BIN_SINGLE
    f.write_bytes(b"this is not a zip nor a pickle" * 10)
    return Expect(f, says="cannot be read")


def bin_holds_a_list(d: Path) -> Expect:
    f = d / BIN_SINGLE
    torch.save([torch.zeros(2), torch.ones(2)], f)
    return Expect(f, says="not a flat dict")


def bin_holds_non_tensor_values(d: Path) -> Expect:
    f = d / BIN_SINGLE
    torch.save({"a": torch.zeros(2), "step": 3}, f)
    return Expect(f, says="not a flat dict")


def bin_index_names_missing_shard(d: Path) -> Expect:
    torch.save({"a": torch.zeros(2)}, d / "pytorch_model-00001-of-00002.bin")
    write_index(
        d,
        {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"},
        name=BIN_INDEX,
    )
    return Expect(d / "pytorch_model-00002-of-00002.bin", says="missing")


BAD_CASES: list[tuple[str, Callable[[Path], Expect]]] = [
    # (id, builder)
    ("file shorter than 8 bytes", short_file),
    ("header length larger than the file", header_length_beyond_file),
    ("header length over the 100MB cap", header_length_over_cap),
    ("header not JSON", header_not_json),
    ("header not UTF-8", header_not_utf8),
    ("header a JSON array, not an object", header_not_an_object),
    ("header entry not an object", entry_not_an_object),
    ("unknown dtype", unknown_dtype),
    ("negative shape", negative_shape),
    ("float in shape", float_shape),
    ("string in shape", string_shape),
    ("bool in shape", bool_shape),
    ("shape not a list", shape_not_a_list),
    ("data_offsets not a pair", offsets_not_a_pair),
    ("data_offsets past the end of the data", offsets_past_the_data),
    ("data_offsets reversed", offsets_reversed),
    ("data_offsets negative", offsets_negative),
    ("byte count disagrees with shape", byte_count_disagrees_with_shape),
    ("byte count disagrees with dtype", byte_count_disagrees_with_dtype),
    ("duplicate tensor name in a header", duplicate_name_in_header),
    ("index names a missing shard", index_names_missing_shard),
    ("index names a tensor its shard does not hold", index_names_tensor_not_in_shard),
    ("index puts a tensor in the wrong shard", index_puts_tensor_in_the_wrong_shard),
    ("index JSON names the same tensor twice", index_names_tensor_twice),
    ("index shard path with ..", index_shard_path_escapes),
    ("index shard path absolute", index_shard_path_absolute),
    ("index not JSON", index_not_json),
    ("index without weight_map", index_without_weight_map),
    ("two shards hold the same tensor", two_shards_hold_the_same_tensor),
    ("no weight files at all", no_weight_files),
    ("bin file is garbage", bin_is_garbage),
    ("bin file holds a list", bin_holds_a_list),
    ("bin file holds non-tensor values", bin_holds_non_tensor_values),
    ("bin index names a missing shard", bin_index_names_missing_shard),
]


def _checkpoint_dir(tmp_path: Path, build: Callable[[Path], Expect]) -> tuple[Path, Expect]:
    expect = build(tmp_path)
    inner = tmp_path / "ckpt"
    return (inner if inner.is_dir() else tmp_path), expect


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in BAD_CASES])
def test_a_bad_checkpoint_is_refused_with_an_error_naming_the_file_and_tensor(tmp_path, build):
    directory, expect = _checkpoint_dir(tmp_path, build)
    with pytest.raises(CheckpointFormatError) as info:
        CheckpointReader(directory)
    err = info.value
    assert type(err) is CheckpointFormatError
    assert err.file == str(expect.file)
    assert expect.file.name in err.message
    assert expect.says in err.message
    assert err.tensor == expect.tensor
    if expect.tensor is not None:
        assert repr(expect.tensor) in err.message


@pytest.mark.parametrize(
    "build",
    [pytest.param(b, id=i) for i, b in BAD_CASES],
)
def test_a_bad_checkpoint_error_carries_a_hint_saying_what_to_do(tmp_path, build):
    directory, _ = _checkpoint_dir(tmp_path, build)
    with pytest.raises(CheckpointFormatError) as info:
        CheckpointReader(directory)
    assert info.value.hint
    assert f"Fix: {info.value.hint}" in str(info.value)


def test_a_bad_header_is_named_by_read_safetensors_header_too(tmp_path):
    header, data = one_tensor(dtype="F32", shape=(3,), offsets=(0, 8), data_len=8)
    f = raw_safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(CheckpointFormatError) as info:
        read_safetensors_header(f)
    assert info.value.file == str(f) and info.value.tensor == "w"


def test_the_no_weights_hint_names_an_unindexed_shard_that_was_found(tmp_path):
    shard(tmp_path, "model-00001-of-00002.safetensors", ["a"])
    with pytest.raises(CheckpointFormatError) as info:
        CheckpointReader(tmp_path)
    hint = info.value.hint
    assert hint is not None
    assert "model-00001-of-00002.safetensors" in hint
    assert SAFETENSORS_INDEX in hint


def test_the_no_weights_hint_for_an_empty_directory_says_which_files_are_expected(tmp_path):
    with pytest.raises(CheckpointFormatError) as info:
        CheckpointReader(tmp_path)
    assert "model.safetensors" in info.value.hint
    assert "pytorch_model.bin" in info.value.hint


def test_a_bin_whose_pickle_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"echo pwned > {marker}",))

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"w": torch.zeros(2), "evil": Payload()}, ckpt / BIN_SINGLE)

    with pytest.raises(CheckpointFormatError) as info:
        CheckpointReader(ckpt)
    err = info.value
    assert "weights_only" in err.message
    assert err.file == str(ckpt / BIN_SINGLE)
    assert err.hint and "safetensors" in err.hint
    assert not marker.exists()

    # Control: the payload is live, so the refusal above is what kept it from running.
    torch.load(ckpt / BIN_SINGLE, weights_only=False)
    assert marker.exists()


# -------------------------------------------------------------------------------------------- good cases


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g).to(torch.float16),
        "model.norm.weight": torch.ones(4),
        "lm_head.weight": torch.randn(8, 4, generator=g),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def assert_reads_back(reader: CheckpointReader, tensors: dict[str, torch.Tensor]) -> None:
    assert set(reader.tensors) == set(tensors)
    for name, t in tensors.items():
        info = reader.tensors[name]
        assert info.dtype == t.dtype and info.shape == tuple(t.shape)
        assert info.nbytes == t.numel() * t.element_size()
        assert name in reader
        got = reader.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t)


def split(tensors: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    names = list(tensors)
    return [{k: tensors[k] for k in names[i::n]} for i in range(n)]


def write_single_safetensors(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(d / SAFETENSORS_SINGLE))


def write_sharded_safetensors(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    parts = split(tensors, 3)
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(d / name))
        weight_map.update(dict.fromkeys(part, name))
    write_index(d, weight_map)


def write_single_bin(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    torch.save(tensors, d / BIN_SINGLE)


def write_sharded_bin(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    parts = split(tensors, 2)
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin"
        torch.save(part, d / name)
        weight_map.update(dict.fromkeys(part, name))
    write_index(d, weight_map, name=BIN_INDEX)


GOOD = [
    pytest.param(write_single_safetensors, "safetensors", 1, id="single safetensors"),
    pytest.param(write_sharded_safetensors, "safetensors", 3, id="sharded safetensors"),
    pytest.param(write_single_bin, "bin", 1, id="single bin"),
    pytest.param(write_sharded_bin, "bin", 2, id="sharded bin"),
]


@pytest.mark.parametrize("write, fmt, n_files", GOOD)
def test_a_good_checkpoint_reads_back_equal(tmp_path, write, fmt, n_files):
    tensors = sample_tensors()
    write(tmp_path, tensors)
    with CheckpointReader(tmp_path) as reader:
        assert reader.format == fmt
        assert len(reader.files) == n_files
        assert_reads_back(reader, tensors)
        # Reading again, in another order, gives the same values (handles and caches are reused correctly).
        for name in reversed(list(tensors)):
            assert torch.equal(reader.get(name), tensors[name])


@pytest.mark.parametrize("write, fmt, n_files", GOOD)
def test_weight_files_lists_the_shards_and_the_index(tmp_path, write, fmt, n_files):
    write(tmp_path, sample_tensors())
    reader = CheckpointReader(tmp_path)
    files = reader.weight_files()
    assert sum(f.suffix in (".safetensors", ".bin") for f in files) == n_files
    assert any(f.name.endswith(".index.json") for f in files) == (n_files > 1)


def test_safetensors_is_preferred_over_bin_when_both_exist(tmp_path):
    tensors = sample_tensors()
    write_single_safetensors(tmp_path, tensors)
    torch.save({"other": torch.zeros(1)}, tmp_path / BIN_SINGLE)
    reader = CheckpointReader(tmp_path)
    assert reader.format == "safetensors"
    assert set(reader.tensors) == set(tensors)


def test_safetensors_metadata_is_returned_apart_from_the_tensors(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(f), metadata={"format": "pt", "note": "hi"})
    infos, metadata = read_safetensors_header(f)
    assert set(infos) == {"w"}
    assert metadata == {"format": "pt", "note": "hi"}


GET_COPY = [
    pytest.param(
        write_single_safetensors,
        id="safetensors",
    ),
    pytest.param(write_single_bin, id="bin"),
]


@pytest.mark.parametrize("write", GET_COPY)
def test_get_returns_a_private_copy_that_can_be_modified_without_affecting_later_reads(tmp_path, write):
    original = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    write(tmp_path, {"w": original})
    reader = CheckpointReader(tmp_path)
    first = reader.get("w")
    first.add_(100)
    first[0, 0] = -1
    assert torch.equal(reader.get("w"), original)


def test_a_legacy_non_zip_bin_reads_back_equal(tmp_path):
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    torch.save(tensors, tmp_path / BIN_SINGLE, _use_new_zipfile_serialization=False)
    with CheckpointReader(tmp_path) as reader:
        assert_reads_back(reader, tensors)
