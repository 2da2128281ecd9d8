"""A modality's whole LLM tensor from its parts (FORMAT.md "Rebuilding a modality"): the rule every rebuild uses."""

from __future__ import annotations

import pytest
import torch

from mmer.checkpoint.decoupled import modality_tensor, slot_dtype
from mmer.checkpoint.manifest import SlotRecord
from mmer.errors import DecoupledFormatError


def _never() -> torch.Tensor:
    raise AssertionError("a whole private tensor needs no rebuild")


def test_a_whole_private_tensor_is_the_answer_and_nothing_is_rebuilt():
    whole = torch.arange(6.0).reshape(3, 2)
    assert modality_tensor(_never, whole, 0) is whole
    target = torch.zeros(3, 2)
    assert torch.equal(modality_tensor(_never, whole, 0, into=target), whole)


def test_without_private_rows_the_shared_rows_are_the_tensor():
    shared = torch.ones(2, 2)
    assert modality_tensor(lambda: shared) is shared


def test_private_rows_follow_the_shared_rows_in_the_shared_rows_dtype_unless_told():
    shared = torch.ones(2, 2, dtype=torch.bfloat16)
    rows = torch.full((1, 2), 2.5, dtype=torch.float32)
    joined = modality_tensor(lambda: shared, rows, 2)
    assert joined.dtype == torch.bfloat16 and joined.shape == (3, 2) and float(joined[2, 0]) == 2.5
    assert modality_tensor(lambda: shared, rows, 2, dtype=torch.float32).dtype == torch.float32


def test_into_writes_every_part_in_place_and_leaves_the_rows_after_them_alone():
    target = torch.full((4, 2), -1.0)
    out = modality_tensor(lambda: torch.ones(2, 2), torch.full((1, 2), 3.0), 2, into=target)
    assert out is target
    assert target.tolist() == [[1.0, 1.0], [1.0, 1.0], [3.0, 3.0], [-1.0, -1.0]]


def test_a_slot_dtype_is_read_from_the_manifest_and_an_unknown_one_is_refused():
    slot = SlotRecord(name="w", shape=[2], dtype="BF16", merged=True)
    assert slot_dtype(slot) is torch.bfloat16
    with pytest.raises(DecoupledFormatError, match="unknown dtype"):
        slot_dtype(SlotRecord(name="w", shape=[2], dtype="Q4", merged=True))
