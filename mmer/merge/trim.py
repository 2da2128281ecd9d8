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

import math

import numpy as np
import torch

_BINS = 1 << 16


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
    """Exact k-th smallest magnitude over many tensors, streamed in two passes.

    Usage: call :meth:`add_pass1` with every tensor, then :meth:`add_pass2` with every tensor again (same
    values, any order), then read :attr:`value`. If :attr:`keeps_all` is true after construction, no pass is
    needed.
    """

    def __init__(
        self, total_numel: int, k: float, device: torch.device | str = "cpu", count: str = "reference"
    ) -> None:
        self.rank = rank_to_threshold(total_numel, k, count)
        self.total = total_numel
        self.device = torch.device(device)
        self._hist_high = torch.zeros(_BINS, dtype=torch.int64, device=self.device)
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
        self._hist_high += torch.bincount(bits >> 16, minlength=_BINS)
        self._seen1 += bits.numel()

    def _locate_bin(self) -> None:
        if self._seen1 != self.total:
            raise RuntimeError(f"pass 1 saw {self._seen1} entries, expected {self.total}")
        cumulative = torch.cumsum(self._hist_high, 0)
        b = int(torch.searchsorted(cumulative, torch.tensor(self.rank, device=self.device)).item())
        below = int(cumulative[b - 1].item()) if b > 0 else 0
        self._bin, self._rank_in_bin = b, self.rank - below

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
        if self._bin is None or self._seen2 != self.total:
            raise RuntimeError(f"pass 2 saw {self._seen2} entries, expected {self.total}")
        cumulative = torch.cumsum(self._hist_low, 0)
        low = int(torch.searchsorted(cumulative, torch.tensor(self._rank_in_bin, device=self.device)).item())
        bits = torch.tensor([(self._bin << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32).item())


class WindowedThreshold:
    """Exact k-th smallest magnitude in one full pass when a sample's guess is right (else two).

    Usage: :meth:`add_sample` with blocks of the task vectors (any subset), :meth:`open_window`, then
    :meth:`add` with every full tensor, then read :attr:`value`. If :attr:`needs_second_pass` is true, the
    window missed: the caller runs the two passes of :class:`GlobalThreshold` instead (exactness first).

    The window is a range of magnitudes around the sample's quantile, ± max(``margin``, 8 standard errors of
    a sample quantile); the full pass counts entries below it and keeps the bit patterns of those inside
    (about 2·margin of the model: 4 bytes each), so the k-th is found by ``kthvalue`` on the few candidates.
    """

    def __init__(
        self,
        total_numel: int,
        k: float,
        device: torch.device | str = "cpu",
        count: str = "reference",
        margin: float = 0.002,
        max_candidates: int = 1 << 27,
    ) -> None:
        self.rank = rank_to_threshold(total_numel, k, count)
        self.total = total_numel
        self.device = torch.device(device)
        self.margin = margin
        self.max_candidates = max_candidates
        self._samples: list[torch.Tensor] = []
        self._lo = 0
        self._hi = -1
        self._below = 0
        self._seen = 0
        self._candidates: list[torch.Tensor] = []
        self._kept = 0
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
        bits = _magnitude_bits(tau)
        below = count_true(bits < self._lo)
        if self._overflow:
            self.add_counted(bits.numel(), below, 0, None)
        elif self._lo == self._hi:
            # The sample put the k-th value inside one block of tied magnitudes (bf16 fine-tunes give
            # quantised deltas: here 3 % of a model tied at the threshold). Counting that value is enough;
            # collecting its copies as candidates would cost memory and a huge kthvalue.
            self.add_counted(bits.numel(), below, count_true(bits == self._lo), None)
        else:
            inside = bits[(bits >= self._lo) & (bits <= self._hi)]
            self.add_counted(bits.numel(), below, inside.numel(), inside)

    def add_counted(self, numel: int, below: int, inside: int, candidates: torch.Tensor | None) -> None:
        """Take one piece's counts (from :meth:`add`, or ``merge.one_pass.window_chunk``): ``candidates`` are the
        inside magnitudes' bit patterns, needed only when the window spans more than one value."""
        self._seen += numel
        self._below += below
        if self._overflow:
            return
        self._kept += inside
        if self._lo == self._hi:
            return
        if self._kept > self.max_candidates:  # the window is far too wide: stop collecting, fall back
            self._overflow = True
            self._candidates.clear()
        elif inside:
            self._candidates.append(candidates)

    @property
    def window(self) -> tuple[int, int]:
        """The window's bounds as float32 bit patterns (valid after :meth:`open_window`)."""
        return self._lo, self._hi

    @property
    def needs_second_pass(self) -> bool:
        if self.keeps_all:
            return False
        if self._seen != self.total:
            raise RuntimeError(f"the pass saw {self._seen} entries, expected {self.total}")
        return self._overflow or not (self._below < self.rank <= self._below + self._kept)

    @property
    def value(self) -> float | None:
        if self.keeps_all:
            return None
        if self.needs_second_pass:
            raise RuntimeError("the window missed the k-th value; use the two-pass GlobalThreshold")
        if self._lo == self._hi:
            return float(torch.tensor([self._lo], dtype=torch.int32).view(torch.float32).item())
        candidates = torch.cat(self._candidates)
        bits = candidates.kthvalue(self.rank - self._below).values.reshape(1).cpu()
        return float(bits.view(torch.float32).item())
