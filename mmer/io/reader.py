"""Read a checkpoint's tensor table and its tensors one at a time, checking the bytes before trusting them.

The headers of every safetensors shard are parsed here (not by the Rust reader) so that a truncated or
hostile file is named with what is wrong before anything is allocated. Pickled ``.bin`` files are only ever
opened with ``torch.load(weights_only=True)``: this is the one module allowed to call ``torch.load``.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmer.errors import CheckpointFormatError
from mmer.io.jsonfile import loads_bounded, read_json_file
from mmer.io.paths import check_inside, copy_regular_file, regular_file, too_large

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own cap against JSON abuse

# Configs, tokenizer and processor files: copied next to the weights mmer writes; never weights, indexes or code.
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
NEVER_SIDE_FILE_SUFFIXES = (".safetensors", ".bin", ".py")
MAX_SIDE_FILE_BYTES = 512 * 1024 * 1024  # tokenizer.json of a large vocabulary is tens of MB
# A model's licence travels with its weights: LICENSE, LICENCE.txt, COPYING, NOTICE, LICENSE-APACHE...
LICENCE_FILE = re.compile(r"(?i)(LICEN[CS]E|COPYING|NOTICE)([._-][\w.-]*)?")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class Sized:
    """Element and byte counts of anything with a ``shape`` and a ``dtype`` (stored, planned or merged)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class TensorInfo(Sized):
    """Name, dtype and shape of one stored tensor, and the file it lives in."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    # Absolute byte range of the data in a safetensors file (None for .bin): lets a writer copy a tensor
    # file-to-file in the kernel instead of faulting it through memory.
    byte_range: tuple[int, int] | None = None


def _reject_duplicates(file: Path, what: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointFormatError(
                    f"{file}: {what} names {key!r} twice", file=str(file), tensor=key, hint="re-export the checkpoint"
                )
            out[key] = value
        return out

    return hook


def read_safetensors_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors header: lengths, JSON, dtypes, shapes and byte ranges."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointFormatError(
                    f"{file}: truncated ({size} bytes, shorter than the 8-byte header length)",
                    file=str(file),
                    hint="the download or copy was cut short; fetch the file again",
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointFormatError(
                    f"{file}: header length {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt file?)",
                    file=str(file),
                    hint="this is not a valid safetensors file; fetch it again",
                )
            if 8 + n > size:
                raise CheckpointFormatError(
                    f"{file}: truncated (header claims {n} bytes, file has {size - 8} after the length)",
                    file=str(file),
                    hint="the download or copy was cut short; fetch the file again",
                )
            raw = f.read(n)
    except OSError as err:
        raise CheckpointFormatError(f"{file}: cannot read ({err.strerror})", file=str(file)) from None
    header = loads_bounded(
        raw,
        file,
        what="safetensors header",
        max_bytes=MAX_HEADER_BYTES,
        object_pairs_hook=_reject_duplicates(file, "the header"),
        hint="the file is corrupt; fetch it again",
    )
    if not isinstance(header, dict):
        raise CheckpointFormatError(
            f"{file}: header is not a JSON object", file=str(file), hint="the file is corrupt; fetch it again"
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFormatError(
            f"{file}: header's __metadata__ is not a map of strings to strings",
            file=str(file),
            key="__metadata__",
            hint="the file is corrupt; fetch it again",
        )
    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _check_entry(file, name, entry, data_size, 8 + n)
    return infos, metadata


def _check_entry(file: Path, name: str, entry: Any, data_size: int, data_start: int) -> TensorInfo:
    def bad(why: str) -> CheckpointFormatError:
        return CheckpointFormatError(
            f"{file}: tensor {name!r}: {why}", file=str(file), tensor=name, hint="the file is corrupt; fetch it again"
        )

    if not isinstance(entry, dict):
        raise bad("header entry is not an object")
    raw_dtype = entry.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(raw_dtype) if isinstance(raw_dtype, str) else None
    if dtype is None:
        raise bad(f"unknown dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"data_offsets [{begin}, {end}] fall outside the {data_size}-byte data section (truncated file?)")
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise bad(f"{end - begin} bytes stored but dtype {entry['dtype']} and shape {shape} need {expected}")
    return TensorInfo(name, dtype, tuple(shape), file, (data_start + begin, data_start + end))


def _check_shard_name(index_file: Path, name: str, shard: str) -> None:
    """An index names files inside its own checkpoint: relative, no ``..``, nothing the OS cannot name."""
    path = Path(shard)
    if not shard or "\x00" in shard or path.is_absolute() or ".." in path.parts:
        raise CheckpointFormatError(
            f"{index_file}: weight_map[{name!r}] names shard {shard!r}, which points outside the checkpoint",
            file=str(index_file),
            key=name,
            hint="shard names must be file names inside the checkpoint directory; the index may be hostile",
        )


class CheckpointReader:
    """All tensors of one checkpoint directory (single file or sharded, safetensors or ``.bin``).

    The table of names, dtypes and shapes is read up front from headers only; tensors are read one at a time
    on demand, so a reader never holds more than the tensor asked for (safetensors files are memory-mapped).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        # Every file is opened by the real path check_inside returned; ``files`` keep the names the directory
        # shows (a Hub snapshot's links), which name the files in manifests and hash them for free.
        self._real: dict[Path, Path] = {}
        self.format, files, index_map = self._find_files()
        self.files = files
        self.side_files = side_files(self.directory)
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[Path, Any] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        shown = {self._real[f]: f for f in files}
        for file in files:
            real = self._real[file]
            infos = read_safetensors_header(real)[0] if self.format == "safetensors" else self._bin_infos(real)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointFormatError(
                        f"{self.directory}: tensor {name!r} is stored twice "
                        f"({shown[self.tensors[name].file].name} and {file.name})",
                        file=str(file),
                        tensor=name,
                        hint="the shards overlap; re-export the checkpoint",
                    )
                self.tensors[name] = info
        if not self.tensors:
            raise CheckpointFormatError(
                f"{self.directory}: the weight files hold no tensors",
                file=str(self.directory),
                hint="the checkpoint is empty or its index is wrong; fetch it again",
            )
        if index_map is not None:
            for name, shard in index_map.items():
                info = self.tensors.get(name)
                if info is None or info.file != self._real[self.directory / shard]:
                    raise CheckpointFormatError(
                        f"{self.directory}: the index puts {name!r} in {shard}, but that shard does not hold it",
                        file=str(self.directory / shard),
                        tensor=name,
                        hint="the index and the shards disagree; fetch the checkpoint again",
                    )

    # ----------------------------------------------------------------------------------------------- files
    def _find_files(self) -> tuple[str, list[Path], dict[str, str] | None]:
        d = self.directory
        for index_name, single, fmt in (
            (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "safetensors"),
            (BIN_INDEX, BIN_SINGLE, "bin"),
        ):
            index_file = d / index_name
            real_index = self._checked(index_file, "index")
            if real_index is not None:
                weight_map = self._read_index(real_index)
                shards = {shard: name for name, shard in weight_map.items()}  # one tensor per shard to name
                for shard, name in shards.items():
                    _check_shard_name(index_file, name, shard)
                files = []
                for shard in sorted(shards):
                    path = d / shard
                    if self._checked(path, f"shard named by {index_name}") is None:
                        raise CheckpointFormatError(
                            f"{index_file}: names shard {shard!r}, which is missing from {d}",
                            file=str(path),
                            hint="the download is incomplete; fetch the missing shard",
                        )
                    files.append(path)
                return fmt, files, weight_map
            if self._checked(d / single, "weight file") is not None:
                return fmt, [d / single], None
        found = sorted(p.name for p in d.glob("*.safetensors")) + sorted(p.name for p in d.glob("*.bin"))
        hint = (
            f"found {', '.join(found)} but no {SAFETENSORS_INDEX}; add the index or rename a single file to "
            f"{SAFETENSORS_SINGLE}"
            if found
            else "point to a directory with model.safetensors[.index.json] or pytorch_model.bin[.index.json]"
        )
        raise CheckpointFormatError(f"{d}: no weight files found", file=str(d), hint=hint)

    def _checked(self, path: Path, what: str) -> Path | None:
        """The real path to open for ``path`` (remembered), or ``None`` when nothing is there."""
        if not os.path.lexists(path):
            return None
        real = check_inside(self.directory, path, what=what)
        if not regular_file(real, path, what=what):
            return None
        self._real[path] = real
        return real

    def _read_index(self, index_file: Path) -> dict[str, str]:
        data = read_json_file(
            index_file,
            what="index",
            object_pairs_hook=_reject_duplicates(index_file, "the index"),
            hint="the index is corrupt; fetch it again or re-export the checkpoint",
        )
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointFormatError(
                f"{index_file}: has no valid `weight_map`", file=str(index_file), hint="re-export the checkpoint"
            )
        return weight_map

    def _bin_infos(self, file: Path) -> dict[str, TensorInfo]:
        state = self._load_bin(file)
        return {
            name: TensorInfo(name=name, dtype=t.dtype, shape=tuple(t.shape), file=file) for name, t in state.items()
        }

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is not None and self._bin_cache[0] == file:
            return self._bin_cache[1]
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err) and "zipfile" not in str(err):
                    raise
                # Pre-zip (legacy) serialisation cannot be memory-mapped; it is still loaded weights-only.
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            if "weights_only" in str(err) or "Unsupported global" in str(err) or "Weights only load" in str(err):
                why = "it holds Python objects other than tensors, which could run code when unpickled"
                raise CheckpointFormatError(
                    f"{file}: refused: {why} (torch.load(weights_only=True) rejected it)",
                    file=str(file),
                    hint="convert it to safetensors with a tool you trust, or get a safetensors copy of the model",
                ) from None
            raise CheckpointFormatError(
                f"{file}: cannot be read as a PyTorch checkpoint ({type(err).__name__}: {err})",
                file=str(file),
                hint="the file is corrupt or truncated; fetch it again",
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointFormatError(
                f"{file}: is not a flat dict of tensors", file=str(file), hint="save the model's state_dict()"
            )
        self._bin_cache = (file, state)
        return state

    # --------------------------------------------------------------------------------------------- tensors
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, copy: bool = True) -> torch.Tensor:
        """Read one tensor into CPU memory.

        With ``copy`` (the default) the caller owns the result and may modify it. ``copy=False`` may return a
        read-only view of the memory-mapped file: no copy, no extra memory; the merge pipeline, which never
        writes into its inputs, reads this way.
        """
        info = self.tensors.get(name)
        if info is None:  # a damaged or edited header: its name changed, or the tensor is gone
            raise CheckpointFormatError(
                f"{self.directory}: holds no tensor {name!r}",
                file=str(self.directory),
                tensor=name,
                hint="the checkpoint is incomplete or was modified; fetch it again (`mmer verify` checks a merge)",
            )
        if self.format == "bin":
            tensor = self._load_bin(info.file)[name]
            return tensor.clone() if copy else tensor
        handle = self._handles.get(info.file)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(info.file), framework="pt", device="cpu")
            except Exception as err:
                raise CheckpointFormatError(
                    f"{info.file}: cannot be opened ({err})", file=str(info.file), hint="fetch the file again"
                ) from None
            self._handles[info.file] = handle
        try:
            # safetensors hands out a view of its memory map; copy unless the caller only reads.
            tensor = handle.get_tensor(name)
            return tensor.clone() if copy else tensor
        except Exception as err:
            raise CheckpointFormatError(
                f"{info.file}: tensor {name!r} cannot be read ({err})", file=str(info.file), tensor=name
            ) from None

    def release(self) -> None:
        """Unmap the open files: pages touched so far stop counting towards this process's memory.

        Streaming callers release after each tensor slot, so resident memory stays one slot deep instead of
        growing to the size of every input file (tensors already handed out keep their own mapping alive).
        """
        self._handles.clear()

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def weight_files(self) -> list[Path]:
        """The weight files and the index, if any (what a content hash of the weights covers)."""
        extra = [self.directory / n for n in (SAFETENSORS_INDEX, BIN_INDEX) if (self.directory / n).is_file()]
        return sorted(self.files) + extra


def is_side_file(name: str) -> bool:
    if name.startswith(".") or name in (SAFETENSORS_INDEX, BIN_INDEX):
        return False
    suffix = Path(name).suffix
    if suffix in NEVER_SIDE_FILE_SUFFIXES:
        return False
    return suffix in SIDE_FILE_SUFFIXES or name.startswith("tokenizer") or bool(LICENCE_FILE.fullmatch(name))


def side_files(directory: str | Path, root: str | Path | None = None) -> dict[str, Path]:
    """The side files of ``directory`` by name, each mapped to the real path to read it from.

    Checked when a model is opened, before any work, so that a hostile link (``tokenizer.json -> /etc/shadow``),
    a FIFO or an oversized file fails the run at once rather than when the side files are copied at its end.
    Links must resolve inside ``root`` (``directory`` unless given; a checkpoint's component folder passes the
    checkpoint). A name whose link leads nowhere, or to a directory, is not a side file.
    """
    directory = Path(directory)
    out: dict[str, Path] = {}
    try:
        entries = sorted(directory.iterdir())
    except OSError as err:
        raise CheckpointFormatError(
            f"{directory}: cannot be listed ({err.strerror or err})", file=str(directory), hint="check its permissions"
        ) from None
    for path in entries:
        if not is_side_file(path.name):
            continue
        real = check_inside(directory if root is None else root, path, what="side file")
        if os.path.isdir(real) or not regular_file(real, path, what="side file"):
            continue
        if os.stat(real).st_size > MAX_SIDE_FILE_BYTES:
            raise too_large(path, MAX_SIDE_FILE_BYTES)
        out[path.name] = real
    return out


def copy_side_files(source: Path, destination: Path, *, root: Path | None = None) -> list[str]:
    """Copy the side files of ``source`` (see :func:`side_files`) into ``destination``; returns their names.

    ``source`` may be a stranger's download: a link out of it (``root``, when the folder sits in a checkpoint)
    is refused by name, anything but a regular file is refused unread, and each copy is a fresh file read from
    the checked real path, so its mode is a new file's and a link swapped in after the check changes nothing.
    """
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name, real in side_files(source, root).items():
        copy_regular_file(real, destination / name, shown=source / name, max_bytes=MAX_SIDE_FILE_BYTES)
        copied.append(name)
    return copied


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON config file, naming the file if it is broken."""
    data = read_json_file(path, what="JSON config", hint="the file is corrupt; fetch it again or fix it")
    if not isinstance(data, dict):
        raise CheckpointFormatError(
            f"{path}: not a JSON object", file=str(path), hint="the file is corrupt; fetch it again or fix it"
        )
    return data


def file_size(path: Path) -> int:
    return os.stat(path).st_size
