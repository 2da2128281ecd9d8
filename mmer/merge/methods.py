"""Merge methods by name: the task vectors of one tensor slot → the merged task vector τ*.

A method is a plain function registered with :func:`register_method`; the pipeline does the streaming, DARE
and the trimming (whose global threshold needs a pass over the whole model) and calls the method once per
tensor. Each method declares the options it takes (``accepts``): the engine hands it only those, the plan
refuses any other that a recipe sets, ``--help`` lists them and the fused kernel's coverage is checked against
them. Symbols are the papers' (τ, γ, α): TIES-Merging (arXiv 2306.01708) §3, task arithmetic (arXiv
2212.04089) §2, EMR-Merging (arXiv 2405.17461) §3.

Where libraries disagree on TIES the choice is a named argument: ``elect_on`` (``raw``: γ from Σ τᵢ as in the
TIES paper and PEFT; ``weighted``: γ from Σ wᵢτᵢ as in mergekit), ``aggregate`` (``mean``: disjoint mean, the
paper's; ``sum``: disjoint sum, FusionBench's default), and ``zero_sign`` (what γ is where the sum is exactly 0:
``zero`` as TIES Algorithm 1 writes it, ``positive`` as mergekit, ``majority`` as the TIES authors' code,
ModelCompose's and FusionBench's ``resolve_zero_signs(..., "majority")``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

# Method options by recipe key (``weights`` stands for the model specs' ``weight:``), grouped by the step that
# reads them. The engine reads the trim and DARE options; the method's own function takes ARGUMENTS.
TRIM_OPTIONS = ("k", "trim_scope", "trim_count")
DARE_OPTIONS = ("dare", "dare_seed")
TIES_OPTIONS = ("zero_sign", "elect_on", "aggregate")
SUBSPACE_OPTIONS = ("common_space", "iterations", "rank_fraction")  # Iso-CTS, WUDI and CART read one each
ARGUMENTS = ("weights", "alpha", *TIES_OPTIONS, *SUBSPACE_OPTIONS)
METHOD_OPTIONS = ("alpha", "weights", *TRIM_OPTIONS, *DARE_OPTIONS, *TIES_OPTIONS, *SUBSPACE_OPTIONS)
# Arguments that no recipe sets: the engine counts them over the whole model first, and hands each to a method
# that takes the option it resolves (``majority``: the sign ``zero_sign="majority"`` gives where Σ τᵢ = 0).
DERIVED_ARGUMENTS = {"majority": "zero_sign"}


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and what it takes.

    Attributes:
        name: the registry name used in recipes, on the command line and in manifests.
        fn: ``fn(taus, **arguments) -> tau_star`` over float32 tensors; takes exactly the ``ARGUMENTS`` it accepts
            (and the ``DERIVED_ARGUMENTS`` of those).
        summary: one line for ``--help`` and the model card.
        accepts: the ``METHOD_OPTIONS`` this method reads; a recipe that sets any other is refused.
        default_alpha: α used when the recipe does not set one.
        why_not: why a refused option does not apply, where that needs more than "the method does not read it".
        elects: for a method that elects signs (it takes ``zero_sign``), ``elects(taus, weights=, elect_on=)`` gives
            its γ before the zero-sign rule, so the engine can count the model-wide majority sign first.
        elementwise: whether τ* at an entry depends only on the τᵢ at that entry, so a tensor may be merged in
            flat chunks; False for a method that works on each weight matrix whole (its singular vectors).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    accepts: frozenset[str]
    default_alpha: float = 1.0
    why_not: Mapping[str, str] = field(default_factory=dict)
    elects: Callable[..., torch.Tensor] | None = None
    elementwise: bool = True

    @property
    def uses_trim(self) -> bool:
        """Whether the pipeline first trims each task vector to its top-K fraction."""
        return "k" in self.accepts

    def refusal(self, option: str) -> str:
        """Why ``option`` does not apply to this method (for the plan's refusal)."""
        if option in self.why_not:
            return self.why_not[option]
        for group, reason in _REFUSALS.items():
            if option in group:
                return reason
        return "the method does not read it"

    def merge(self, taus: Sequence[torch.Tensor] | torch.Tensor, **options: object) -> torch.Tensor:
        """τ* from the options the method takes; the engine passes every option and each method gets its own."""
        taken = [name for name in ARGUMENTS if name in self.accepts]
        taken += [name for name, option in DERIVED_ARGUMENTS.items() if option in self.accepts]
        return self.fn(taus, **{name: options[name] for name in taken if name in options})


_REFUSALS = {
    TRIM_OPTIONS: "the method does not trim its task vectors",
    DARE_OPTIONS: "the method takes no DARE",
    TIES_OPTIONS: "it chooses how TIES elects signs or merges the agreeing entries, which the method does not do",
    SUBSPACE_OPTIONS: "only the method that names it reads it (common_space: iso_cts; iterations: wudi; "
    "rank_fraction: cart)",
    ("weights",): "the method takes no per-model weights",
    ("alpha",): "the method has no α",
}

METHODS: dict[str, MergeMethod] = {}


def register_method(
    name: str,
    *,
    summary: str,
    accepts: Sequence[str],
    default_alpha: float = 1.0,
    why_not: Mapping[str, str] | None = None,
    elects: Callable[..., torch.Tensor] | None = None,
    elementwise: bool = True,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn`` under ``name``; a second registration of a name is a bug, not an override."""
    unknown = set(accepts) - set(METHOD_OPTIONS)
    if unknown:
        raise ValueError(f"merge method {name!r} accepts unknown options {sorted(unknown)}")
    if "k" in accepts and not set(TRIM_OPTIONS) <= set(accepts):
        raise ValueError(f"merge method {name!r} trims, so it takes every one of {TRIM_OPTIONS}")
    if ("zero_sign" in accepts) != (elects is not None):
        raise ValueError(f"merge method {name!r}: a method takes zero_sign exactly when it declares how it elects")

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in METHODS:
            raise KeyError(f"merge method {name!r} is already registered")
        METHODS[name] = MergeMethod(
            name,
            fn,
            summary,
            frozenset(accepts),
            default_alpha,
            dict(why_not or {}),
            elects=elects,
            elementwise=elementwise,
        )
        return fn

    return decorate


def methods_accepting(option: str) -> list[str]:
    """The registered methods that take ``option``, by name (for hints and ``--help``)."""
    return sorted(m.name for m in METHODS.values() if option in m.accepts)


def as_stack(taus: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The task vectors as one ``[n, ...]`` tensor; a stack built by the caller is used as is (no copy)."""
    return taus if isinstance(taus, torch.Tensor) else torch.stack(list(taus))


def _weights(taus: Sequence[torch.Tensor], weights: Sequence[float] | None) -> torch.Tensor:
    """Per-model weights shaped to broadcast over a stack of task vectors."""
    stacked_dims = taus[0].dim()
    w = torch.tensor(
        [1.0] * len(taus) if weights is None else list(weights), dtype=torch.float32, device=taus[0].device
    )
    return w.reshape(-1, *([1] * stacked_dims))


def elect_sign(taus: Sequence[torch.Tensor], zero_sign: str = "zero", majority: int | None = None) -> torch.Tensor:
    """γ = sgn(Σᵢ τᵢ): the sign with the larger total mass wins (TIES step 2).

    Where the sum is exactly 0, ``zero`` keeps γ = 0 (TIES Algorithm 1: no entry agrees, τ* = 0), ``positive``
    sets γ = +1 (mergekit's convention) and ``majority`` sets γ = ``majority``, the model-wide majority sign
    (see :class:`SignCensus`; the TIES authors' code, ModelCompose and FusionBench).
    """
    return _resolve_zeros(torch.sign(as_stack(taus).sum(0)), zero_sign, majority)


def tie_sign(zero_sign: str, majority: int | None = None) -> float:
    """The γ a ``zero_sign`` rule gives where Σᵢ τᵢ is exactly 0: the one place the rules are defined."""
    if zero_sign == "zero":
        return 0.0
    if zero_sign == "positive":
        return 1.0
    if zero_sign == "majority":
        if majority not in (-1, 1):
            raise ValueError(
                "zero_sign 'majority' needs the model-wide majority sign, counted over every merged entry first "
                f"(mmer.engine.count_majority); got {majority!r}"
            )
        return float(majority)
    raise ValueError(f"unknown zero_sign rule {zero_sign!r}")


def _resolve_zeros(gamma: torch.Tensor, zero_sign: str, majority: int | None) -> torch.Tensor:
    tie = tie_sign(zero_sign, majority)
    if tie == 0.0:
        return gamma
    return torch.where(gamma == 0, torch.full_like(gamma, tie), gamma)


@dataclass(frozen=True)
class SignCensus:
    """How many merged entries, over the whole model, elect γ = +1 and γ = −1 before any zero-sign rule.

    ``zero_sign="majority"`` gives every entry whose Σᵢ τᵢ is exactly 0 the sign most entries elected: the TIES
    authors' ``resolve_zero_signs(sign_to_mult, "majority")``, which ModelCompose (the code MMER builds on) and
    FusionBench's TIES call, takes ``sgn(Σ sign_to_mult)`` over the model flattened into one vector. Counted here
    exactly in integers; their float32 sum of ±1 agrees unless the counts are within its rounding of a tie, which
    needs over 2²⁴ entries.
    """

    positive: int = 0
    negative: int = 0

    @property
    def majority(self) -> int:
        """+1 when more entries elect +1 than −1, else −1. A tied count leaves the reference code's γ at 0 there,
        and its disjoint merge keeps τᵢ < 0 where γ is not positive (``where(γ > 0, τ > 0, τ < 0)``): −1 in
        effect, so −1 here too, bit for bit."""
        return 1 if self.positive > self.negative else -1

    def __add__(self, other: SignCensus) -> SignCensus:
        return SignCensus(self.positive + other.positive, self.negative + other.negative)

    @classmethod
    def of(cls, gamma: torch.Tensor) -> SignCensus:
        """The census of elected signs ``gamma`` (NaN, where a sum is not a number, counts as neither)."""
        return cls(int(torch.count_nonzero(gamma > 0)), int(torch.count_nonzero(gamma < 0)))

    def to_dict(self) -> dict[str, int]:
        return {"positive": self.positive, "negative": self.negative, "majority_sign": self.majority}


def ties_signs(
    taus: Sequence[torch.Tensor] | torch.Tensor, *, weights: Sequence[float] | None = None, elect_on: str = "raw"
) -> torch.Tensor:
    """TIES' γ before the zero-sign rule: sgn(Σ τᵢ), or sgn(Σ wᵢτᵢ) when electing on weighted task vectors."""
    stacked = as_stack(taus)
    if elect_on == "weighted" and weights is not None:
        return torch.sign((stacked * _weights(list(stacked), weights)).sum(0))
    if elect_on in ("raw", "weighted"):
        return torch.sign(stacked.sum(0))
    raise ValueError(f"unknown elect_on {elect_on!r}")


def disjoint_mean(
    taus: Sequence[torch.Tensor], gamma: torch.Tensor, weights: Sequence[float] | None = None, aggregate: str = "mean"
) -> torch.Tensor:
    """Combine, per entry, only the τᵢ that are non-zero and agree with γ (TIES step 3); 0 where none do.

    ``mean`` divides the weighted sum by the weights of the agreeing models (by their count when unweighted);
    ``sum`` does not divide.
    """
    return _disjoint(as_stack(taus), gamma, weights, aggregate)


def _count(agree: torch.Tensor) -> torch.Tensor:
    """How many models agree, per entry: exact small integers, summed in one byte while they fit.

    A bool ``sum(0)`` widens every entry to int64 first; row-by-row uint8 adds move an eighth of the bytes
    (about 10x faster here) and give the same counts.
    """
    if agree.shape[0] > 255:
        return agree.sum(0)
    count = agree[0].to(torch.uint8)
    for row in agree[1:]:
        count += row
    return count


def _disjoint(
    stacked: torch.Tensor, gamma: torch.Tensor, weights: Sequence[float] | None, aggregate: str
) -> torch.Tensor:
    # τᵢ·γ > 0 ⟺ sgn(τᵢ) = γ ∧ τᵢ ≠ 0, exactly: γ ∈ {−1, 0, 1}, so the product only flips a sign.
    agree = stacked * gamma > 0
    zero = torch.zeros((), dtype=stacked.dtype, device=stacked.device)
    if weights is None:
        total = torch.where(agree, stacked, zero).sum(0)
        if aggregate == "sum":
            return total
        return total / _count(agree).clamp(min=1).to(total.dtype)
    w = _weights(list(stacked), weights)
    total = torch.where(agree, stacked * w, zero).sum(0)
    if aggregate == "sum":
        return total
    divisor = torch.where(agree, w.expand_as(stacked), zero).sum(0)
    return total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


_AVERAGING = ("alpha", "weights", *DARE_OPTIONS)


@register_method("average", accepts=_AVERAGING, summary="NaiveMC: weighted average of the task vectors (θ* = mean θᵢ)")
def average(
    taus: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None, alpha: float = 1.0
) -> torch.Tensor:
    """τ* = α · Σ wᵢτᵢ / Σ wᵢ; with unit weights and α = 1 the merged LLM is the plain average of the LLMs."""
    if weights is None:
        merged = as_stack(taus).sum(0) / len(taus)
    else:
        w = _weights(taus, weights)
        merged = (as_stack(taus) * w).sum(0) / w.sum()
    return merged * alpha if alpha != 1.0 else merged


@register_method(
    "task_arithmetic",
    accepts=_AVERAGING,
    default_alpha=0.3,
    summary="Task arithmetic: α · Σ wᵢτᵢ (α defaults to 0.3, FusionBench's and the TA paper's usual value)",
)
def task_arithmetic(
    taus: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None, alpha: float = 1.0
) -> torch.Tensor:
    """τ* = α · Σ wᵢτᵢ."""
    stacked = as_stack(taus)
    merged = stacked.sum(0) if weights is None else (stacked * _weights(taus, weights)).sum(0)
    return merged * alpha if alpha != 1.0 else merged


@register_method(
    "ties",
    accepts=("alpha", "weights", *TRIM_OPTIONS, *DARE_OPTIONS, *TIES_OPTIONS),
    elects=ties_signs,
    summary="TIES-Merging: trim to top-K, elect sign by mass, disjoint mean",
)
def ties(
    taus: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | None = None,
    alpha: float = 1.0,
    zero_sign: str = "zero",
    elect_on: str = "raw",
    aggregate: str = "mean",
    majority: int | None = None,
) -> torch.Tensor:
    """τ* = α · disjoint_mean(τ, γ) with γ = sgn(Σ τᵢ), over already-trimmed τᵢ (TIES-Merging §3, Algorithm 1).

    ``majority`` is the model-wide majority sign that ``zero_sign="majority"`` needs (:class:`SignCensus`).
    """
    stacked = as_stack(taus)
    gamma = _resolve_zeros(ties_signs(stacked, weights=weights, elect_on=elect_on), zero_sign, majority)
    tau_star = _disjoint(stacked, gamma, weights, aggregate)
    return tau_star * alpha if alpha != 1.0 else tau_star


@register_method(
    "emr",
    accepts=("alpha",),
    why_not={
        "dare": "EMR's unified vector keeps the largest agreeing magnitude, which DARE's 1/(1−p) rescaling would "
        "inflate; neither paper defines the combination",
        "weights": "EMR's unified vector takes the largest agreeing magnitude, which per-model weights do not enter",
    },
    summary="EMR-Merging's unified vector: γ = sgn(Σ τᵢ) (0 counts as −), magnitude = max over agreeing τᵢ",
)
def emr(taus: Sequence[torch.Tensor], *, alpha: float = 1.0) -> torch.Tensor:
    """τ_uni = γ · maxᵢ |τᵢ| over the τᵢ with τᵢ·γ > 0, where γ = +1 if Σ τᵢ > 0 else −1 (EMR's code)."""
    stacked = as_stack(taus)
    gamma = torch.where(stacked.sum(0) > 0, 1.0, -1.0).to(stacked.dtype)
    agree = stacked * gamma > 0
    magnitude = torch.where(agree, stacked.abs(), torch.zeros((), dtype=stacked.dtype, device=stacked.device))
    unified = magnitude.amax(0) * gamma
    return unified * alpha if alpha != 1.0 else unified
