"""The torch path of a switch (GPUs, dtypes the kernel does not cover, MMER_FUSED=0) rebuilds a tensor slice by
slice from the packed bits, so no unpacked mask or float32 copy of a whole tensor is ever held, and still gives
``rebuild_weight``'s and ``rebuild_mean_weight``'s results bit for bit."""

from __future__ import annotations

import pytest
import torch
from route_fixtures import VARIANTS, merged_checkpoint, variant_checkpoint

import mmer
from mmer.checkpoint import bits
from mmer.route import switch_kernel, weights
from mmer.route.router import Router
from mmer.route.weights import MEAN, rebuild_mean_weight


def bit_identical(got: torch.Tensor, want: torch.Tensor) -> bool:
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    return got.dtype == want.dtype and got.shape == want.shape and torch.equal(got.view(width), want.view(width))


@pytest.fixture
def torch_path(monkeypatch):
    """The kernel off and slices of 40 entries (not a multiple of any row), so every tensor takes several."""
    monkeypatch.setenv("MMER_FUSED", "0")
    monkeypatch.setattr(weights, "REBUILD_CHUNK", 40)
    switch_kernel._kernel.cache_clear()
    switch_kernel._mean_kernel.cache_clear()
    yield
    monkeypatch.delenv("MMER_FUSED")
    switch_kernel._kernel.cache_clear()
    switch_kernel._mean_kernel.cache_clear()


@pytest.mark.parametrize("variant", ["default", "emr-rescaled", "fp32-tau-base-by-reference"])
def test_switches_rebuilt_in_slices_equal_the_checkpoints_tensors_and_the_text_weights(
    demo_models, tmp_path_factory, torch_path, variant
):
    assert variant == "default" or variant in VARIANTS
    if variant == "default":
        path = merged_checkpoint(demo_models, tmp_path_factory)
    else:
        path = variant_checkpoint(demo_models, tmp_path_factory, variant)
    router = Router.from_pretrained(path)
    unpacked = []
    real = bits.unpack
    spy = lambda packed, shape: unpacked.append(len(packed)) or real(packed, shape)  # noqa: E731
    with mmer.load_decoupled(path) as ckpt:
        for modality in ("audio", "vision", MEAN, "audio"):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(bits, "unpack", spy)
                router.switch(modality)
            for name, tensor in router.llm_state().items():
                if modality != MEAN:
                    assert bit_identical(tensor, ckpt.llm_tensor(modality, name)), name
                elif name in router.weights.tau:
                    w = router.weights
                    masks = [w.mask(m, name) for m in w.modalities]
                    want = rebuild_mean_weight(w.base[name], w.tau[name], masks, [w.scales[m] for m in w.modalities])
                    assert bit_identical(tensor[: want.shape[0]], want), name
    assert unpacked and max(unpacked) <= 5  # 40 entries: 5 bytes of a mask at a time, never a whole tensor's
