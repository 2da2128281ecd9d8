"""τ* stored as integer codes with one scale per group: the optional ``tau_storage: int8 | int4`` encoding.

Storage only. The merge computes τ* and every modality's mask from the exact τ* (MMER, arXiv 2505.17110, §3.2:
the masks compare τᵢ with τ* itself), and only then writes τ* in this encoding; a reader dequantises each tensor
when it is read, so θ̂ᵢ = θ_base + sᵢ·mᵢ∘deq(q(τ*)), and every rebuilt entry is off by at most half its group's
scale (round to nearest) times sᵢ where its mask bit is set.

The encoding is absmax quantisation (LLM.int8(), arXiv 2208.07339, §2.1) with one scale per group rather than per
tensor, so one large entry costs precision only in its own group: along the last dimension each run of
``group_size`` consecutive entries (the last run of a row may be shorter) shares one float32 scale s = max|x| /
qmax, and each entry is stored as round(x / s) in [−qmax, qmax] (qmax = 127 for int8, 7 for int4; −128 and −8 are
never written, so the codes are symmetric). int4 codes are packed two per byte along the last dimension. The byte
layout is specified in FORMAT.md ("Quantised τ*"); this module is the one place that writes and reads it.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmer.checkpoint.manifest import QUANTISED_FORMAT_VERSION, TAU_STAR_DIR, Manifest, TauEncoding
from mmer.config import DEFAULT_TAU_GROUP_SIZE, MAX_TAU_GROUP_SIZE, TAU_STORAGES, MergeOptions
from mmer.errors import DecoupledFormatError, NonFiniteError
from mmer.io.reader import CheckpointReader
from mmer.io.writer import PlannedTensor, ShardedWriter
from mmer.version import __version__

SCALES_SUFFIX = ":scales"  # the scales of tensor N are stored as tensor "N:scales" (":" is in no module path)
QUANTISED_FORMAT = "mmer-tau-star-quantised/1"
EXACT = "exact"
DEFAULT_GROUP_SIZE = DEFAULT_TAU_GROUP_SIZE
MAX_GROUP_SIZE = MAX_TAU_GROUP_SIZE
BLOCK_ELEMENTS = 1 << 22  # rows are (de)quantised in blocks of about this many entries: memory stays bounded


@dataclass(frozen=True)
class Scheme:
    """One integer encoding: how many bits a code has, its largest magnitude, and how codes are stored."""

    name: str
    bits: int
    qmax: int
    code_dtype: torch.dtype  # int8 codes as I8; int4 codes packed two per byte as U8


SCHEMES = {
    "int8": Scheme("int8", 8, 127, torch.int8),
    "int4": Scheme("int4", 4, 7, torch.uint8),
}
assert TAU_STORAGES == (EXACT, *SCHEMES), "the recipe's tau_storage names are the encodings here"


def scheme(name: str) -> Scheme:
    return SCHEMES[name]


# ---------------------------------------------------------------------------------------------------- shapes
def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """A tensor seen as rows of its last dimension (a 0-d tensor is one row of one entry)."""
    cols = shape[-1] if shape else 1
    return (math.prod(shape[:-1]) if shape else 1), cols


def codes_shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    """The stored codes' shape: the tensor's own for int8; the last dimension halved (rounded up) for int4."""
    if name == "int8":
        return tuple(shape)
    lead, cols = (tuple(shape[:-1]), shape[-1]) if shape else ((), 1)
    return (*lead, (cols + 1) // 2)


def scales_shape(shape: Sequence[int], group_size: int) -> tuple[int, ...]:
    """One scale per group: the tensor's leading dimensions, then ⌈last / group_size⌉ groups."""
    lead, cols = (tuple(shape[:-1]), shape[-1]) if shape else ((), 1)
    return (*lead, -(-cols // group_size))


def stored_bytes(shape: Sequence[int], name: str, group_size: int) -> int:
    """Bytes the codes and scales of one tensor take (the measure beside the exact τ*'s bytes)."""
    codes = math.prod(codes_shape(shape, name)) * SCHEMES[name].code_dtype.itemsize
    return codes + math.prod(scales_shape(shape, group_size)) * 4


# ------------------------------------------------------------------------------------------------- the maths
def quantise_rows(
    x: torch.Tensor, name: str, group_size: int, tensor: str = "τ*"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of ``x`` ([rows, cols], any float dtype): symmetric absmax per group of the last dim.

    A group of zeros gets the scale 1 (any positive scale gives it the codes 0; a zero scale is what a reader
    refuses). The scale is computed and stored in float32, and each code is round-half-to-even of x / s, so
    |x − code·s| ≤ s/2 up to float32 rounding of that quotient.
    """
    s = SCHEMES[name]
    rows, cols = x.shape
    groups = -(-cols // group_size)
    x = x.float()
    padded = torch.nn.functional.pad(x, (0, groups * group_size - cols)).view(rows, groups, group_size)
    absmax = padded.abs().amax(dim=-1)
    if not bool(torch.isfinite(absmax).all()):  # amax carries a NaN or inf through: one check per group, not entry
        raise NonFiniteError(
            f"{tensor} holds NaN or inf, which has no {name} scale",
            tensor=tensor,
            key="tau_storage",
            hint="store τ* exact (tau_storage: exact) when merging with allow_nonfinite",
        )
    scales = absmax / s.qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # zeros (and absmax that underflows)
    codes = torch.round(padded / scales.unsqueeze(-1)).clamp_(-s.qmax, s.qmax).to(torch.int8)
    codes = codes.view(rows, groups * group_size)[:, :cols]
    return (pack_int4(codes) if name == "int4" else codes.contiguous()), scales


def dequantise_rows(
    codes: torch.Tensor, scales: torch.Tensor, cols: int, name: str, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """[rows, cols] in ``dtype`` from stored codes and scales: code·s computed in float32, then cast."""
    return _scaled(unpack_int4(codes, cols) if name == "int4" else codes, scales, cols, group_size, dtype)


def _scaled(ints: torch.Tensor, scales: torch.Tensor, cols: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    rows, groups = ints.shape[0], scales.shape[-1]
    padded = torch.nn.functional.pad(ints.to(torch.float32), (0, groups * group_size - cols))
    out = (padded.view(rows, groups, group_size) * scales.unsqueeze(-1)).view(rows, groups * group_size)
    return out[:, :cols].to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [−8, 7], [rows, cols] → [rows, ⌈cols/2⌉] bytes: entry 2k in the low nibble of byte k, entry
    2k+1 in its high nibble, each nibble two's complement; an odd row's last high nibble is 0."""
    rows, cols = codes.shape
    if cols % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    nibbles = (codes & 0xF).to(torch.uint8)
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: [rows, ⌈cols/2⌉] bytes → int8 codes [rows, cols]."""
    rows = packed.shape[0]
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(rows, -1)[:, :cols].to(torch.int8)
    return torch.where(nibbles > 7, nibbles - 16, nibbles)


# --------------------------------------------------------------------------------------------------- reading
def dequantise(
    codes: torch.Tensor,
    scales: torch.Tensor,
    shape: Sequence[int],
    name: str,
    group_size: int,
    dtype: torch.dtype,
    *,
    file: str,
    tensor: str,
) -> torch.Tensor:
    """One whole τ* tensor of ``shape`` in ``dtype`` from its stored codes and scales (shapes already checked
    against the manifest), refusing what no writer writes: a scale that is not a positive number whose ·qmax is
    finite in ``dtype``, a code of −qmax−1, a set padding nibble. Rows go in blocks, so besides the answer only
    one block's float32 copy is held."""
    s = SCHEMES[name]
    rows, cols = _rows_cols(shape)
    codes = codes.reshape(rows, -1)
    scales = scales.reshape(rows, -1)
    out = torch.empty((rows, cols), dtype=dtype)
    limit = torch.finfo(dtype).max / s.qmax
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        c, sc = codes[r0 : r0 + step], scales[r0 : r0 + step]
        bad = ~((sc > 0) & (sc <= limit))  # NaN fails both
        if bool(bad.any()):
            value = float(sc[bad][0])
            raise DecoupledFormatError(
                f"{file}: {tensor!r} has a group scale of {value!r}; a quantised τ* stores only positive scales "
                f"whose {s.qmax}× is finite in {str(dtype).removeprefix('torch.')}",
                file=file,
                tensor=tensor + SCALES_SUFFIX,
                hint="the file is corrupt or hostile; fetch the checkpoint again, run `mmer verify`, or re-run the "
                "merge",
            )
        ints = c
        if name == "int4":
            if cols % 2 and bool((c[:, -1] >> 4).any()):
                raise _bad_codes(file, tensor, "a padding nibble past the last entry of a row is not 0")
            ints = unpack_int4(c, cols)
        if bool((ints == -s.qmax - 1).any()):
            raise _bad_codes(file, tensor, f"holds the code {-s.qmax - 1}; a writer stores codes in ±{s.qmax}")
        values = _scaled(ints, sc, cols, group_size, dtype)
        out[r0 : r0 + step] = values
    return out.view(tuple(shape))


def _bad_codes(file: str, tensor: str, why: str) -> DecoupledFormatError:
    return DecoupledFormatError(
        f"{file}: {tensor!r}: {why}",
        file=file,
        tensor=tensor,
        hint="the file is corrupt or hostile; fetch the checkpoint again, run `mmer verify`, or re-run the merge",
    )


# --------------------------------------------------------------------------------------------------- writing
def store_tau_star(
    staging: Path, options: MergeOptions, merged: Sequence[tuple[str, tuple[int, ...]]]
) -> TauEncoding | None:
    """Put the τ* the merge pass wrote in ``staging`` (``merged``: each merged slot's name and shape) into the
    recipe's ``tau_storage``; the encoding to record in the manifest (``None``: exact, left as written)."""
    if options.tau_storage == EXACT or not merged or not (staging / TAU_STAR_DIR).is_dir():
        return None  # the options refuse a quantised single merged model (it has no τ* directory)
    slots = list(merged)
    metadata = {"mmer_version": __version__}
    quantise_directory(
        staging / TAU_STAR_DIR, slots, options.tau_storage, options.tau_group_size, options.shard_size, metadata
    )
    return TauEncoding(options.tau_storage, options.tau_group_size)  # type: ignore[arg-type]


def record_encoding(manifest: Manifest, encoding: TauEncoding | None) -> None:
    """Record a quantised τ*'s encoding, and the format version a reader must know to read it (FORMAT.md)."""
    if encoding is not None:
        manifest.tau_star_encoding = encoding
        manifest.format_version = QUANTISED_FORMAT_VERSION


def quantise_directory(
    directory: Path,
    slots: Sequence[tuple[str, tuple[int, ...]]],
    name: str,
    group_size: int,
    shard_size: int,
    metadata: dict[str, str],
) -> None:
    """Replace the exact τ* in ``directory`` (as the merge wrote it) by its codes and scales, tensor by tensor.

    The merge has already computed every mask and rescaler from the exact values; this is the last step that
    touches τ*. Read through the memory map and written in row blocks, so memory stays bounded whatever a
    tensor's size. A τ* holding NaN or inf (merged with ``allow_nonfinite``) has no scale and is refused.
    """
    s = SCHEMES[name]
    staged = directory.with_name(directory.name + ".quantised")
    staged.mkdir()
    entries = []
    for slot, shape in slots:
        entries.append(PlannedTensor(slot, s.code_dtype, codes_shape(shape, name)))
        entries.append(PlannedTensor(slot + SCALES_SUFFIX, torch.float32, scales_shape(shape, group_size)))
    meta = {**metadata, "format": QUANTISED_FORMAT, "scheme": name, "group_size": str(group_size)}
    writer = ShardedWriter(staged, entries, shard_size, metadata=meta)
    reader = CheckpointReader(directory)
    try:
        for slot, shape in slots:
            rows, cols = _rows_cols(shape)
            exact = reader.get(slot, copy=False).reshape(rows, cols)
            code_cols = codes_shape(shape, name)[-1] if shape else 1
            groups = scales_shape(shape, group_size)[-1]
            if rows * cols == 0:
                writer.write_range(slot, torch.empty(0, dtype=s.code_dtype), 0)
                writer.write_range(slot + SCALES_SUFFIX, torch.empty(0, dtype=torch.float32), 0)
                continue
            step = max(1, BLOCK_ELEMENTS // cols)
            for r0 in range(0, rows, step):
                codes, scales = quantise_rows(exact[r0 : r0 + step], name, group_size, tensor=f"τ* of {slot}")
                writer.write_range(slot, codes.reshape(-1), r0 * code_cols)
                writer.write_range(slot + SCALES_SUFFIX, scales.reshape(-1), r0 * groups)
        writer.close()
    except BaseException:
        writer.abort()
        reader.close()
        shutil.rmtree(staged, ignore_errors=True)
        raise
    reader.close()
    shutil.rmtree(directory)
    staged.rename(directory)
