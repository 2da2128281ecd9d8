"""Bit-packed masks: 1 bit per parameter, in a fixed, documented order (FORMAT.md, "Mask files").

A mask is flattened in row-major (C) order; parameter ``p`` is bit ``p % 8`` (least significant first) of
byte ``p // 8``; the last byte's unused high bits are 0. The same bytes come out of the NumPy path (fast on
CPU) and the torch path (runs on any device, used by the router to unpack on the GPU).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BIT_ORDER = "little"
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def packed_size(numel: int) -> int:
    """Bytes needed for ``numel`` bits."""
    return (numel + 7) // 8


def pack(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor of any shape into a 1-D uint8 tensor of ``ceil(numel/8)`` bytes."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack expects a bool tensor, got {mask.dtype}")
    if mask.device.type == "cpu":
        flat = mask.contiguous().reshape(-1).numpy()
        return torch.from_numpy(np.packbits(flat, bitorder=BIT_ORDER))
    return pack_torch(mask)


def pack_torch(mask: torch.Tensor) -> torch.Tensor:
    """The device-agnostic packer (same bytes as :func:`pack`)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int32)).to(torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Unpack bytes from :func:`pack` into a bool tensor of ``shape`` on the bytes' device."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"unpack expects a 1-D uint8 tensor, got {packed.dtype} with {packed.dim()} dims")
    if packed.numel() != packed_size(numel):
        raise ValueError(f"{packed.numel()} bytes cannot hold a mask of shape {shape} ({packed_size(numel)} needed)")
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.numpy(), count=numel, bitorder=BIT_ORDER)
        return torch.from_numpy(bits.astype(bool, copy=False)).reshape(shape)
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool().reshape(shape)


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits (kept parameters) without unpacking."""
    return int(_POPCOUNT[packed.cpu().numpy()].sum())


def popcount_and(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of parameters kept by both masks, on packed bytes."""
    return int(_POPCOUNT[np.bitwise_and(a.cpu().numpy(), b.cpu().numpy())].sum())


def popcount_or(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of parameters kept by either mask, on packed bytes."""
    return int(_POPCOUNT[np.bitwise_or(a.cpu().numpy(), b.cpu().numpy())].sum())
