"""One tensor slot through one merge variant: DARE → trim → merge → τ* → masks (→ EMR rescaler sums).

The merge pipeline calls this once per slot, and ``compare`` calls it once per slot and variant, so every
method and mask rule streams through the same code. Pure tensor math: the caller reads and writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mmer.merge.dare import dare
from mmer.merge.masks import MASKS, MaskRule
from mmer.merge.methods import METHODS, MergeMethod, SignCensus
from mmer.merge.trim import tensor_threshold, trim

RECORDED_KEYS = ("sign_census",)  # what ``Variant.recorded`` adds to a manifest's options: counted, never set


@dataclass(frozen=True)
class Variant:
    """Everything that decides how a slot is merged and masked, resolved (no ``None`` defaults left).

    Built by the pipeline from a recipe's options; kept here so the math does not depend on the config layer.
    ``census`` is the one thing counted rather than set: the model-wide sign census that ``zero_sign="majority"``
    needs, filled in by the engine's census pass (``mmer.engine.count_majority``) before any slot is merged.

    K and DARE's p may differ by model (TIES-Merging, arXiv 2306.01708 §3, and DARE, arXiv 2311.03099 §3, trim and
    drop each τᵢ on its own; mergekit's per-model ``density``): ``model_k`` and ``model_dare`` then hold each
    model's value, ``k`` the smallest K and ``dare`` the largest p, so that ``k < 1`` still says "some model is
    trimmed" and ``dare > 0`` "some model is dropped" wherever the engine asks. Equal values are one merge-wide value
    (``model_k`` is ``None``): a variant is built by :func:`per_model`, so a merge whose models all take one K is the
    merge-wide one bit for bit.
    """

    method: str
    mask: str
    k: float
    alpha: float
    trim_scope: str
    trim_count: str
    zero_sign: str
    elect_on: str
    aggregate: str
    mask_source: str
    dare: float
    dare_seed: int
    lambdas: tuple[float | None, ...]
    weights: tuple[float, ...] | None = None
    census: SignCensus | None = None
    common_space: float = 0.8
    iterations: int = 400
    rank_fraction: float = 0.1
    model_k: tuple[float, ...] | None = None
    model_dare: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.model_k is not None and self.k != min(self.model_k):
            raise ValueError(f"k = {self.k} is not the smallest K of {self.model_k} (see per_model)")
        if self.model_dare is not None and self.dare != max(self.model_dare):
            raise ValueError(f"dare = {self.dare} is not the largest p of {self.model_dare} (see per_model)")

    def k_of(self, index: int) -> float:
        """Model ``index``'s trim fraction K."""
        return self.model_k[index] if self.model_k is not None else self.k

    def dare_of(self, index: int) -> float:
        """Model ``index``'s DARE drop rate p."""
        return self.model_dare[index] if self.model_dare is not None else self.dare

    def ks(self, n_models: int) -> tuple[float, ...]:
        """Every model's K, in model order."""
        return self.model_k if self.model_k is not None else (self.k,) * n_models

    @property
    def merge_method(self) -> MergeMethod:
        return METHODS[self.method]

    @property
    def rule(self) -> MaskRule:
        return MASKS[self.mask]

    @property
    def uses_trim(self) -> bool:
        return self.merge_method.uses_trim and self.k < 1.0

    @property
    def masks_raw(self) -> bool:
        """Whether masks compare τ* with the raw task vectors (the rule needs them, or the recipe asks for them)
        rather than with the DARE'd and trimmed ones that entered the method."""
        return self.rule.uses_raw or self.mask_source == "raw"

    @property
    def needs_global_threshold(self) -> bool:
        return self.uses_trim and self.trim_scope == "global"

    @property
    def elementwise(self) -> bool:
        """Whether, given the global thresholds, every step maps entries independently.

        Then a slot can be merged in flat chunks with results identical bit for bit to the whole tensor:
        small chunks keep the working set in cache and let freed buffers be reused instead of faulting fresh
        pages for every operation. DARE draws its random mask per whole tensor, a per-tensor trim ranks the
        whole tensor, EMR's rescaler averages it and a subspace method (TSV-M, Iso, WUDI) decomposes it, so
        those variants take whole slots.
        """
        if self.dare > 0 or (self.uses_trim and self.trim_scope != "global") or not self.merge_method.elementwise:
            return False
        return not self.rule.rescaled

    @property
    def needs_census(self) -> bool:
        """Whether the method elects signs and gives a zero sum the model-wide majority sign, which must be
        counted over every merged entry before the first slot is merged."""
        return self.zero_sign == "majority" and self.merge_method.elects is not None

    @property
    def majority(self) -> int | None:
        return self.census.majority if self.census is not None else None

    @property
    def census_key(self) -> tuple:
        """Variants with equal keys elect the same signs everywhere, so they share one census: the same method on
        the same DARE'd and trimmed task vectors, electing on the same sums (the mask rule does not enter)."""
        trim = (self.k, self.trim_scope, self.trim_count, self.model_k or ()) if self.uses_trim else None
        weighted = self.elect_on == "weighted" and self.weights is not None
        return (self.method, trim, self.dare, self.dare_seed if self.dare > 0 else 0, weighted, self.model_dare or ())

    def recorded(self) -> dict[str, object]:
        """What the merge counted rather than was told, for the manifest's and the report's options: the sign
        census under ``zero_sign="majority"``, nothing otherwise."""
        return {"sign_census": self.census.to_dict()} if self.census is not None else {}

    @property
    def threshold_key(self) -> tuple[float, str, float, int, tuple[float, ...], tuple[float, ...]]:
        """Variants with equal keys share their global thresholds (same task vectors, same trim). The first four
        entries are K, the count rule, p and the seed (the smallest K and largest p when they differ by model:
        ``key[2] == 0`` still means no model is dropped); the last two each model's K and p, empty when merge-wide."""
        seed = self.dare_seed if self.dare > 0 else 0
        return (self.k, self.trim_count, self.dare, seed, self.model_k or (), self.model_dare or ())

    @property
    def label(self) -> str:
        dare_part = f"+dare{self.dare:g}" if self.dare > 0 else ""
        return f"{self.method}{dare_part}/{self.mask}"


@dataclass
class SlotResult:
    """τ* of one slot as stored, each modality's mask, and EMR's rescaler sums for this slot."""

    stored: torch.Tensor
    masks: list[torch.Tensor] | None
    scale_num: list[float] = field(default_factory=list)
    scale_den: list[float] = field(default_factory=list)


def apply_dare(raw_taus: Sequence[torch.Tensor], variant: Variant, name: str) -> Sequence[torch.Tensor]:
    """The task vectors that enter the method: DARE'd when asked (seeded by model position and tensor name)."""
    if variant.dare <= 0:
        return raw_taus
    return [_dare_one(t, variant, i, name) for i, t in enumerate(raw_taus)]


def _dare_one(raw: torch.Tensor, variant: Variant, index: int, name: str) -> torch.Tensor:
    return dare(raw, variant.dare_of(index), variant.dare_seed, index, name)


def per_model(values: Sequence[float], pick) -> tuple[float, tuple[float, ...] | None]:
    """A variant's merge-wide value and per-model tuple for one setting given per model: one value when they all
    agree (the merge is then the merge-wide one, bit for bit), else ``pick`` of them and the tuple (``min`` for K,
    ``max`` for p: see :class:`Variant`)."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("no models")
    if all(v == values[0] for v in values):
        return values[0], None
    return pick(values), values


def trim_taus(
    taus: Sequence[torch.Tensor] | torch.Tensor, variant: Variant, thresholds: Sequence[float | None] | None
) -> Sequence[torch.Tensor] | torch.Tensor:
    """Each τᵢ cut to its top K: at the model's global threshold, or ranked within this tensor; as is when the
    method does not trim."""
    if not variant.uses_trim:
        return taus
    if variant.trim_scope == "global":
        if thresholds is None:
            raise ValueError("global trim needs the models' thresholds")
        return _trim_each(taus, thresholds)
    return [trim(t, tensor_threshold(t, variant.k_of(i), variant.trim_count)) for i, t in enumerate(taus)]


def mask_source(raw: torch.Tensor, variant: Variant, index: int, name: str, threshold: float | None) -> torch.Tensor:
    """The τᵢ that model ``index``'s mask compares with τ*, exactly as :func:`merge_slot` makes it, for one model
    alone (``tune`` rebuilds one modality at a time): raw, or DARE'd (seeded by the model's position) then trimmed
    (at the model's own K)."""
    if variant.masks_raw:
        return raw
    tau = _dare_one(raw, variant, index, name) if variant.dare > 0 else raw
    if variant.uses_trim and variant.trim_scope != "global":
        return trim(tau, tensor_threshold(tau, variant.k_of(index), variant.trim_count))
    return trim_taus([tau], variant, [threshold])[0]


def _trim_each(taus: Sequence[torch.Tensor] | torch.Tensor, thresholds: Sequence[float | None]):
    """Each model's τᵢ trimmed at its own global threshold; a stack stays a stack (one pass for all).

    Exactly ``trim`` per model: a float32 column of thresholds compares like the Python floats it holds.
    """
    if isinstance(taus, torch.Tensor) and all(t is not None for t in thresholds):
        column = torch.tensor(list(thresholds), dtype=taus.dtype, device=taus.device)
        return trim(taus, column.reshape(-1, *([1] * (taus.dim() - 1))))
    return [trim(t, thr) for t, thr in zip(taus, thresholds, strict=True)]


def count_signs(
    raw_taus: Sequence[torch.Tensor], variant: Variant, name: str, thresholds: Sequence[float | None] | None = None
) -> SignCensus:
    """The census of one slot's elected signs before the zero-sign rule, from the very task vectors
    :func:`merge_slot` elects on (DARE'd, then trimmed), so the majority it adds up to is the merge's own."""
    trimmed = trim_taus(apply_dare(raw_taus, variant, name), variant, thresholds)
    elects = variant.merge_method.elects
    if elects is None:
        raise ValueError(f"merge method {variant.method!r} elects no signs to count")
    return SignCensus.of(elects(trimmed, weights=variant.weights, elect_on=variant.elect_on))


def merge_slot(
    raw_taus: Sequence[torch.Tensor],
    variant: Variant,
    name: str,
    store_dtype: torch.dtype,
    thresholds: Sequence[float | None] | None = None,
) -> SlotResult:
    """Merge one slot. ``thresholds`` are the models' global trim thresholds (``trim_scope="global"``)."""
    taus = apply_dare(raw_taus, variant, name)
    trimmed = trim_taus(taus, variant, thresholds)
    tau_star = variant.merge_method.merge(
        trimmed,
        weights=variant.weights,
        alpha=variant.alpha,
        zero_sign=variant.zero_sign,
        elect_on=variant.elect_on,
        aggregate=variant.aggregate,
        majority=variant.majority,
        common_space=variant.common_space,
        iterations=variant.iterations,
        rank_fraction=variant.rank_fraction,
    )
    stored = tau_star.to(store_dtype)
    rule = variant.rule
    if rule.single_model_output:
        return SlotResult(stored, None)
    # Masks compare against τ* as stored, so the artifact alone reproduces every bit of them.
    effective = stored.float()
    sources = raw_taus if variant.masks_raw else trimmed
    extra = {"precomputed": rule.precompute(effective)} if rule.precompute is not None else {}
    lambdas = [lam if lam is not None else 0.0 for lam in variant.lambdas]
    if isinstance(sources, torch.Tensor):  # a stack: every modality's mask in one broadcast call
        column = torch.tensor(lambdas, dtype=sources.dtype, device=sources.device)
        masks = list(rule.fn(sources, effective, column.reshape(-1, *([1] * effective.dim())), **extra))
    else:
        masks = [rule.fn(source, effective, lam, **extra) for source, lam in zip(sources, lambdas, strict=True)]
    result = SlotResult(stored, masks)
    if rule.rescaled:
        zero = torch.zeros((), device=effective.device)
        for tau, mask in zip(trimmed, masks, strict=True):
            result.scale_num.append(float(tau.abs().mean()) if tau.numel() else 0.0)
            kept = torch.where(mask, effective.abs(), zero)
            result.scale_den.append(float(kept.mean()) if kept.numel() else 0.0)
    return result
