"""Streaming safetensors writer, HF sharding + index, staged output directories and full-disk handling."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mmer.io.writer as writer_mod
from mmer.errors import DiskFullError, OutputExistsError, OutputWriteError
from mmer.io.reader import CheckpointReader
from mmer.io.writer import (
    PlannedTensor,
    SafetensorsFileWriter,
    ShardedWriter,
    StagedOutput,
    plan_shards,
    write_tensors,
)

# ----------------------------------------------------------------------------------------------- helpers


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(3, 5, generator=g)
    f32[0, 0] = float("nan")
    f32[0, 1] = -0.0
    f32[0, 2] = float("inf")
    return {
        "fp32": f32,
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(3, 2, generator=g).to(torch.float16),
        "u8": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, False, True, True]),
        "i64": torch.tensor([[-(2**62), 1], [2**40, -7]], dtype=torch.int64),
        "fp8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "empty_i64": torch.zeros(0, dtype=torch.int64),
        "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
    }


def plan(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert tuple(got[name].shape) == tuple(t.shape), name
        assert bits(got[name]) == bits(t), name


def raw_header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


# ------------------------------------------------------------------------------------------- one file


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_a_single_file_holds_mixed_dtypes_bit_for_bit(tmp_path, order):
    tensors = mixed_tensors()
    path = tmp_path / "x.safetensors"
    w = SafetensorsFileWriter(path, plan(tensors))
    names = list(tensors) if order == "forward" else list(reversed(tensors))
    for name in names:
        assert not w.complete
        w.write(name, tensors[name])
    assert w.complete
    w.close()
    assert_bit_equal(load_file(str(path)), tensors)


def test_every_tensor_starts_aligned_to_its_element_size(tmp_path):
    tensors = mixed_tensors()
    path = tmp_path / "x.safetensors"
    w = SafetensorsFileWriter(path, plan(tensors))
    for name, t in tensors.items():
        w.write(name, t)
    w.close()
    n, header = raw_header(path)
    assert (8 + n) % 8 == 0
    header.pop("__metadata__", None)
    for name, entry in header.items():
        assert entry["data_offsets"][0] % tensors[name].element_size() == 0, name
    # The data section is exactly the tensors, with no holes and nothing after them.
    spans = sorted(tuple(e["data_offsets"]) for e in header.values())
    end = 0
    for begin, stop in spans:
        assert begin == end
        end = stop
    assert path.stat().st_size == 8 + n + end


def test_metadata_round_trips(tmp_path):
    path = tmp_path / "x.safetensors"
    metadata = {"format": "pt", "mmer_version": "0.1", "note": "ünïcode"}
    w = SafetensorsFileWriter(path, [PlannedTensor("w", torch.float32, (2,))], metadata=metadata)
    w.write("w", torch.ones(2))
    w.close()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == metadata


def test_a_file_of_only_empty_tensors_is_valid(tmp_path):
    tensors = {"a": torch.zeros(0), "b": torch.zeros(2, 0, dtype=torch.bfloat16)}
    path = tmp_path / "x.safetensors"
    w = SafetensorsFileWriter(path, plan(tensors))
    for name, t in tensors.items():
        w.write(name, t)
    w.close()
    assert_bit_equal(load_file(str(path)), tensors)


@pytest.mark.parametrize(
    "tensor",
    [
        pytest.param(torch.zeros(2, 3, dtype=torch.float16), id="wrong dtype"),
        pytest.param(torch.zeros(3, 2), id="wrong shape"),
        pytest.param(torch.zeros(6), id="same numel, wrong shape"),
        pytest.param(torch.zeros(2, 3, dtype=torch.int32), id="same itemsize, wrong dtype"),
    ],
)
def test_writing_a_tensor_that_disagrees_with_the_plan_raises(tmp_path, tensor):
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", [PlannedTensor("w", torch.float32, (2, 3))])
    with pytest.raises(ValueError, match="planned"):
        w.write("w", tensor)
    w.abort()


def test_writing_a_tensor_twice_raises(tmp_path):
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", [PlannedTensor("w", torch.float32, (2,))])
    w.write("w", torch.ones(2))
    with pytest.raises(ValueError, match="twice"):
        w.write("w", torch.ones(2))
    w.close()


def test_writing_an_unplanned_tensor_raises(tmp_path):
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", [PlannedTensor("w", torch.float32, (2,))])
    with pytest.raises(KeyError):
        w.write("other", torch.ones(2))
    w.abort()


def test_planning_the_same_name_twice_raises(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        SafetensorsFileWriter(
            tmp_path / "x.safetensors",
            [PlannedTensor("w", torch.float32, (2,)), PlannedTensor("w", torch.float32, (2,))],
        )


def test_closing_a_file_with_a_missing_tensor_raises(tmp_path):
    w = SafetensorsFileWriter(
        tmp_path / "x.safetensors", [PlannedTensor("a", torch.float32, (2,)), PlannedTensor("b", torch.float32, (2,))]
    )
    w.write("a", torch.ones(2))
    with pytest.raises(RuntimeError, match="1 tensors not written"):
        w.close()


def test_a_tensor_written_in_parts_in_any_order_reads_back_whole(tmp_path):
    values = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", [PlannedTensor("w", torch.float32, (4, 5))])
    flat = values.reshape(-1)
    for start, stop in [(12, 20), (0, 5), (5, 12)]:
        assert not w.complete
        w.write_range("w", flat[start:stop], start)
    assert w.complete
    w.close()
    assert torch.equal(load_file(tmp_path / "x.safetensors")["w"], values)


@pytest.mark.parametrize("parts", [[(0, 4), (2, 6)], [(4, 8), (0, 5)], [(0, 4), (0, 4)], [(6, 10)], [(-1, 2)]])
def test_a_part_that_overlaps_or_overflows_is_refused_so_no_hole_can_pass_for_complete(tmp_path, parts):
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", [PlannedTensor("w", torch.float32, (8,))])
    *ok, bad = parts
    for start, stop in ok:
        w.write_range("w", torch.ones(stop - start), start)
    with pytest.raises(ValueError, match="overlaps"):
        w.write_range("w", torch.ones(bad[1] - bad[0]), bad[0])
    assert not w.complete
    w.abort()


def test_a_part_in_the_wrong_dtype_is_refused(tmp_path):
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", [PlannedTensor("w", torch.bfloat16, (8,))])
    with pytest.raises(ValueError, match="planned"):
        w.write_range("w", torch.ones(4), 0)
    w.abort()


def test_sharded_parts_close_their_shard_when_the_last_part_arrives(tmp_path):
    entries = [PlannedTensor("a", torch.float32, (6,)), PlannedTensor("b", torch.float32, (2,))]
    w = ShardedWriter(tmp_path, entries, max_shard_bytes=24)
    w.write_range("a", torch.zeros(3), 3)
    w.write_range("a", torch.ones(3), 0)
    w.write("b", torch.full((2,), 7.0))
    assert w.close() == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.get("a"), torch.tensor([1.0, 1, 1, 0, 0, 0]))


def _stored(tmp_path, tensor: torch.Tensor):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    save_file({"src": tensor, "other": torch.zeros(3)}, str(src / "model.safetensors"))
    return CheckpointReader(src).tensors["src"]


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "buffered-fallback"])
def test_a_stored_tensor_copied_file_to_file_reads_back_bit_for_bit(tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:

        def unsupported(*args):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    monkeypatch.setattr(writer_mod, "_COPY_CHUNK", 64)  # several rounds of the copy loop
    values = torch.randn(10, 7).to(torch.bfloat16)
    info = _stored(tmp_path, values)
    out = tmp_path / "out"
    out.mkdir()
    w = ShardedWriter(
        out, [PlannedTensor("w", torch.bfloat16, (10, 7)), PlannedTensor("b", torch.float32, (2,))], 1 << 30
    )
    w.write("b", torch.ones(2))
    w.copy_from_file("w", info.file, info.byte_range[0], info.dtype, info.shape)
    w.close()
    back = load_file(out / "model.safetensors")
    assert torch.equal(back["w"].view(torch.int16), values.view(torch.int16))
    assert torch.equal(back["b"], torch.ones(2))


def test_a_copied_tensor_must_match_the_plan_and_arrive_once(tmp_path):
    info = _stored(tmp_path, torch.randn(4))
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", [PlannedTensor("w", torch.float32, (4,))])
    with pytest.raises(ValueError, match="planned"):
        w.copy_from_file("w", info.file, info.byte_range[0], torch.float16, (4,))
    w.copy_from_file("w", info.file, info.byte_range[0], info.dtype, info.shape)
    with pytest.raises(ValueError, match="twice"):
        w.copy_from_file("w", info.file, info.byte_range[0], info.dtype, info.shape)
    w.close()


def test_a_full_disk_during_a_file_to_file_copy_is_reported(tmp_path, monkeypatch):
    info = _stored(tmp_path, torch.randn(64))

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full, raising=False)
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", [PlannedTensor("w", torch.float32, (64,))])
    with pytest.raises(DiskFullError, match="no space left"):
        w.copy_from_file("w", info.file, info.byte_range[0], info.dtype, info.shape)
    w.abort()


# ------------------------------------------------------------------------------------------- sharding


def test_sharding_by_size_gives_hf_shard_names_and_a_correct_index(tmp_path):
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.full((100,), float(i)) for i in range(5)}  # 400 B each
    w = ShardedWriter(tmp_path, plan(tensors), max_shard_bytes=800)
    for name in reversed(tensors):
        w.write(name, tensors[name])
    written = w.close()

    names = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert written == names + ["model.safetensors.index.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 400
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for shard in names:
        part = load_file(str(tmp_path / shard))
        assert all(index["weight_map"][n] == shard for n in part)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 800
        loaded.update(part)
    assert_bit_equal(loaded, tensors)


def test_sharded_mixed_dtypes_read_back_through_the_checkpoint_reader(tmp_path):
    tensors = mixed_tensors()
    w = ShardedWriter(tmp_path, plan(tensors), max_shard_bytes=32)
    for name in reversed(tensors):
        w.write(name, tensors[name])
    written = w.close()
    assert len(written) > 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    with CheckpointReader(tmp_path) as reader:
        assert_bit_equal({n: reader.get(n) for n in reader.tensors}, tensors)


def test_a_single_shard_is_model_safetensors_with_no_index(tmp_path):
    tensors = mixed_tensors()
    w = ShardedWriter(tmp_path, plan(tensors), max_shard_bytes=10**9)
    for name in reversed(tensors):
        w.write(name, tensors[name])
    assert w.close() == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert_bit_equal(load_file(str(tmp_path / "model.safetensors")), tensors)


def test_a_tensor_bigger_than_the_shard_size_gets_a_shard_of_its_own(tmp_path):
    entries = [
        PlannedTensor("small1", torch.float32, (10,)),
        PlannedTensor("big", torch.float32, (1000,)),
        PlannedTensor("small2", torch.float32, (10,)),
    ]
    shards = plan_shards(entries, max_shard_bytes=100)
    assert [[e.name for e in s] for s in shards] == [["small1"], ["big"], ["small2"]]
    assert plan_shards([], 100) == []


def test_a_custom_prefix_names_shards_and_index(tmp_path):
    tensors = {"a": torch.ones(100), "b": torch.zeros(100)}
    written = write_tensors(tmp_path, tensors, max_shard_bytes=400, prefix="component")
    assert written == [
        "component-00001-of-00002.safetensors",
        "component-00002-of-00002.safetensors",
        "component.safetensors.index.json",
    ]


def test_sharded_metadata_is_in_every_shard(tmp_path):
    tensors = {"a": torch.ones(100), "b": torch.zeros(100)}
    metadata = {"format": "pt", "mmer": "yes"}
    write_tensors(tmp_path, tensors, max_shard_bytes=400, metadata=metadata)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert f.metadata() == metadata


def test_sharded_wrong_shape_or_dtype_raises(tmp_path):
    w = ShardedWriter(tmp_path, [PlannedTensor("a", torch.float32, (2,))], max_shard_bytes=100)
    with pytest.raises(ValueError):
        w.write("a", torch.ones(3))
    with pytest.raises(ValueError):
        w.write("a", torch.ones(2, dtype=torch.bfloat16))
    w.abort()


@pytest.mark.parametrize(
    "written", [[], ["a"], ["a", "b"]], ids=["nothing written", "one shard partial", "one shard missing"]
)
def test_closing_sharded_output_with_a_missing_tensor_raises(tmp_path, written):
    tensors = {"a": torch.ones(100), "b": torch.ones(100), "c": torch.ones(100)}
    w = ShardedWriter(tmp_path, plan(tensors), max_shard_bytes=800)
    for name in written:
        w.write(name, tensors[name])
    with pytest.raises(RuntimeError, match="incomplete"):
        w.close()
    w.abort()
    assert not (tmp_path / "model.safetensors.index.json").exists()


# ---------------------------------------------------------------------------------------- staged output


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".mmer-" in p.name)


def test_a_staged_output_appears_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out" / "merged"
    staged = StagedOutput(target)
    with staged as staging:
        assert staging != target and staging.parent == target.parent
        assert staging.name.startswith(".merged.mmer-staging-")
        (staging / "config.json").write_text("{}")
        write_tensors(staging, {"w": torch.ones(2)}, max_shard_bytes=10**6)
        assert not target.exists()
    assert sorted(p.name for p in target.iterdir()) == [".mmer-output", "config.json", "model.safetensors"]
    assert leftovers(target.parent) == []


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("boom"), KeyboardInterrupt(), DiskFullError("full")],
    ids=["RuntimeError", "KeyboardInterrupt", "DiskFullError"],
)
def test_an_exception_inside_the_block_leaves_neither_target_nor_staging(tmp_path, exc):
    target = tmp_path / "merged"
    with pytest.raises(type(exc)):
        with StagedOutput(target) as staging:
            (staging / "part.safetensors").write_bytes(b"x" * 100)
            raise exc
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_an_existing_target_is_refused_naming_it(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError) as info:
        StagedOutput(target)
    err = info.value
    assert err.file == str(target)
    assert str(target) in err.message
    assert err.hint and "overwrite" in err.hint
    assert (target / "keep.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_an_existing_file_as_target_is_refused_too(tmp_path):
    target = tmp_path / "merged"
    target.write_text("a file")
    with pytest.raises(OutputExistsError):
        StagedOutput(target)


def test_overwrite_replaces_the_old_contents_of_a_previous_output(tmp_path):
    target = tmp_path / "merged"
    with StagedOutput(target) as staging:
        (staging / "old.txt").write_text("old")
    with StagedOutput(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").exists()
    assert sorted(p.name for p in target.iterdir()) == [".mmer-output", "new.txt"]
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_a_file_target(tmp_path):
    target = tmp_path / "merged"
    target.write_text("a file")
    with pytest.raises(OutputExistsError, match="is a file"):
        StagedOutput(target, overwrite=True)
    assert target.read_text() == "a file"
    assert leftovers(tmp_path) == []


def test_overwrite_keeps_the_old_contents_when_the_block_fails(tmp_path):
    target = tmp_path / "merged"
    with StagedOutput(target) as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with StagedOutput(target, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == [".mmer-output", "old.txt"]
    assert leftovers(tmp_path) == []


def test_a_target_that_appears_while_writing_is_not_clobbered(tmp_path):
    target = tmp_path / "merged"
    with pytest.raises(OutputExistsError) as info:
        with StagedOutput(target) as staging:
            (staging / "new.txt").write_text("new")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert info.value.file == str(target)
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------------- full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_fallocate(*args, **kwargs):
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


class _FillingFile:
    """A real file whose data writes fail with ENOSPC once ``budget`` bytes have been written."""

    def __init__(self, real, budget: int) -> None:
        self._real = real
        self._budget = budget

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= n
        return self._real.write(data)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _filling_open(budget: int):
    def fake_open(path, mode="r", *args, **kwargs):
        return _FillingFile(open(path, mode, *args, **kwargs), budget)

    return fake_open


def assert_disk_full(err: DiskFullError, path: Path) -> None:
    assert err.file == str(path)
    assert str(path) in err.message
    assert err.hint and "space" in err.hint


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this platform")
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_full_disk_is_reported_when_space_is_reserved(tmp_path, monkeypatch, code):
    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", full)
    path = tmp_path / "x.safetensors"
    with pytest.raises(DiskFullError) as info:
        SafetensorsFileWriter(path, [PlannedTensor("w", torch.float32, (1000,))])
    assert_disk_full(info.value, path)


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this platform")
def test_a_full_disk_at_reservation_leaves_no_open_file_handle(tmp_path, monkeypatch):
    opened = []

    def recording_open(*args, **kwargs):
        f = open(*args, **kwargs)
        opened.append(f)
        return f

    monkeypatch.setattr(writer_mod, "open", recording_open, raising=False)
    monkeypatch.setattr(os, "posix_fallocate", _enospc)
    with pytest.raises(DiskFullError):
        SafetensorsFileWriter(tmp_path / "x.safetensors", [PlannedTensor("w", torch.float32, (1000,))])
    assert len(opened) == 1
    assert opened[0].closed


def test_a_full_disk_is_reported_while_writing_tensors(tmp_path, monkeypatch):
    if hasattr(os, "posix_fallocate"):
        monkeypatch.setattr(os, "posix_fallocate", _no_fallocate)  # a file system that cannot reserve space
    monkeypatch.setattr(writer_mod, "open", _filling_open(budget=4096), raising=False)
    path = tmp_path / "x.safetensors"
    w = SafetensorsFileWriter(
        path, [PlannedTensor("a", torch.float32, (16,)), PlannedTensor("b", torch.float32, (4096,))]
    )
    w.write("a", torch.ones(16))
    with pytest.raises(DiskFullError) as info:
        w.write("b", torch.ones(4096))
    assert_disk_full(info.value, path)
    w.abort()


def test_a_full_disk_at_fsync_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    w = SafetensorsFileWriter(path, [PlannedTensor("a", torch.float32, (4,))])
    w.write("a", torch.ones(4))
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(DiskFullError) as info:
        w.close()
    assert_disk_full(info.value, path)


def test_an_unsupported_fallocate_falls_back_to_plain_writes(tmp_path, monkeypatch):
    if hasattr(os, "posix_fallocate"):
        monkeypatch.setattr(os, "posix_fallocate", _no_fallocate)
    tensors = mixed_tensors()
    path = tmp_path / "x.safetensors"
    w = SafetensorsFileWriter(path, plan(tensors))
    for name in reversed(tensors):
        w.write(name, tensors[name])
    w.close()
    assert_bit_equal(load_file(str(path)), tensors)


def test_other_os_errors_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(writer_mod, "open", denied, raising=False)
    with pytest.raises(OutputWriteError, match="permission denied") as info:
        SafetensorsFileWriter(tmp_path / "x.safetensors", [PlannedTensor("w", torch.float32, (2,))])
    assert not isinstance(info.value, DiskFullError) and info.value.exit_code == 1


def test_a_full_disk_inside_a_staged_output_leaves_nothing_behind(tmp_path, monkeypatch):
    if hasattr(os, "posix_fallocate"):
        monkeypatch.setattr(os, "posix_fallocate", _no_fallocate)
    monkeypatch.setattr(writer_mod, "open", _filling_open(budget=1024), raising=False)
    target = tmp_path / "merged"
    tensors = {f"t{i}": torch.ones(256) for i in range(8)}  # 1 KiB each
    with pytest.raises(DiskFullError) as info:
        with StagedOutput(target) as staging:
            write_tensors(staging, tensors, max_shard_bytes=4096)
    assert info.value.hint
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
