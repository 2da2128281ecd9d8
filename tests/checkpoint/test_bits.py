"""Specifies mmer/checkpoint/bits.py: 1-bit masks packed in the documented order (FORMAT.md, "Mask files").

Row-major flattening; parameter ``p`` is bit ``p % 8`` (least significant first) of byte ``p // 8``; the unused
high bits of the last byte are 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from mmer.checkpoint.bits import pack, pack_torch, packed_size, popcount, popcount_and, popcount_or, unpack

SHAPES = [
    (),
    (0,),
    (0, 3),
    (2, 0, 5),
    *[(n,) for n in range(1, 18)],
    (3, 5),
    (4, 4),
    (7, 9),
    (2, 3, 4),
    (3, 1, 7),
    (5, 13, 3),
    (1000,),
    (1001,),
]


def _random_mask(shape: tuple[int, ...], seed: int = 0, density: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


@pytest.mark.parametrize(
    ("numel", "size"), [(0, 0), (1, 1), (7, 1), (8, 1), (9, 2), (16, 2), (17, 3), (1_000_001, 125_001)]
)
def test_packed_size_is_numel_over_eight_rounded_up(numel: int, size: int) -> None:
    assert packed_size(numel) == size


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_pack_then_unpack_round_trips_bit_for_bit(shape: tuple[int, ...], density: float) -> None:
    mask = _random_mask(shape, seed=len(shape), density=density)
    packed = pack(mask)
    assert packed.dtype == torch.uint8
    assert packed.dim() == 1
    assert packed.numel() == packed_size(math.prod(shape))
    out = unpack(packed, shape)
    assert out.dtype == torch.bool
    assert out.shape == shape
    assert torch.equal(out, mask)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_torch_packer_gives_the_same_bytes_as_the_numpy_packer(shape: tuple[int, ...]) -> None:
    mask = _random_mask(shape, seed=3)
    assert torch.equal(pack_torch(mask), pack(mask))


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_torch_then_unpack_round_trips_bit_for_bit(shape: tuple[int, ...]) -> None:
    mask = _random_mask(shape, seed=4)
    assert torch.equal(unpack(pack_torch(mask), list(shape)), mask)


def test_bit_p_is_bit_p_mod_8_least_significant_first_of_byte_p_div_8() -> None:
    mask = torch.zeros(11, dtype=torch.bool)
    mask[[0, 3, 8, 10]] = True
    # byte 0 holds p = 0..7: bits 0 and 3 → 0b0000_1001 = 9; byte 1 holds p = 8..10: bits 0 and 2 → 0b101 = 5
    expected = torch.tensor([9, 5], dtype=torch.uint8)
    assert torch.equal(pack(mask), expected)
    assert torch.equal(pack_torch(mask), expected)
    assert torch.equal(unpack(expected, (11,)), mask)


def test_a_single_set_bit_lands_at_its_documented_place() -> None:
    for p in range(20):
        mask = torch.zeros(20, dtype=torch.bool)
        mask[p] = True
        expected = torch.zeros(3, dtype=torch.uint8)
        expected[p // 8] = 1 << (p % 8)
        assert torch.equal(pack(mask), expected), p
        assert torch.equal(pack_torch(mask), expected), p


def test_a_2d_mask_is_flattened_in_row_major_order() -> None:
    # shape (2, 5): row 0 col 0 is p = 0, row 1 col 3 is p = 5 + 3 = 8 → bytes [0b1, 0b1]
    mask = torch.tensor([[True, False, False, False, False], [False, False, False, True, False]])
    expected = torch.tensor([1, 1], dtype=torch.uint8)
    assert torch.equal(pack(mask), expected)
    assert torch.equal(pack_torch(mask), expected)


def test_a_non_contiguous_mask_packs_in_the_order_of_its_logical_layout() -> None:
    mask = _random_mask((6, 11), seed=5).t()
    assert not mask.is_contiguous()
    expected = pack(mask.contiguous())
    assert torch.equal(pack(mask), expected)
    assert torch.equal(pack_torch(mask), expected)
    assert torch.equal(unpack(expected, mask.shape), mask)


@pytest.mark.parametrize("numel", [1, 3, 7, 9, 13, 15, 17, 1001])
def test_the_unused_high_bits_of_the_last_byte_are_zero(numel: int) -> None:
    mask = torch.ones(numel, dtype=torch.bool)
    used = numel % 8
    for packed in (pack(mask), pack_torch(mask)):
        assert torch.all(packed[:-1] == 255)
        assert int(packed[-1]) == (1 << used) - 1


@pytest.mark.parametrize("shape", [(0,), (1,), (9,), (4, 6), (3, 5, 7), (1001,)])
@pytest.mark.parametrize("seed", [0, 1])
def test_popcounts_match_counting_the_unpacked_masks(shape: tuple[int, ...], seed: int) -> None:
    a = _random_mask(shape, seed=seed, density=0.4)
    b = _random_mask(shape, seed=seed + 100, density=0.6)
    pa, pb = pack(a), pack(b)
    assert popcount(pa) == int(a.sum())
    assert popcount_and(pa, pb) == int((a & b).sum())
    assert popcount_or(pa, pb) == int((a | b).sum())


def test_popcount_of_an_all_ones_mask_ignores_the_padding() -> None:
    packed = pack(torch.ones(13, dtype=torch.bool))
    assert popcount(packed) == 13
    assert popcount_and(packed, packed) == 13
    assert popcount_or(packed, pack(torch.zeros(13, dtype=torch.bool))) == 13


@pytest.mark.parametrize(("n_bytes", "shape"), [(1, (9,)), (3, (9,)), (0, (1,)), (0, ()), (2, (2, 4)), (1, (0,))])
def test_unpack_refuses_a_byte_count_that_does_not_fit_the_shape(n_bytes: int, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="bytes cannot hold a mask of shape"):
        unpack(torch.zeros(n_bytes, dtype=torch.uint8), shape)


@pytest.mark.parametrize(
    "packed",
    [
        torch.zeros(2, dtype=torch.int8),
        torch.zeros(2, dtype=torch.int32),
        torch.zeros(2, dtype=torch.bool),
        torch.zeros(1, 2, dtype=torch.uint8),
        torch.tensor(0, dtype=torch.uint8),
    ],
)
def test_unpack_refuses_anything_but_a_1d_uint8_tensor(packed: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="1-D uint8"):
        unpack(packed, (16,))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.float32])
def test_pack_refuses_a_mask_that_is_not_bool(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="bool tensor"):
        pack(torch.ones(8, dtype=dtype))


class _Elsewhere(torch.Tensor):
    """A CPU tensor that claims to live on another device, so that bits.py takes its torch (device) path."""

    @property
    def device(self) -> torch.device:
        return torch.device("meta")


class _FactoriesOnCpu(TorchFunctionMode):
    """Runs the tensors bits.py creates ``on packed.device`` (the claimed ``meta``) on the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") == torch.device("meta"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@pytest.fixture
def numpy_path_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the NumPy path ran, not the torch path")

    monkeypatch.setattr(np, "packbits", refuse)
    monkeypatch.setattr(np, "unpackbits", refuse)


@pytest.mark.parametrize("shape", [(), (0,), (1,), (13,), (3, 5), (2, 3, 4), (1001,)])
def test_the_torch_unpack_path_recovers_the_bits_packed_on_the_cpu(
    shape: tuple[int, ...], numpy_path_disabled: None
) -> None:
    mask = _random_mask(shape, seed=7)
    packed = pack_torch(mask).as_subclass(_Elsewhere)
    with _FactoriesOnCpu():
        out = unpack(packed, shape)
    out = out.as_subclass(torch.Tensor)
    assert out.dtype == torch.bool
    assert out.shape == shape
    assert torch.equal(out, mask)


@pytest.mark.parametrize("shape", [(), (0,), (13,), (3, 5), (1001,)])
def test_pack_off_the_cpu_takes_the_torch_path_and_gives_the_documented_bytes(
    shape: tuple[int, ...], numpy_path_disabled: None
) -> None:
    mask = _random_mask(shape, seed=8)
    expected = pack_torch(mask)  # the same bytes as the NumPy packer (tested above)
    with _FactoriesOnCpu():
        packed = pack(mask.as_subclass(_Elsewhere))
    assert torch.equal(packed.as_subclass(torch.Tensor), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(), (0,), (13,), (3, 5), (2, 3, 4), (1001,)])
def test_the_device_paths_give_the_same_bytes_and_bits_as_the_cpu_paths(shape: tuple[int, ...]) -> None:
    mask = _random_mask(shape, seed=6)
    cpu_bytes = pack(mask)
    gpu_bytes = pack(mask.cuda())
    assert gpu_bytes.device.type == "cuda"
    assert torch.equal(gpu_bytes.cpu(), cpu_bytes)
    out = unpack(cpu_bytes.cuda(), shape)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), mask)
