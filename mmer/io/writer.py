"""Write safetensors shards without buffering them, into a staging directory that is renamed when complete.

Because every tensor's name, dtype and shape is known before the merge starts, each shard's header is written
first and each tensor goes straight to its offset as soon as it is computed: the writer holds no tensor, so
memory does not grow with shard size (mergekit buffers a whole shard). Space for each shard is reserved up
front, so a full disk fails at the start of a shard rather than after minutes of work.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import torch

from mmer.errors import CheckpointFormatError, OutputExistsError
from mmer.io.outputs import check_target, clear_leftovers, old_name, output_os_error, staging_name, write_marker
from mmer.io.reader import DTYPE_NAMES, CheckpointReader, Sized, TensorInfo


@dataclass(frozen=True)
class PlannedTensor(Sized):
    """A tensor the writer will receive: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _raise_os_error(err: OSError, path: Path) -> NoReturn:
    raise output_os_error(err, path) from None


class SafetensorsFileWriter:
    """One safetensors file whose header is fixed up front; tensors may then arrive in any order."""

    def __init__(self, path: Path, entries: Sequence[PlannedTensor], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        # Largest element size first, like safetensors itself, so every tensor starts aligned without holes.
        ordered = sorted(entries, key=lambda e: -e.dtype.itemsize)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        self._offsets: dict[str, tuple[int, int, PlannedTensor]] = {}
        offset = 0
        for e in ordered:
            if e.name in self._offsets:
                raise ValueError(f"tensor {e.name} planned twice")
            header[e.name] = {
                "dtype": DTYPE_NAMES[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [offset, offset + e.nbytes],
            }
            self._offsets[e.name] = (offset, offset + e.nbytes, e)
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._total = self._data_start + offset
        self._pending = set(self._offsets)
        self._unwritten = {name: e.nbytes for name, (_, _, e) in self._offsets.items()}
        self._parts: dict[str, list[tuple[int, int]]] = {}  # flat element ranges written so far, sorted
        try:
            self._file = open(path, "wb")
        except OSError as err:
            _raise_os_error(err, path)
        try:
            _reserve(self._file, self._total)
            self._file.write(len(raw).to_bytes(8, "little"))
            self._file.write(raw)
        except OSError as err:
            self._file.close()
            _raise_os_error(err, path)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        _, _, planned = self._offsets[name]
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise ValueError(
                f"{name}: planned {planned.dtype} {planned.shape}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        if self._unwritten.get(name) != planned.nbytes:
            raise ValueError(f"{name} written twice")
        self.write_range(name, tensor.reshape(-1), 0)

    def write_range(self, name: str, flat: torch.Tensor, start: int) -> None:
        """Write the flat elements ``[start, start + flat.numel())`` of one tensor.

        Lets the merge stream a big tensor in chunks it never assembles; the tensor counts as written once
        every byte of it has arrived (parts must not overlap).
        """
        if name not in self._pending:
            raise ValueError(f"{name} written twice")
        begin, end, planned = self._offsets[name]
        if flat.dtype != planned.dtype or flat.dim() != 1:
            raise ValueError(f"{name}: planned {planned.dtype} parts (1-D), got {flat.dtype} {tuple(flat.shape)}")
        itemsize = planned.dtype.itemsize
        first, size = begin + start * itemsize, flat.numel() * itemsize
        stop = start + flat.numel()
        parts = self._parts.setdefault(name, [])
        at = bisect.bisect_left(parts, (start, stop))
        if (
            start < 0
            or first + size > end
            or (at > 0 and parts[at - 1][1] > start)
            or (at < len(parts) and parts[at][0] < stop and size > 0)
        ):
            raise ValueError(f"{name}: part [{start}, {stop}) lies outside the tensor or overlaps a written part")
        parts.insert(at, (start, stop))
        data = flat.detach().to("cpu").contiguous().view(torch.uint8).numpy()
        try:
            self._file.seek(self._data_start + first)
            self._file.write(memoryview(data))
        except OSError as err:
            _raise_os_error(err, self.path)
        self._unwritten[name] -= size
        if self._unwritten[name] == 0:
            self._pending.discard(name)
            self._parts.pop(name, None)

    def copy_from_file(self, name: str, source: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Write tensor ``name`` (of ``dtype`` and ``shape``, as stored) from ``source``'s bytes at ``offset``.

        For tensors passed through unchanged (the base copy, untouched slots): ``copy_file_range`` moves the
        bytes inside the kernel (or shares extents on file systems that can), with no page faults in this
        process; where it is unsupported the bytes go through a buffer.
        """
        begin, end, planned = self._offsets[name]
        if dtype != planned.dtype or tuple(shape) != planned.shape:
            raise ValueError(f"{name}: planned {planned.dtype} {planned.shape}, got {dtype} {tuple(shape)}")
        if self._unwritten.get(name) != planned.nbytes or name not in self._pending:
            raise ValueError(f"{name} written twice")
        remaining, src_pos, dst_pos = end - begin, offset, self._data_start + begin
        try:
            src = open(source, "rb")
        except OSError as err:
            raise CheckpointFormatError(
                f"{source}: cannot read it ({err.strerror})", file=str(source), hint="check the input's files"
            ) from None
        with src:
            try:
                self._file.flush()
                while remaining:
                    done = _copy_range(src, self._file, remaining, src_pos, dst_pos)
                    if done == 0:
                        break
                    remaining, src_pos, dst_pos = remaining - done, src_pos + done, dst_pos + done
            except OSError as err:
                _raise_os_error(err, self.path)
        if remaining:
            raise CheckpointFormatError(
                f"{source}: ended {remaining} bytes early (truncated?)",
                file=str(source),
                tensor=name,
                hint="the input file is truncated: fetch it again",
            )
        self._unwritten[name] = 0
        self._pending.discard(name)

    @property
    def complete(self) -> bool:
        return not self._pending

    def close(self) -> None:
        if self._pending:
            self._file.close()
            raise RuntimeError(f"{self.path}: closed with {len(self._pending)} tensors not written")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as err:
            _raise_os_error(err, self.path)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


_COPY_CHUNK = 1 << 26


def _copy_range(src, dst, count: int, src_pos: int, dst_pos: int) -> int:
    """Copy up to ``count`` bytes between positions of two open files; returns the bytes copied."""
    n = min(count, _COPY_CHUNK)
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(src.fileno(), dst.fileno(), n, src_pos, dst_pos)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    data = os.pread(src.fileno(), n, src_pos)
    return os.pwrite(dst.fileno(), data, dst_pos)


def _reserve(f, size: int) -> None:
    """Ask the file system for the whole file now, so a full disk is reported before the work is done."""
    if hasattr(os, "posix_fallocate") and size > 0:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # EOPNOTSUPP / EINVAL on some file systems: fall back to discovering a full disk while writing.


def plan_shards(entries: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards if shards[0] else []


class ShardedWriter:
    """Hugging Face style shards (``prefix-0000i-of-0000N.safetensors`` + index, or one ``prefix.safetensors``).

    Each shard is opened when its first tensor arrives and closed when its last one is written, so at most a
    few file handles are open and no tensor data is buffered.
    """

    def __init__(
        self,
        directory: Path,
        entries: Sequence[PlannedTensor],
        max_shard_bytes: int,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.prefix = prefix
        self.metadata = metadata
        self._shards = plan_shards(entries, max_shard_bytes)
        n = len(self._shards)
        self.file_names = (
            [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._shard_of = {e.name: i for i, shard in enumerate(self._shards) for e in shard}
        self._open: dict[int, SafetensorsFileWriter] = {}
        self._done: set[int] = set()
        self.total_bytes = sum(e.nbytes for e in entries)

    @property
    def names(self) -> Iterable[str]:
        return self._shard_of.keys()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i, writer = self._writer_for(name)
        writer.write(name, tensor)
        self._close_if_complete(i, writer)

    def write_range(self, name: str, flat: torch.Tensor, start: int) -> None:
        """One part of a tensor (see :meth:`SafetensorsFileWriter.write_range`)."""
        i, writer = self._writer_for(name)
        writer.write_range(name, flat, start)
        self._close_if_complete(i, writer)

    def copy_from_file(self, name: str, source: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """A tensor copied byte for byte from another file (see :meth:`SafetensorsFileWriter.copy_from_file`)."""
        i, writer = self._writer_for(name)
        writer.copy_from_file(name, source, offset, dtype, shape)
        self._close_if_complete(i, writer)

    def _writer_for(self, name: str) -> tuple[int, SafetensorsFileWriter]:
        i = self._shard_of[name]
        writer = self._open.get(i)
        if writer is None:
            if i in self._done:
                raise ValueError(f"{name}: its shard is already closed")
            writer = SafetensorsFileWriter(self.directory / self.file_names[i], self._shards[i], self.metadata)
            self._open[i] = writer
        return i, writer

    def _close_if_complete(self, i: int, writer: SafetensorsFileWriter) -> None:
        if writer.complete:
            writer.close()
            del self._open[i]
            self._done.add(i)

    def close(self) -> list[str]:
        """Check every planned tensor arrived, write the index; returns the file names written."""
        for i, shard in enumerate(self._shards):
            if i not in self._done:
                if not shard:
                    continue
                missing = [e.name for e in shard if i not in self._open or e.name in self._open[i]._pending]
                raise RuntimeError(f"{self.directory}: shard {self.file_names[i]} incomplete, missing {missing[:3]}")
        written = list(self.file_names) if self._shards else []
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: self.file_names[i] for name, i in self._shard_of.items()},
            }
            index_name = f"{self.prefix}.safetensors.index.json"
            (self.directory / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            written.append(index_name)
        return written

    def abort(self) -> None:
        for writer in self._open.values():
            writer.abort()
        self._open.clear()


def write_tensors(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    max_shard_bytes: int,
    prefix: str = "model",
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write small in-memory tensors (components, private rows) through the same sharded writer."""
    entries = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(directory, entries, max_shard_bytes, prefix, metadata)
    try:
        for name, t in tensors.items():
            writer.write(name, t)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


class StagedOutput:
    """An output directory that appears only when complete, and replaces only what mmer wrote.

    Everything is written to a hidden sibling directory (same file system, so the final rename is atomic);
    on any exception, Ctrl-C included, the staging directory is deleted and the target is left as it was.
    The staging directory gets mmer's marker first thing, so the output carries it too; ``overwrite`` then
    replaces only a directory with that marker (see :mod:`mmer.io.outputs`), never a path in ``protect`` (what
    the run reads) nor one containing it, and never a link at the target. Leftovers of killed runs to the same
    target are removed on entry and described in :attr:`warnings`, for the caller's report.
    """

    def __init__(
        self,
        target: str | Path,
        overwrite: bool = False,
        *,
        kind: str = "output",
        protect: Iterable[str | Path] = (),
    ) -> None:
        # abspath, not resolve: a link at the target must be seen (and refused), not followed.
        self.target = Path(os.path.abspath(os.path.expanduser(target)))
        self.overwrite = overwrite
        self.kind = kind
        self.warnings: list[str] = []
        check_target(self.target, overwrite, protect)
        self._tag = uuid.uuid4().hex[:8]
        self.staging = self.target.parent / staging_name(self.target, os.getpid(), self._tag)

    def __enter__(self) -> Path:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            _raise_os_error(err, self.target.parent)
        self.warnings += clear_leftovers(self.target)
        try:
            self.staging.mkdir()
        except OSError as err:
            _raise_os_error(err, self.staging)
        try:
            write_marker(self.staging, self.kind)
        except OSError as err:
            shutil.rmtree(self.staging, ignore_errors=True)
            _raise_os_error(err, self.staging)
        return self.staging

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            if isinstance(exc, OSError) and self._about_the_output(exc):
                _raise_os_error(exc, self.staging)
            return
        try:
            self.commit()
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise

    def _about_the_output(self, err: OSError) -> bool:
        """Whether an OS error raised inside the block was one writing the output (not one reading an input)."""
        if err.filename is None:
            return err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
        where = os.path.abspath(os.fsdecode(err.filename))
        return where == str(self.staging) or where.startswith(str(self.staging) + os.sep)

    def commit(self) -> None:
        target = self.target
        if target.is_symlink():
            raise OutputExistsError(
                f"{target}: a symbolic link appeared at the output while writing; it was not replaced",
                file=str(target),
                hint="remove the link, or choose another output path",
            )
        try:
            if not os.path.lexists(target):
                os.rename(self.staging, target)
                return
            if not self.overwrite:
                raise OutputExistsError(
                    f"{target}: appeared while writing",
                    file=str(target),
                    hint="run one writer per output, or choose another output path",
                )
            check_target(target, overwrite=True)  # it may have changed since the run began
            old = target.parent / old_name(target, os.getpid(), self._tag)
            os.rename(target, old)
            try:
                os.rename(self.staging, target)
            except OSError:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            _raise_os_error(err, target)


def pass_through(writer: ShardedWriter, name: str, reader: CheckpointReader, info: TensorInfo) -> None:
    """Write a stored tensor unchanged as ``name``: file to file in the kernel when it sits in a safetensors
    file (the base copy is a third of the output; routing it through memory cost seconds of page faults)."""
    if info.byte_range is not None:
        writer.copy_from_file(name, info.file, info.byte_range[0], info.dtype, info.shape)
    else:
        writer.write(name, reader.get(info.name, copy=False))
