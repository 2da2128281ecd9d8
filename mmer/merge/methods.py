"""Merge methods by name: a list of (trimmed) task vectors for one tensor → the merged task vector τ*.

A method is a plain function registered with :func:`register_method`; the pipeline does the streaming and
the trimming (whose global threshold needs a pass over the whole model) and calls the method once per tensor.
Read beside mmer-method.md §2: symbols are the paper's (τ, γ, α).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: the registry name used in recipes, on the command line and in manifests.
        fn: ``fn(taus, alpha=..., zero_sign=...) -> tau_star`` over float32 tensors of one slot.
        uses_trim: whether the pipeline trims the task vectors to the top-K fraction first.
        summary: one line for ``--help`` and the model card.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    uses_trim: bool
    summary: str


METHODS: dict[str, MergeMethod] = {}


def register_method(name: str, *, uses_trim: bool, summary: str) -> Callable[[Callable[..., torch.Tensor]], Callable]:
    """Register ``fn`` under ``name``; a second registration of a name is a bug, not an override."""

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in METHODS:
            raise KeyError(f"merge method {name!r} is already registered")
        METHODS[name] = MergeMethod(name, fn, uses_trim, summary)
        return fn

    return decorate


def elect_sign(taus: Sequence[torch.Tensor], zero_sign: str = "zero") -> torch.Tensor:
    """γ = sgn(Σᵢ τᵢ): the sign with the larger total mass wins (TIES step 2).

    Where the sum is exactly 0, ``zero`` keeps γ = 0 (TIES Algorithm 1: no entry agrees, τ* = 0) and
    ``positive`` sets γ = +1 (mergekit's convention).
    """
    gamma = torch.sign(torch.stack(list(taus)).sum(0))
    if zero_sign == "positive":
        gamma = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
    elif zero_sign != "zero":
        raise ValueError(f"unknown zero_sign rule {zero_sign!r}")
    return gamma


def disjoint_mean(taus: Sequence[torch.Tensor], gamma: torch.Tensor) -> torch.Tensor:
    """Average, per entry, only the τᵢ that are non-zero and agree with γ (TIES step 3); 0 where none do."""
    stacked = torch.stack(list(taus))
    agree = (torch.sign(stacked) == gamma) & (stacked != 0)
    total = torch.where(agree, stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device)).sum(0)
    count = agree.sum(0)
    return total / count.clamp(min=1).to(total.dtype)


@register_method("ties", uses_trim=True, summary="TIES-Merging: trim to top-K, elect sign by mass, disjoint mean")
def ties(taus: Sequence[torch.Tensor], *, alpha: float = 1.0, zero_sign: str = "zero") -> torch.Tensor:
    """τ* = α · disjoint_mean(τ, γ) with γ = sgn(Σ τᵢ), over already-trimmed τᵢ (mmer-method.md §2)."""
    gamma = elect_sign(taus, zero_sign)
    tau_star = disjoint_mean(taus, gamma)
    return tau_star * alpha if alpha != 1.0 else tau_star
