"""Trim: keep the top-K fraction of a task vector by magnitude (TIES step 1).

The rule is the TIES reference code's (``topk_values_mask``), which the paper's setup (ModelCompose) copies:
with ``d`` entries and kept fraction ``K``, take ``k = d − ⌊d·K⌋`` and keep every entry whose magnitude is
``≥`` the k-th smallest magnitude. With distinct magnitudes that keeps ``⌊d·K⌋ + 1`` entries; ``K = 1`` keeps
everything. ``global`` scope applies it once over all LLM tensors of a model; ``per-tensor`` scope per tensor.
``count="exact"`` instead keeps the ``max(1, ⌊d·K⌋)`` largest (mergekit's and PEFT's rule); magnitudes tied at
the threshold are all kept either way, where mergekit's ``argsort`` would pick among them arbitrarily.

The global threshold is found exactly without holding the model: magnitudes are non-negative floats, whose
IEEE-754 bit patterns sort like the values, so a 65,536-bin histogram of the high 16 bits (pass 1) finds the
bin holding the k-th smallest value, and a histogram of the low 16 bits of the entries in that bin (pass 2)
finds the value itself. Memory is two histograms per model, whatever the model's size.

:class:`WindowedThreshold` usually needs one full pass instead of two: a small sample of the task vector
(read first, a few contiguous blocks per tensor) guesses a narrow window of magnitudes around the k-th
value; the full pass counts the entries below the window and keeps the few inside it. If the k-th value
falls inside the window (almost always), it is found exactly among them; if not, the two passes of
:class:`GlobalThreshold` run. Either way the answer is the exact k-th smallest magnitude.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

_BINS = 1 << 16
# Sampled entries per model that place a global threshold's window (``engine.thresholds`` draws them): the window
# is ± 8 standard errors of the sample's quantile wide, so the sample's size sets how many candidates a pass keeps.
SAMPLE_ENTRIES = 1 << 20
TENSOR_SAMPLE_ENTRIES = 1 << 16  # per tensor, for a per-tensor trim found in chunks


def candidate_cap(total_numel: int) -> int:
    """The most candidates a window may collect for one model before the search falls back to its histogram
    passes: several times what a window placed by a sample of :data:`SAMPLE_ENTRIES` holds, so a pass almost never
    hits it, and a bound on the search's memory whatever the data (see :func:`search_bytes`)."""
    return max(1 << 16, total_numel // 64)


def search_bytes(total_numel: int, n_models: int, sample: int = SAMPLE_ENTRIES) -> int:
    """Memory a windowed search over ``total_numel`` entries per model holds at its peak, beyond the slot being
    read: every model's sample (4 bytes an entry) and one model's sort of it (values and int64 indices), then
    every model's candidates (4 bytes each, at most :func:`candidate_cap`) and one model's joined copy of them."""
    sample = min(sample, total_numel)
    return max(n_models * sample * 4 + sample * 12, (n_models + 1) * candidate_cap(total_numel) * 4)


def rank_to_threshold(numel: int, k: float, count: str = "reference") -> int:
    """The 1-based rank (ascending magnitude) of the threshold entry; 0 means keep everything."""
    if numel == 0 or k >= 1.0:
        return 0
    if count == "reference":
        return numel - int(numel * k)
    if count == "exact":
        return numel - max(1, int(numel * k)) + 1
    raise ValueError(f"unknown trim count rule {count!r}")


def trim(tau: torch.Tensor, threshold: torch.Tensor | float | None) -> torch.Tensor:
    """Zero the entries of ``tau`` whose magnitude is below ``threshold`` (``None`` keeps all)."""
    if threshold is None:
        return tau
    return torch.where(tau.abs() >= threshold, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))


def tensor_threshold(tau: torch.Tensor, k: float, count: str = "reference") -> torch.Tensor | None:
    """Per-tensor threshold: the k-th smallest magnitude of this tensor, or ``None`` to keep all."""
    rank = rank_to_threshold(tau.numel(), k, count)
    if rank == 0:
        return None
    return tau.detach().reshape(-1).abs().float().kthvalue(rank).values


def trims_each_tensor_first(variant, allow_nonfinite: bool = False) -> bool:
    """Whether a per-tensor trim can be found before its slot is merged (the engine then merges the slot in chunks,
    each trimmed at its tensor's thresholds as a global trim would be): everything else about the variant is
    elementwise. DARE (masks drawn per whole tensor) and EMR (a rescaler averaged over it) are not, and a merge
    that lets NaN through ranks whole tensors as ``kthvalue`` does."""
    if allow_nonfinite or not (variant.uses_trim and variant.trim_scope == "per-tensor"):
        return False
    return dataclasses.replace(variant, trim_scope="global").elementwise


def count_true(mask: torch.Tensor) -> int:
    """The number of true entries of a bool tensor.

    On the CPU numpy counts bytes directly, about 100x faster than torch's ``sum``, which widens every entry
    to int64 first; elsewhere ``torch.count_nonzero``.
    """
    if mask.device.type == "cpu" and mask.is_contiguous():
        return int(np.count_nonzero(mask.numpy()))
    return int(torch.count_nonzero(mask))


def _magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """float32 magnitudes as int32 bit patterns: monotone in the value for non-negative floats."""
    return tau.detach().reshape(-1).float().abs().view(torch.int32)


class GlobalThreshold:
    """Exact k-th smallest magnitude over many tensors, streamed in two passes (often one).

    Usage: call :meth:`add_pass1` with every tensor; if :attr:`needs_pass2`, call :meth:`add_pass2` with every
    tensor again (same values, any order); then read :attr:`value`. If :attr:`keeps_all` is true after
    construction, no pass is needed.

    Pass 1 also counts, per bin, the entries whose low 16 bits are zero: they are the bin's smallest magnitude, so
    when the k-th value's rank within its bin falls among them it is that magnitude and pass 2 is skipped. That
    is the usual case for task vectors of bf16 models (a difference of two bf16 values is almost always a bf16
    value itself, and tied blocks of them hold the threshold), and always when the threshold is 0.
    """

    def __init__(
        self, total_numel: int, k: float, device: torch.device | str = "cpu", count: str = "reference"
    ) -> None:
        self.rank = rank_to_threshold(total_numel, k, count)
        self.total = total_numel
        self.device = torch.device(device)
        self._hist_high = torch.zeros(_BINS, dtype=torch.int64, device=self.device)
        self._hist_round = torch.zeros(_BINS, dtype=torch.int64, device=self.device)
        self._hist_low = torch.zeros(_BINS, dtype=torch.int64, device=self.device)
        self._seen1 = 0
        self._seen2 = 0
        self._bin: int | None = None
        self._rank_in_bin: int | None = None

    @property
    def keeps_all(self) -> bool:
        return self.rank == 0

    def add_pass1(self, tau: torch.Tensor) -> None:
        bits = _magnitude_bits(tau)
        high = bits >> 16
        self._hist_high += torch.bincount(high, minlength=_BINS)
        self._hist_round += torch.bincount(high[(bits & 0xFFFF) == 0], minlength=_BINS)
        self._seen1 += bits.numel()

    def _locate_bin(self) -> None:
        if self._seen1 != self.total:
            raise RuntimeError(f"pass 1 saw {self._seen1} entries, expected {self.total}")
        cumulative = torch.cumsum(self._hist_high, 0)
        b = int(torch.searchsorted(cumulative, torch.tensor(self.rank, device=self.device)).item())
        below = int(cumulative[b - 1].item()) if b > 0 else 0
        self._bin, self._rank_in_bin = b, self.rank - below

    @property
    def needs_pass2(self) -> bool:
        """Whether pass 1 left the k-th value unknown within its bin (valid after pass 1)."""
        if self.keeps_all:
            return False
        if self._bin is None:
            self._locate_bin()
        return self._rank_in_bin > int(self._hist_round[self._bin])

    def add_pass2(self, tau: torch.Tensor) -> None:
        if self._bin is None:
            self._locate_bin()
        bits = _magnitude_bits(tau)
        low = bits[(bits >> 16) == self._bin] & 0xFFFF
        if low.numel():
            self._hist_low += torch.bincount(low, minlength=_BINS)
        self._seen2 += bits.numel()

    @property
    def value(self) -> float | None:
        """The threshold (keep ``|τ| ≥ value``), or ``None`` when everything is kept."""
        if self.keeps_all:
            return None
        if self._seen1 == self.total and not self.needs_pass2:
            return _as_float(self._bin << 16)
        if self._bin is None or self._seen2 != self.total:
            raise RuntimeError(f"pass 2 saw {self._seen2} entries, expected {self.total}")
        cumulative = torch.cumsum(self._hist_low, 0)
        low = int(torch.searchsorted(cumulative, torch.tensor(self._rank_in_bin, device=self.device)).item())
        return _as_float((self._bin << 16) | low)


def _as_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


NO_VALUE_BELOW = -1  # bit pattern of "no magnitude below the window"
NO_VALUE_ABOVE = 0x7FFFFFFF  # above every finite magnitude (and every NaN the eager path lets through)


@dataclass
class WindowPiece:
    """What one piece of a task vector contributes to a :class:`WindowedThreshold`, as bit patterns ``m``.

    The window ``[lo, hi]`` splits the magnitudes into: ``below`` (m < lo, of which ``zeros`` are 0), ``at_lo``
    (m = lo), ``strict`` (lo < m < hi, whose patterns are ``candidates``), ``at_hi`` (m = hi; the same entries
    as ``at_lo`` when lo = hi) and the rest above. ``under`` is the largest pattern below the window and
    ``under_count`` how many entries hold it; ``over`` and ``over_count`` the smallest above it.
    """

    numel: int
    below: int
    zeros: int
    at_lo: int
    at_hi: int
    strict: int
    candidates: torch.Tensor | None
    under: int = NO_VALUE_BELOW
    under_count: int = 0
    over: int = NO_VALUE_ABOVE
    over_count: int = 0


def window_piece(bits: torch.Tensor, lo: int, hi: int) -> WindowPiece:
    """One piece's :class:`WindowPiece` from its magnitudes' bit patterns (torch; ``merge.one_pass`` fuses it)."""
    below_mask = bits < lo
    below = count_true(below_mask)
    zeros = count_true(bits == 0) if lo > 0 else 0  # lo = 0: the zeros are the entries at lo
    at_lo = count_true(bits == lo)
    at_hi = at_lo if hi == lo else count_true(bits == hi)
    candidates = None
    strict = 0
    if hi > lo:
        candidates = bits[(bits > lo) & (bits < hi)]
        strict = candidates.numel()
        candidates = candidates if strict else None
    under, under_count = NO_VALUE_BELOW, 0
    if below:
        under = int(bits[below_mask].max())
        under_count = count_true(bits == under)
    over, over_count = NO_VALUE_ABOVE, 0
    above = bits[bits > hi]
    if above.numel():
        over = int(above.min())
        over_count = count_true(above == over)
    return WindowPiece(
        bits.numel(), below, zeros, at_lo, at_hi, strict, candidates, under, under_count, over, over_count
    )


class WindowedThreshold:
    """Exact k-th smallest magnitude in one full pass when a sample's guess is near enough (else two).

    Usage: :meth:`add_sample` with blocks of the task vectors (any subset), :meth:`open_window`, then
    :meth:`add` with every full tensor (or :meth:`add_piece` with counts made elsewhere), then read
    :attr:`value`. If :attr:`needs_second_pass` is true, the window missed: the caller runs the two passes of
    :class:`GlobalThreshold` instead (exactness first).

    The window is a range of magnitudes around the sample's quantile, ± max(``margin``, 8 standard errors of
    a sample quantile); the full pass counts entries below it and keeps the bit patterns of those strictly
    inside (about 2·margin of the model: 4 bytes each), so the k-th is found by ``kthvalue`` on the few
    candidates. Entries equal to either edge are only counted: bf16 fine-tunes move weights by whole bf16 steps,
    so magnitudes fall into large blocks of ties, and the k-th value usually sits in one. The pass also counts
    the zeros, the largest magnitude below the window and the smallest above it with their ties, so a threshold
    of 0 (a fine-tune that left most entries unchanged) or one tie block beyond the sample's guess is still
    found in this one pass.
    """

    def __init__(
        self,
        total_numel: int,
        k: float,
        device: torch.device | str = "cpu",
        count: str = "reference",
        margin: float = 0.002,
        max_candidates: int | None = None,
    ) -> None:
        self.rank = rank_to_threshold(total_numel, k, count)
        self.total = total_numel
        self.device = torch.device(device)
        self.margin = margin
        self.max_candidates = candidate_cap(total_numel) if max_candidates is None else max_candidates
        self._samples: list[torch.Tensor] = []
        self._lo = 0  # without a sample, the window is the magnitude 0 alone
        self._hi = 0
        self._seen = 0
        self._below = 0
        self._zeros = 0
        self._at_lo = 0
        self._at_hi = 0
        self._strict = 0
        self._under, self._under_count = NO_VALUE_BELOW, 0
        self._over, self._over_count = NO_VALUE_ABOVE, 0
        self._candidates: list[torch.Tensor] = []
        self._overflow = False

    @property
    def keeps_all(self) -> bool:
        return self.rank == 0

    def add_sample(self, tau: torch.Tensor) -> None:
        self._samples.append(_magnitude_bits(tau))

    def open_window(self) -> None:
        """Choose the magnitudes [lo, hi] (as bit patterns) around the sample quantile rank/total."""
        if self._samples:
            ordered = torch.cat(self._samples).sort().values
            n = ordered.numel()
            q = self.rank / self.total
            margin = max(self.margin, 8.0 * math.sqrt(max(q * (1 - q), 1e-9) / n))
            self._lo = int(ordered[max(0, int((q - margin) * n) - 1)])
            self._hi = int(ordered[min(n - 1, int((q + margin) * n) + 1)])
        self._samples.clear()

    def add(self, tau: torch.Tensor) -> None:
        self.add_piece(window_piece(_magnitude_bits(tau), self._lo, self._hi))

    def add_piece(self, piece: WindowPiece) -> None:
        """Take one piece's counts (from :meth:`add`, or ``merge.one_pass.window_chunk``)."""
        self._seen += piece.numel
        self._below += piece.below
        self._zeros += piece.zeros
        self._at_lo += piece.at_lo
        self._at_hi += piece.at_hi
        if piece.under_count:
            if piece.under > self._under:
                self._under, self._under_count = piece.under, 0
            if piece.under == self._under:
                self._under_count += piece.under_count
        if piece.over_count:
            if piece.over < self._over:
                self._over, self._over_count = piece.over, 0
            if piece.over == self._over:
                self._over_count += piece.over_count
        if self._overflow or not piece.strict:
            return
        self._strict += piece.strict
        if self._strict > self.max_candidates:  # the window is far too wide: stop collecting
            self._overflow = True
            self._candidates.clear()
        else:
            self._candidates.append(piece.candidates)

    @property
    def window(self) -> tuple[int, int]:
        """The window's bounds as float32 bit patterns (valid after :meth:`open_window`)."""
        return self._lo, self._hi

    def _blocks(self) -> list[tuple[int, int | None]]:
        """The counted runs of magnitudes in ascending order, each as (entries, pattern or None for the
        candidates); the k-th value is in one of them or the window missed."""
        runs: list[tuple[int, int | None]] = []
        if self._below:  # unknown magnitudes below the window are a run of pattern -2: landing there misses
            if self._zeros and self._lo > 0:
                runs.append((self._zeros, 0))
            gap = self._below - self._zeros - (self._under_count if self._under > 0 else 0)
            if gap:
                runs.append((gap, -2))
            if self._under > 0:
                runs.append((self._under_count, self._under))
        runs.append((self._at_lo, self._lo))
        if self._hi > self._lo:
            runs.append((self._strict, None))
            runs.append((self._at_hi, self._hi))
        if self._over_count:
            runs.append((self._over_count, self._over))
        return runs

    def _locate(self) -> tuple[int | None, int] | None:
        """(pattern, or None for a candidate; rank within its run) of the k-th value, or None when missed."""
        if self._seen != self.total:
            raise RuntimeError(f"the pass saw {self._seen} entries, expected {self.total}")
        seen = 0
        for size, pattern in self._blocks():
            if self.rank <= seen + size:
                if pattern == -2 or (pattern is None and self._overflow):
                    return None
                return pattern, self.rank - seen
            seen += size
        return None

    @property
    def needs_second_pass(self) -> bool:
        if self.keeps_all:
            return False
        return self._locate() is None

    @property
    def value(self) -> float | None:
        if self.keeps_all:
            return None
        found = self._locate()
        if found is None:
            raise RuntimeError("the window missed the k-th value; use the two-pass GlobalThreshold")
        pattern, rank_in_run = found
        if pattern is not None:
            return _as_float(pattern)
        candidates = torch.cat(self._candidates).cpu()
        self._candidates = [candidates]
        if candidates.numel() > 1:  # in place: the search's memory stays the candidates themselves
            candidates.numpy().partition(rank_in_run - 1)
        return _as_float(int(candidates[rank_in_run - 1]))
