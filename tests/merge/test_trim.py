"""Specifies mmer/merge/trim.py: the TIES reference trim rule, per tensor and exact over a whole model.

The rule (TIES ``topk_values_mask``): with ``d`` entries and kept fraction ``K``, ``k = d − ⌊d·K⌋``; keep every
entry whose magnitude is ``≥`` the k-th smallest magnitude; ``K = 1`` keeps everything.
"""

from __future__ import annotations

import random

import pytest
import torch

from mmer.merge.task_vectors import task_vector
from mmer.merge.trim import GlobalThreshold, count_true, rank_to_threshold, tensor_threshold, trim

# ------------------------------------------------------------------------------------------ rank_to_threshold


@pytest.mark.parametrize(
    ("numel", "k", "rank"),
    [
        (0, 0.5, 0),  # nothing to trim: keep everything
        (0, 1.0, 0),
        (10, 1.0, 0),  # K = 1 keeps everything
        (1, 1.0, 0),
        (10, 0.8, 2),  # 10 − ⌊8.0⌋
        (10, 0.5, 5),  # 10 − ⌊5.0⌋
        (7, 0.5, 4),  # 7 − ⌊3.5⌋
        (10, 0.99, 1),  # 10 − ⌊9.9⌋: the smallest magnitude, so everything is kept
        (10, 0.01, 10),  # 10 − ⌊0.1⌋: the largest magnitude, so only the maximum survives
        (4, 0.01, 4),
        (1, 0.5, 1),  # 1 − ⌊0.5⌋
        (1000, 0.001, 999),  # 1000 − ⌊1.0⌋
        (3, 1e-9, 3),
    ],
)
def test_rank_to_threshold_is_d_minus_floor_of_d_times_k(numel: int, k: float, rank: int) -> None:
    assert rank_to_threshold(numel, k) == rank


# ------------------------------------------------------------------------------------------ golden trims


@pytest.mark.parametrize(
    ("tau", "k", "expected"),
    [
        # d=5, K=0.6: k = 5 − ⌊3.0⌋ = 2; 2nd smallest |τ| is 0.5; keep |τ| ≥ 0.5 (⌊d·K⌋ + 1 = 4 entries)
        ([0.5, -3.0, 1.0, -0.25, 2.0], 0.6, [0.5, -3.0, 1.0, 0.0, 2.0]),
        # d=5, K=0.4: k = 5 − ⌊2.0⌋ = 3; 3rd smallest |τ| is 1.0; keep |τ| ≥ 1.0
        ([0.5, -3.0, 1.0, -0.25, 2.0], 0.4, [0.0, -3.0, 1.0, 0.0, 2.0]),
        # d=4, K=0.01: k = 4 − ⌊0.04⌋ = 4; the threshold is the largest |τ| = 4; both ±4 are kept
        ([0.1, -4.0, 3.0, 4.0], 0.01, [0.0, -4.0, 0.0, 4.0]),
        # d=6, K=0.5: k = 6 − 3 = 3; sorted |τ| = [0.5, 1, 1, 1, 1, 2], 3rd is 1.0: all four ties at 1 are kept
        ([1.0, -1.0, 1.0, 0.5, 2.0, -1.0], 0.5, [1.0, -1.0, 1.0, 0.0, 2.0, -1.0]),
        # d=5, K=0.8: k = 5 − 4 = 1; the threshold is the smallest |τ| (0): everything is kept
        ([0.0, -1.0, 2.0, 0.0, 3.0], 0.8, [0.0, -1.0, 2.0, 0.0, 3.0]),
        # d=6, K=0.5 with zeros: k = 3; sorted |τ| = [0, 0, 0.5, 0.5, 1, 3], 3rd is 0.5: ties at 0.5 kept
        ([0.0, 0.5, -3.0, 0.0, -0.5, 1.0], 0.5, [0.0, 0.5, -3.0, 0.0, -0.5, 1.0]),
        # d=8, K=0.25: k = 8 − 2 = 6; sorted |τ| = [.1, .2, .3, .4, .5, .6, .7, .8], 6th is 0.6
        ([0.1, -0.8, 0.3, -0.6, 0.5, 0.2, -0.7, 0.4], 0.25, [0.0, -0.8, 0.0, -0.6, 0.0, 0.0, -0.7, 0.0]),
    ],
)
def test_trim_with_the_per_tensor_threshold_keeps_magnitudes_at_or_above_the_kth_smallest(
    tau: list[float], k: float, expected: list[float]
) -> None:
    t = torch.tensor(tau)
    out = trim(t, tensor_threshold(t, k))
    assert torch.equal(out, torch.tensor(expected))


def test_trim_keeps_every_entry_tied_with_the_threshold() -> None:
    # d=10, K=0.2: k = 10 − 2 = 8; sorted |τ| = [0.5×3, 2×7]; the 8th is 2, so all seven entries at ±2 are kept
    # although ⌊d·K⌋ + 1 = 3 entries would be kept with distinct magnitudes.
    tau = torch.tensor([2.0, -2.0, 0.5, 2.0, -0.5, 2.0, -2.0, 2.0, 0.5, -2.0])
    threshold = tensor_threshold(tau, 0.2)
    assert float(threshold) == 2.0
    out = trim(tau, threshold)
    assert torch.equal(out, torch.tensor([2.0, -2.0, 0.0, 2.0, 0.0, 2.0, -2.0, 2.0, 0.0, -2.0]))


def test_trim_with_no_threshold_returns_the_task_vector_unchanged() -> None:
    tau = torch.tensor([0.0, -1e-30, 3.0, -0.0])
    assert trim(tau, None) is tau


def test_trim_keeps_the_dtype_and_shape_of_the_task_vector() -> None:
    tau = torch.tensor([[0.25, -2.0], [1.0, -0.5]], dtype=torch.bfloat16)
    out = trim(tau, 1.0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.tensor([[0.0, -2.0], [1.0, 0.0]], dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------ tensor_threshold


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_tensor_threshold_of_an_empty_tensor_keeps_everything(shape: tuple[int, ...]) -> None:
    assert tensor_threshold(torch.empty(shape), 0.5) is None


def test_tensor_threshold_with_k_equal_to_one_keeps_everything() -> None:
    assert tensor_threshold(torch.randn(100), 1.0) is None


def test_tensor_threshold_with_a_tiny_k_is_the_largest_magnitude() -> None:
    tau = torch.tensor([[0.5, -7.0], [3.0, 6.5]])
    assert float(tensor_threshold(tau, 1e-6)) == 7.0  # k = 4 − ⌊4e-6⌋ = 4: the 4th smallest of 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [0.01, 0.2, 0.5, 0.8, 0.99])
def test_tensor_threshold_is_the_kth_smallest_magnitude_of_the_flattened_tensor(dtype: torch.dtype, k: float) -> None:
    g = torch.Generator().manual_seed(7)
    tau = (torch.randn(37, 29, generator=g) * 3).to(dtype)
    sorted_magnitudes = tau.float().abs().reshape(-1).sort().values
    rank = tau.numel() - int(tau.numel() * k)
    assert float(tensor_threshold(tau, k)) == float(sorted_magnitudes[rank - 1])


# ------------------------------------------------------------------------------------------ GlobalThreshold


def _run_global(tensors: list[torch.Tensor], k: float, order2: list[torch.Tensor] | None = None) -> float | None:
    total = sum(t.numel() for t in tensors)
    gt = GlobalThreshold(total, k)
    if gt.keeps_all:
        return gt.value
    for t in tensors:
        gt.add_pass1(t)
    for t in order2 if order2 is not None else tensors:
        gt.add_pass2(t)
    return gt.value


def _reference_threshold(tensors: list[torch.Tensor], k: float) -> float | None:
    flat = torch.cat([t.float().reshape(-1) for t in tensors]).abs()
    rank = rank_to_threshold(flat.numel(), k)
    if rank == 0:
        return None
    by_kthvalue = float(flat.kthvalue(rank).values)
    by_sort = float(flat.sort().values[rank - 1])
    assert by_kthvalue == by_sort
    return by_kthvalue


def _random_task_vectors(seed: int) -> list[torch.Tensor]:
    """float32 deltas of fp32/bf16/fp16 models: many orders of magnitude, exact duplicates, zeros."""
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    sizes = [1, 3, 8, 17, 256, 1000, 4099, 20000, 70001]
    taus = []
    for i, n in enumerate(sizes):
        dtype = dtypes[(i + seed) % 3]
        # weights from 2^-14 to 2^6 in scale, deltas from 2^-6 to 2^2 of the weight: the deltas span ~30 binades;
        # the smallest round away in bf16/fp16 and become zeros
        scale = torch.pow(2.0, torch.randint(-14, 7, (n,), generator=g).float())
        base = (torch.randn(n, generator=g) * scale).to(dtype)
        relative = torch.pow(2.0, torch.randint(-6, 3, (n,), generator=g).float())
        delta = torch.randn(n, generator=g) * scale * relative
        finetuned = (base.float() + delta).to(dtype)
        tau = task_vector(finetuned, base)
        if n >= 8:
            # exact duplicates of existing values (both signs) and explicit zeros
            idx = torch.randint(0, n, (n // 4,), generator=g)
            src = torch.randint(0, n, (n // 4,), generator=g)
            sign = torch.where(torch.rand(n // 4, generator=g) < 0.5, -1.0, 1.0)
            tau[idx] = tau[src] * sign
            tau[torch.randint(0, n, (n // 8,), generator=g)] = 0.0
        taus.append(tau)
    # a float32 tensor spanning ~80 orders of magnitude, subnormals included
    wide = torch.tensor([1e-42, -1e-40, 1e-38, 3e-30, -1e-20, 1e-10, 0.5, -1.0, 1e10, -3e20, 1e30, 1e-42, 0.0] * 5)
    taus.append(wide)
    return taus


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [0.01, 0.2, 0.5, 0.8, 0.99])
def test_global_threshold_equals_the_kth_smallest_magnitude_of_the_concatenation(seed: int, k: float) -> None:
    taus = _random_task_vectors(seed)
    expected = _reference_threshold(taus, k)
    assert expected is not None
    assert _run_global(taus, k) == expected


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [0.01, 0.5, 0.8])
def test_global_trim_keeps_exactly_the_entries_the_reference_keeps_on_the_concatenation(seed: int, k: float) -> None:
    taus = _random_task_vectors(seed)
    threshold = _run_global(taus, k)
    kept = torch.cat([trim(t, threshold).reshape(-1) for t in taus])
    flat = torch.cat([t.reshape(-1) for t in taus])
    rank = flat.numel() - int(flat.numel() * k)
    kth = flat.abs().kthvalue(rank).values
    assert torch.equal(kept, torch.where(flat.abs() >= kth, flat, torch.zeros(())))


@pytest.mark.parametrize("k", [0.01, 0.2, 0.5, 0.8, 0.99])
def test_global_threshold_finds_values_that_differ_only_in_their_low_16_bits(k: float) -> None:
    # all magnitudes in [1, 1 + 2^-7): the same high 16 bits, so pass 2 alone decides the value
    g = torch.Generator().manual_seed(11)
    low = torch.randint(0, 1 << 16, (5000,), generator=g, dtype=torch.int32)
    values = (torch.tensor(1.0).view(torch.int32) | low).view(torch.float32)
    taus = [values[:1234], -values[1234:3000], values[3000:]]
    assert _run_global(taus, k) == _reference_threshold(taus, k)


@pytest.mark.parametrize("k", [0.01, 0.5, 0.99])
def test_global_threshold_of_all_zero_task_vectors_is_zero(k: float) -> None:
    assert _run_global([torch.zeros(10), torch.zeros(3, 4)], k) == 0.0


@pytest.mark.parametrize("k", [0.01, 0.5, 0.99])
def test_global_threshold_of_one_repeated_magnitude_is_that_magnitude(k: float) -> None:
    assert _run_global([torch.full((10,), -0.3), torch.full((7,), 0.3)], k) == float(torch.tensor(0.3))


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("k", [0.2, 0.8])
def test_global_threshold_does_not_depend_on_the_order_or_split_of_the_tensors(seed: int, k: float) -> None:
    taus = _random_task_vectors(seed)
    reference = _run_global(taus, k)
    flat = torch.cat([t.reshape(-1) for t in taus])
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, flat.numel()), 12))
    pieces = list(torch.tensor_split(flat, cuts))
    pieces = [p.reshape(-1, 1) if i % 2 else p for i, p in enumerate(pieces)]  # shape must not matter either
    order1, order2 = pieces[:], pieces[:]
    rng.shuffle(order1)
    rng.shuffle(order2)
    assert _run_global(order1, k, order2) == reference
    assert _run_global(list(reversed(taus)), k, taus) == reference


def test_global_threshold_with_empty_tensors_among_the_inputs_is_unchanged() -> None:
    taus = _random_task_vectors(3)
    with_empty = [torch.empty(0), *taus[:3], torch.empty(2, 0), *taus[3:]]
    assert _run_global(with_empty, 0.5) == _run_global(taus, 0.5)


@pytest.mark.parametrize(("total", "k"), [(100, 1.0), (0, 0.5)])
def test_global_threshold_keeps_all_without_any_pass_when_k_is_one_or_nothing_is_there(total: int, k: float) -> None:
    gt = GlobalThreshold(total, k)
    assert gt.keeps_all
    assert gt.value is None


def test_global_threshold_refuses_to_give_a_value_before_pass_two_has_seen_everything() -> None:
    t = torch.arange(10.0) / 3  # magnitudes with low bits set: the bin found in pass 1 holds several values
    gt = GlobalThreshold(20, 0.5)
    gt.add_pass1(t)
    gt.add_pass1(t)
    gt.add_pass2(t)
    with pytest.raises(RuntimeError, match="pass 2 saw 10 entries, expected 20"):
        _ = gt.value


def test_global_threshold_refuses_pass_two_when_pass_one_missed_entries() -> None:
    gt = GlobalThreshold(20, 0.5)
    gt.add_pass1(torch.arange(10.0))
    with pytest.raises(RuntimeError, match="pass 1 saw 10 entries, expected 20"):
        gt.add_pass2(torch.arange(10.0))


# --------------------------------------------------------------------------------- one-pass windowed search
from mmer.merge.trim import WindowedThreshold  # noqa: E402


def _kth(tensors: list[torch.Tensor], k: float, count: str = "reference") -> float | None:
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs().float()
    rank = rank_to_threshold(flat.numel(), k, count)
    return None if rank == 0 else float(flat.kthvalue(rank).values)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [0.01, 0.2, 0.8, 0.99])
@pytest.mark.parametrize("count", ["reference", "exact"])
def test_the_windowed_search_is_exact_when_its_sample_places_the_window(seed, k, count):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=g) * 10.0 ** float(e) for n, e in ((5000, -3), (20000, -2), (777, 0))]
    finder = WindowedThreshold(sum(t.numel() for t in tensors), k, count=count)
    for t in tensors:
        finder.add_sample(t[::7])
    finder.open_window()
    for t in tensors:
        finder.add(t)
    assert not finder.needs_second_pass
    assert finder.value == _kth(tensors, k, count)


@pytest.mark.parametrize("k", [0.2, 0.5, 0.8])
def test_quantised_deltas_tied_at_the_threshold_are_counted_not_collected(k):
    """bf16 fine-tunes give deltas on a coarse grid: a block of ties holds the k-th value, so the window is one
    magnitude and the pass only counts it (no candidates), still exactly."""
    g = torch.Generator().manual_seed(3)
    grid = torch.randint(-3, 4, (30000,), generator=g).float() * 2.0**-11  # 4 magnitudes, wide tie blocks
    tensors = [grid[:10000], grid[10000:]]
    finder = WindowedThreshold(grid.numel(), k)
    for t in tensors:
        finder.add_sample(t[::5])
    finder.open_window()
    for t in tensors:
        finder.add(t)
    assert finder._lo == finder._hi and not finder._candidates
    assert not finder.needs_second_pass
    assert finder.value == _kth(tensors, k)


def test_a_window_that_misses_is_reported_so_the_two_pass_search_can_run():
    tensors = [torch.linspace(0.001, 1.0, 10000)]
    finder = WindowedThreshold(10000, 0.5)
    finder.add_sample(torch.full((100,), 1e-20))  # a sample nothing like the data
    finder.open_window()
    finder.add(tensors[0])
    assert finder.needs_second_pass
    with pytest.raises(RuntimeError, match="two-pass"):
        _ = finder.value


@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (1000, 33)])
def test_count_true_counts_like_sum_for_contiguous_and_strided_masks(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) > 0.7
    assert count_true(mask) == int(mask.sum())
    if mask.dim() == 2:
        assert count_true(mask.t()) == int(mask.sum())  # not contiguous: the torch path


# ------------------------------------------------------------------------------------ degenerate thresholds
def _finder_with_window(tensors: list[torch.Tensor], k: float, lo: float, hi: float) -> WindowedThreshold:
    finder = WindowedThreshold(sum(t.numel() for t in tensors), k)
    finder.open_window()
    finder._lo, finder._hi = (int(torch.tensor([v]).view(torch.int32)) for v in (lo, hi))
    for t in tensors:
        finder.add(t)
    return finder


def test_a_threshold_of_zero_is_found_from_the_counted_zeros_when_the_window_sits_above_zero():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(10000, generator=g) * (torch.rand(10000, generator=g) < 0.6)  # 40 % exactly unchanged
    finder = _finder_with_window([tau[:3000], tau[3000:]], 0.8, 0.5, 0.6)  # a sample that overshot
    assert not finder.needs_second_pass
    assert finder.value == 0.0 == _kth([tau], 0.8)


@pytest.mark.parametrize("k", [0.1, 0.3, 0.6, 0.9])
def test_a_threshold_one_tie_block_beyond_the_window_is_found_in_the_same_pass(k):
    g = torch.Generator().manual_seed(2)
    tau = torch.randint(-4, 5, (20000,), generator=g).float() * 2.0**-10  # five magnitudes: wide tie blocks
    expected = _kth([tau], k)
    # the window is the single tied value next to the right one (a sample that misjudged the block's extent)
    for neighbour in (expected - 2.0**-10, expected + 2.0**-10):
        if 0 <= neighbour <= 4 * 2.0**-10:
            finder = _finder_with_window([tau], k, neighbour, neighbour)
            assert not finder.needs_second_pass, neighbour
            assert finder.value == expected


def test_a_window_two_tie_blocks_off_still_falls_back_rather_than_guess():
    tau = torch.tensor([1.0] * 100 + [2.0] * 100 + [3.0] * 100 + [4.0] * 100)
    finder = _finder_with_window([tau], 0.9, 4.0, 4.0)  # the k-th is 1.0; the window knows 3.0 and 4.0 only
    assert finder.needs_second_pass


def test_the_histogram_search_skips_pass_two_when_the_kth_value_is_its_bins_round_value():
    g = torch.Generator().manual_seed(3)
    tau = (torch.randn(5000, generator=g) * 0.01).to(torch.bfloat16).float()  # bf16 values: low 16 bits zero
    search = GlobalThreshold(tau.numel(), 0.3)
    search.add_pass1(tau)
    assert not search.needs_pass2
    assert search.value == _kth([tau], 0.3)


def test_the_histogram_search_needs_pass_two_when_the_bin_holds_finer_values_below_the_kth():
    tau = torch.tensor([1.0, 1.0 + 2.0**-20, 1.0 + 2.0**-19, 1.0 + 2.0**-18] * 10)
    search = GlobalThreshold(tau.numel(), 0.5)  # rank 20: the bin of 1.0 holds four values, ten of them round
    search.add_pass1(tau)
    assert search.needs_pass2
    search.add_pass2(tau)
    assert search.value == _kth([tau], 0.5)
