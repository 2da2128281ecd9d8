"""mmer.route.switch_kernel: the one-pass switch rebuild equals ``rebuild_weight`` bit for bit, from packed bits."""

from __future__ import annotations

import pytest
import torch
from route_fixtures import VARIANTS, merged_checkpoint, variant_checkpoint

import mmer
from mmer.checkpoint import bits
from mmer.merge.masks import rebuild_weight
from mmer.merge.overflow import max_abs
from mmer.route import switch_kernel
from mmer.route.weights import rebuild_mean_weight

pytestmark = pytest.mark.skipif(switch_kernel._kernel() is None, reason="numba absent or MMER_FUSED=0")

# (base dtype, τ* dtype): τ* is stored in the base's dtype, or in float32 (delta_dtype=float32)
COMBOS = [
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.float32, torch.float32),
]
SCALES = [1.0, 1.37, 0.5, -0.75]  # EMR's rescalers are ≠ 1; a negative one turns masked-out +0.0 into −0.0


def kernel_rebuild(base: torch.Tensor, tau: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.full_like(base, 7.0)  # garbage the kernel must overwrite everywhere
    packed = bits.pack(mask)
    assert switch_kernel.supports(base, tau, packed, out)
    switch_kernel.rebuild_into(out, base, tau, packed, scale)
    return out


def assert_bit_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    width = {2: torch.int16, 4: torch.int32}[got.element_size()]
    differ = got.view(width) != want.view(width)
    assert not differ.any(), f"{int(differ.sum())} entries differ, first at {differ.nonzero()[0].tolist()}"


def extreme_values(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Near-overflow, subnormal, ±0, ±1 and smallest-normal values of ``dtype``, shuffled, NaN-free."""
    info = torch.finfo(dtype)
    big = [info.max, -info.max, info.max / 2]
    small = [info.tiny, -info.tiny, info.tiny / 4, -info.tiny / 8]  # smallest normal, and subnormals
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, *big, *small], dtype=torch.float64).to(dtype)
    picks = torch.randint(0, len(specials), (n,), generator=generator)
    return specials[picks]


def draw(kind: str, n: int, base_dtype: torch.dtype, tau_dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        base = torch.randn(n, generator=g).to(base_dtype)
        tau = (torch.randn(n, generator=g) * 0.02).to(tau_dtype)
    elif kind == "tied":  # few distinct values: many exact ties, cancellations to ±0 and rounding half-way cases
        base = (torch.randint(-4, 5, (n,), generator=g).float() / 8).to(base_dtype)
        tau = (torch.randint(-4, 5, (n,), generator=g).float() / 8 + 2.0**-9).to(tau_dtype)
        tau[::3] = -base[::3].to(tau_dtype)  # θ_base + τ* = 0 exactly: ±0 from a sum
    else:  # extreme magnitudes of each dtype, so the float32 sum overflows, goes subnormal or cancels
        base = extreme_values(n, base_dtype, g)
        tau = extreme_values(n, tau_dtype, g)
    mask = torch.rand(n, generator=g) < 0.5
    return base, tau, mask


@pytest.mark.parametrize("base_dtype,tau_dtype", COMBOS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", ["random", "tied", "extreme"])
@pytest.mark.parametrize("scale", SCALES)
def test_the_kernel_writes_exactly_what_rebuild_weight_computes(base_dtype, tau_dtype, kind, scale):
    base, tau, mask = draw(kind, 40_003, base_dtype, tau_dtype, seed=len(kind))
    assert_bit_identical(kernel_rebuild(base, tau, mask, scale), rebuild_weight(base, tau, mask, scale=scale))


@pytest.mark.parametrize("base_dtype,tau_dtype", COMBOS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n", [1, 7, 9, 8 * 1024 + 5, switch_kernel.BLOCK + 3, 2 * switch_kernel.BLOCK - 1])
def test_sizes_that_are_not_whole_bytes_or_blocks_rebuild_every_entry(base_dtype, tau_dtype, n):
    base, tau, mask = draw("random", n, base_dtype, tau_dtype, seed=n)
    mask[-1] = True  # the last entry reads the last, partly used mask byte
    assert_bit_identical(kernel_rebuild(base, tau, mask, 1.25), rebuild_weight(base, tau, mask, scale=1.25))


@pytest.mark.parametrize("base_dtype,tau_dtype", COMBOS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_the_kernel_reports_the_largest_magnitudes_of_base_and_tau_under_every_bit(base_dtype, tau_dtype, kind):
    base, tau, mask = draw(kind, 3 * switch_kernel.BLOCK + 11, base_dtype, tau_dtype, seed=5)
    mask[:] = False  # masked-out entries count too: they rebuild to θ_base under another modality's mask
    base[-1], tau[7] = -(2.0**15), float("-inf")
    out = torch.empty_like(base)
    maxima = switch_kernel.rebuild_into(out, base, tau, bits.pack(mask), 1.0)
    assert maxima == (max_abs(base), max_abs(tau)) == (float(base.float().abs().max()), float("inf"))


@pytest.mark.parametrize("base_dtype,tau_dtype", COMBOS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", ["random", "tied", "extreme"])
@pytest.mark.parametrize(
    "scales", [(1.0,), (1.0, 1.0), (1.0, 1.0, 1.0), (1.37, 0.5), (0.9, -0.75, 1.1)], ids=lambda s: str(list(s))
)
def test_the_text_weight_kernel_writes_exactly_what_rebuild_mean_weight_computes(base_dtype, tau_dtype, kind, scales):
    base, tau, _ = draw(kind, 3 * 8 * 1024 + 13, base_dtype, tau_dtype, seed=len(scales))
    g = torch.Generator().manual_seed(11)
    masks = [torch.rand(base.shape, generator=g) < density for density in (0.3, 0.05, 0.6)[: len(scales)]]
    out = torch.full_like(base, 7.0)  # garbage the kernel must overwrite everywhere
    packed = [bits.pack(m) for m in masks]
    assert switch_kernel.supports_mean(base, tau, packed, out)
    switch_kernel.rebuild_mean_into(out, base, tau, packed, scales)
    assert_bit_identical(out, rebuild_mean_weight(base, tau, masks, scales))


def test_a_masked_out_negative_zero_base_becomes_positive_zero_as_torch_makes_it():
    base = torch.tensor([-0.0, -0.0, -0.0, 2.0], dtype=torch.bfloat16)
    tau = torch.tensor([-1.0, -0.0, 0.0, -2.0], dtype=torch.bfloat16)
    mask = torch.tensor([False, False, True, True])
    want = rebuild_weight(base, tau, mask)
    assert_bit_identical(kernel_rebuild(base, tau, mask, 1.0), want)
    assert torch.equal(want.view(torch.int16), torch.tensor([0, 0, 0, 0], dtype=torch.int16))


def test_a_two_dimensional_tensor_rebuilds_in_row_major_bit_order():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 13, generator=g).to(torch.bfloat16)
    tau = torch.randn(37, 13, generator=g).to(torch.bfloat16)
    mask = torch.rand(37, 13, generator=g) < 0.3
    assert_bit_identical(kernel_rebuild(base, tau, mask, 1.0), rebuild_weight(base, tau, mask))


def test_what_the_kernel_does_not_cover_is_left_to_the_torch_path():
    base = torch.zeros(16, dtype=torch.bfloat16)
    packed = bits.pack(torch.ones(16, dtype=torch.bool))
    assert not switch_kernel.supports(base, torch.zeros(16, dtype=torch.float16), packed, base.clone())
    assert not switch_kernel.supports(base, torch.zeros(16, dtype=torch.bfloat16), packed, torch.zeros(16))
    assert not switch_kernel.supports(base.double(), torch.zeros(16, dtype=torch.float64), packed, base.double())
    strided = torch.zeros(16, 2, dtype=torch.bfloat16)[:, 0]
    assert not switch_kernel.supports(base, torch.zeros(16, dtype=torch.bfloat16), packed, strided)


def test_with_mmer_fused_0_the_kernel_is_off(monkeypatch):
    monkeypatch.setenv("MMER_FUSED", "0")
    switch_kernel._kernel.cache_clear()
    try:
        assert switch_kernel._kernel() is None
        base = torch.zeros(16, dtype=torch.bfloat16)
        packed = bits.pack(torch.ones(16, dtype=torch.bool))
        assert not switch_kernel.supports(base, base.clone(), packed, base.clone())
    finally:
        monkeypatch.delenv("MMER_FUSED")
        switch_kernel._kernel.cache_clear()


@pytest.mark.parametrize("variant", ["default", *sorted(VARIANTS)])
def test_a_routers_switches_go_through_the_kernel_and_give_the_checkpoints_tensors_bit_for_bit(
    demo_models, tmp_path_factory, monkeypatch, variant
):
    from mmer.route.router import Router

    if variant == "default":
        path = merged_checkpoint(demo_models, tmp_path_factory)
    else:
        path = variant_checkpoint(demo_models, tmp_path_factory, variant)
    calls = []
    real = switch_kernel.rebuild_into
    monkeypatch.setattr(switch_kernel, "rebuild_into", lambda *a: calls.append(1) or real(*a))
    router = Router.from_pretrained(path)
    with mmer.load_decoupled(path) as ckpt:
        for modality in ("audio", "vision", "audio", "vision"):
            router.switch(modality)
            for name, tensor in router.llm_state().items():
                want = ckpt.llm_tensor(modality, name)
                assert_bit_identical(tensor, want)
                if name not in router.weights.private[modality]:  # expansion mode's fresh rebuilds, too
                    assert_bit_identical(router.weights.shared_part(modality, name), want)
        merged = bool(ckpt.merged_slots) and not ckpt.is_single_model
    assert bool(calls) == merged  # a single merged model has no τ* or masks: nothing for the kernel to rebuild


@pytest.mark.parametrize("first", ["vision", "audio"])
def test_a_router_refuses_a_checkpoint_whose_weights_overflow_whichever_modality_its_first_switch_builds(
    demo_models, tmp_path_factory, tmp_path, first
):
    """The load proves every rebuild finite from the maxima the first switch's pass gathers: an entry outside
    the first modality's mask still counts, since another modality's mask (or its rescaler) may keep it."""
    import hashlib
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from mmer.checkpoint.manifest import MANIFEST_NAME, MANIFEST_SHA_NAME
    from mmer.errors import NonFiniteError
    from mmer.route.router import Router

    ckpt = tmp_path / "ckpt"
    shutil.copytree(merged_checkpoint(demo_models, tmp_path_factory), ckpt)
    with mmer.load_decoupled(ckpt) as opened:
        name = next(s.name for s in opened.merged_slots if s.name.endswith("up_proj.weight"))
        kept = opened.mask("vision", name).reshape(-1) & ~opened.mask("audio", name).reshape(-1)
        where = int(kept.nonzero()[0])
    tau_file = ckpt / "tau_star" / "model.safetensors"
    tau = load_file(tau_file)
    tau[name].reshape(-1)[where] = torch.finfo(tau[name].dtype).max
    save_file(tau, str(tau_file), metadata={"format": "mmer-tau-star/1"})
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["modalities"]["vision"]["scale"] = 2.0
    raw = (json.dumps(manifest, indent=2) + "\n").encode()
    (ckpt / MANIFEST_NAME).write_bytes(raw)
    (ckpt / MANIFEST_SHA_NAME).write_text(hashlib.sha256(raw).hexdigest() + "\n")
    with pytest.raises(NonFiniteError, match=name):
        Router.from_pretrained(ckpt, activate=first)
