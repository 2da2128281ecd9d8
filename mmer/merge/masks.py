"""Mask rules by name: which entries of τ* each modality keeps, and the one reconstruction formula.

MMER (arXiv 2505.17110) §3.2; TALL-masks (arXiv 2405.07813) §3; EMR-Merging (arXiv 2405.17461) §3.

- ``mmer`` (Eq. 3): mᵢ = [sgn(τᵢ) = sgn(τ*)] ∧ [|τᵢ| ≥ λᵢ·0.5·|τ*|], the ℓ1-optimal choice of Eq. 2 at λᵢ = 1,
  inclusive.
- ``tall`` (TALL-masks): mᵢ = |τᵢ| > λᵢ·|τ* − τᵢ|, strict, on the untrimmed τᵢ (TALL compares with θᵢ itself).
  Unlike MMER it can keep an entry whose sign disagrees with τ* once λ < 1.
- ``emr`` (EMR-Merging): mᵢ = [τᵢ·τ* > 0] (sign agreement only), paired with a per-modality rescaler
  sᵢ = Σₙ mean|τᵢ,ₙ| / Σₙ mean|mᵢ,ₙ∘τ*ₙ| over tensors n, so θ̂ᵢ = θ_base + sᵢ·mᵢ∘τ*. Defined on EMR's own
  unified vector only, and tuning-free (no λ).
- ``sign_only`` and ``magnitude_only``: MMER's Table 5 ablations, each one of Eq. 3's two tests alone:
  mᵢ = [sgn(τᵢ) = sgn(τ*)] (directional congruence) and mᵢ = [|τᵢ| ≥ λᵢ·0.5·|τ*|] (dominant significance,
  whatever the signs). Defined on any method's τ*, as the ablation runs them on TIES'.
- ``none``: no masks; the output is the one merged model θ_base + τ* (the papers' single-model baselines).

Each rule declares what it takes (λ, ``mask_source``) and which methods it pairs with; the plan refuses a
recipe that sets anything else.

One convention the paper leaves open: where τ* = 0 the mask is 0. The formula read literally would set it
to 1 where τᵢ = 0 too; that bit cannot change any weight (mᵢ·0 = 0) but would count parameters that carry
nothing as "kept" in every density the paper reports (Fig. 4a), so mmer clears it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

MASK_OPTIONS = ("lambda", "mask_source")  # by recipe key; ``lambda`` also stands for a model spec's ``lambda:``


@dataclass(frozen=True)
class MaskRule:
    """A registered mask rule: ``fn(tau_i, tau_star, lam) -> bool tensor``, and what it takes.

    Attributes:
        default_lambda: λ used when neither the recipe nor the model spec sets one (``None``: the rule has no λ).
        uses_raw: the rule compares τ* with the untrimmed τᵢ = θᵢ − θ_base whatever ``mask_source`` says.
        rescaled: the rule comes with a per-modality rescaler (stored in the manifest as ``scale``).
        accepts: the ``MASK_OPTIONS`` the rule reads; a recipe that sets any other is refused.
        pairs_with: the only methods whose τ* the rule is defined on (``None``: any), and ``pairing`` says why.
        single_model_output: no masks at all: the output is one merged model (``fn`` is ``None``).
        why_not: why an option the rule does not take does not apply (for the plan's refusal).
    """

    name: str
    fn: Callable[..., torch.Tensor] | None
    summary: str
    default_lambda: float | None = None
    uses_raw: bool = False
    rescaled: bool = False
    precompute: Callable[[torch.Tensor], object] | None = None  # per-slot work shared by every modality's call
    accepts: frozenset[str] = frozenset()
    pairs_with: frozenset[str] | None = None
    pairing: str | None = None
    single_model_output: bool = False
    why_not: Mapping[str, str] = field(default_factory=dict)

    def refusal(self, option: str) -> str:
        """Why ``option`` does not apply to this rule (for the plan's refusal)."""
        return self.why_not.get(option, "the rule does not read it")


MASKS: dict[str, MaskRule] = {}


def register_mask(
    name: str,
    *,
    summary: str,
    default_lambda: float | None = None,
    uses_raw: bool = False,
    rescaled: bool = False,
    precompute: Callable[[torch.Tensor], object] | None = None,
    accepts: Sequence[str] = (),
    pairs_with: Sequence[str] | None = None,
    pairing: str | None = None,
    why_not: Mapping[str, str] | None = None,
) -> Callable:
    """Register ``fn`` under ``name``; a second registration of a name is a bug, not an override."""
    if set(accepts) - set(MASK_OPTIONS):
        raise ValueError(f"mask rule {name!r} accepts unknown options {sorted(set(accepts) - set(MASK_OPTIONS))}")
    if ("lambda" in accepts) != (default_lambda is not None):
        raise ValueError(f"mask rule {name!r}: a rule takes λ exactly when it has a default λ")
    if uses_raw and "mask_source" in accepts:
        raise ValueError(f"mask rule {name!r} compares with the raw τᵢ, so mask_source cannot apply")

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable:
        if name in MASKS:
            raise KeyError(f"mask rule {name!r} is already registered")
        pairs = None if pairs_with is None else frozenset(pairs_with)
        MASKS[name] = MaskRule(
            name,
            fn,
            summary,
            default_lambda,
            uses_raw,
            rescaled,
            precompute,
            frozenset(accepts),
            pairs,
            pairing,
            why_not=dict(why_not or {}),
        )
        return fn

    return decorate


# Not a rule but declared as one: one merged model, no masks (NaiveMC, TA and TIES as the papers' baselines).
MASKS["none"] = MaskRule(
    "none",
    None,
    "no masks: one merged model, written as a plain checkpoint",
    single_model_output=True,
    why_not={
        "lambda": "it writes one merged model, with no masks for a λ to shape",
        "mask_source": "it writes one merged model, with no masks to compare",
    },
)


def _mmer_precompute(tau_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sign(tau_star), tau_star.abs()


@register_mask(
    "mmer",
    summary="MMER Eq. 3: sign agrees with τ* and |τᵢ| ≥ λ·0.5·|τ*|",
    default_lambda=0.9,
    precompute=_mmer_precompute,
    accepts=("lambda", "mask_source"),
)
def mmer_mask(
    tau_i: torch.Tensor,
    tau_star: torch.Tensor,
    lam: float,
    precomputed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Directional congruence ∧ dominant significance (Eq. 3).

    With s = sgn(τ*), u = τᵢ·s is |τᵢ| where the signs agree, −|τᵢ| where they differ and 0 where τ* = 0 (a
    product with ±1 or 0 is exact), so the mask is [u > 0] ∧ [u ≥ λ·0.5·|τ*|] in five vector operations.
    """
    sign_star, abs_star = precomputed if precomputed is not None else _mmer_precompute(tau_star)
    u = tau_i * sign_star
    return (u > 0) & (u >= (lam * 0.5) * abs_star)


@register_mask(
    "sign_only",
    summary="MMER Table 5 ablation: Eq. 3's sign test alone, sgn(τᵢ) = sgn(τ*)",
    precompute=_mmer_precompute,
    accepts=("mask_source",),
    why_not={"lambda": "the sign test alone has no magnitude for λ to scale (magnitude_only is the other half)"},
)
def sign_only_mask(
    tau_i: torch.Tensor,
    tau_star: torch.Tensor,
    lam: float,
    precomputed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """[sgn(τᵢ) = sgn(τ*)] where τ* ≠ 0: τᵢ·sgn(τ*) > 0, exact where the product τᵢ·τ* could underflow to 0."""
    sign_star = precomputed[0] if precomputed is not None else torch.sign(tau_star)
    return tau_i * sign_star > 0


@register_mask(
    "magnitude_only",
    summary="MMER Table 5 ablation: Eq. 3's magnitude test alone, |τᵢ| ≥ λ·0.5·|τ*| whatever the signs",
    default_lambda=0.9,
    precompute=_mmer_precompute,
    accepts=("lambda", "mask_source"),
)
def magnitude_only_mask(
    tau_i: torch.Tensor,
    tau_star: torch.Tensor,
    lam: float,
    precomputed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """[|τᵢ| ≥ λ·0.5·|τ*|] where τ* ≠ 0 (the module's convention); unlike ``mmer`` it keeps an entry whose τᵢ
    points against τ*, and at λ = 0 every entry where τ* ≠ 0."""
    abs_star = precomputed[1] if precomputed is not None else tau_star.abs()
    return (abs_star > 0) & (tau_i.abs() >= (lam * 0.5) * abs_star)


@register_mask(
    "tall",
    summary="TALL-masks: |τᵢ| > λ·|τ* − τᵢ| on the untrimmed τᵢ (λ defaults to 0.4, the middle of TALL's grid)",
    default_lambda=0.4,
    uses_raw=True,
    accepts=("lambda",),
    why_not={"mask_source": "TALL compares τ* with the untrimmed τᵢ whatever mask_source says"},
)
def tall_mask(tau_i: torch.Tensor, tau_star: torch.Tensor, lam: float) -> torch.Tensor:
    """TALL's rule exactly as its code writes it (strict >; λ·|τ* − τᵢ|)."""
    return tau_i.abs() > (tau_star - tau_i).abs() * lam


@register_mask(
    "emr",
    summary="EMR-Merging: sign agreement with τ*, plus a per-modality rescaler",
    rescaled=True,
    pairs_with=("emr",),
    pairing="EMR's masks and rescalers are defined on its own unified vector (max magnitude over agreeing task "
    "vectors), not on another method's τ*",
    why_not={
        "lambda": "EMR is tuning-free: its masks keep every entry whose sign agrees with τ*",
        "mask_source": "method emr, its only pair, neither trims nor drops, so there is one τᵢ to compare",
    },
)
def emr_mask(tau_i: torch.Tensor, tau_star: torch.Tensor, lam: float) -> torch.Tensor:
    """Mᵢ = [τᵢ·τ* > 0]; λ is unused (EMR is tuning-free)."""
    return tau_i * tau_star > 0


def rebuild_weight(
    base: torch.Tensor,
    tau_star: torch.Tensor,
    mask: torch.Tensor | None,
    dtype: torch.dtype | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """θ̂ᵢ = θ_base + sᵢ·mᵢ∘τ*, in float32 then cast to ``dtype`` (the base's by default).

    ``mask=None`` means every entry (a single merged model); ``scale`` is EMR's rescaler (1 otherwise). The
    one formula that merge checks, reconstruction and routing all use, so they cannot drift apart.
    """
    delta = tau_star.float()
    if mask is not None:
        delta = torch.where(mask, delta, torch.zeros((), device=delta.device))
    if scale != 1.0:
        delta = delta * scale
    return (base.float() + delta).to(dtype or base.dtype)
