"""Mask rules by name: which entries of τ* each modality keeps, and the one reconstruction formula.

Read beside mmer-method.md §3 and §10.

- ``mmer`` (Eq. 3): mᵢ = [sgn(τᵢ) = sgn(τ*)] ∧ [|τᵢ| ≥ λᵢ·0.5·|τ*|], the ℓ1-optimal choice of Eq. 2 at λᵢ = 1,
  inclusive.
- ``tall`` (TALL-masks): mᵢ = |τᵢ| > λᵢ·|τ* − τᵢ|, strict, on the untrimmed τᵢ (TALL compares with θᵢ itself).
  Unlike MMER it can keep an entry whose sign disagrees with τ* once λ < 1.
- ``emr`` (EMR-Merging): mᵢ = [τᵢ·τ* > 0] (sign agreement only), paired with a per-modality rescaler
  sᵢ = Σₙ mean|τᵢ,ₙ| / Σₙ mean|mᵢ,ₙ∘τ*ₙ| over tensors n, so θ̂ᵢ = θ_base + sᵢ·mᵢ∘τ*.

One convention the paper leaves open: where τ* = 0 the mask is 0. The formula read literally would set it
to 1 where τᵢ = 0 too; that bit cannot change any weight (mᵢ·0 = 0) but would count parameters that carry
nothing as "kept" in every density the paper reports (Fig. 4a), so mmer clears it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskRule:
    """A registered mask rule: ``fn(tau_i, tau_star, lam) -> bool tensor``.

    Attributes:
        default_lambda: λ used when neither the recipe nor the model spec sets one (``None``: λ is unused).
        uses_raw: the rule compares τ* with the untrimmed τᵢ = θᵢ − θ_base whatever ``mask_source`` says.
        rescaled: the rule comes with a per-modality rescaler (stored in the manifest as ``scale``).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    default_lambda: float | None = None
    uses_raw: bool = False
    rescaled: bool = False
    prepare: Callable[[torch.Tensor], object] | None = None  # per-slot work shared by every modality's call


MASKS: dict[str, MaskRule] = {}
NO_MASK = "none"  # not a rule: one merged model, no masks (NaiveMC, TA and TIES as baselines)


def register_mask(
    name: str,
    *,
    summary: str,
    default_lambda: float | None = None,
    uses_raw: bool = False,
    rescaled: bool = False,
    prepare: Callable[[torch.Tensor], object] | None = None,
) -> Callable:
    def decorate(fn: Callable[..., torch.Tensor]) -> Callable:
        if name in MASKS or name == NO_MASK:
            raise KeyError(f"mask rule {name!r} is already registered")
        MASKS[name] = MaskRule(name, fn, summary, default_lambda, uses_raw, rescaled, prepare)
        return fn

    return decorate


def _mmer_prepare(tau_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sign(tau_star), tau_star.abs()


@register_mask(
    "mmer",
    summary="MMER Eq. 3: sign agrees with τ* and |τᵢ| ≥ λ·0.5·|τ*|",
    default_lambda=0.9,
    prepare=_mmer_prepare,
)
def mmer_mask(
    tau_i: torch.Tensor, tau_star: torch.Tensor, lam: float, prepared: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Directional congruence ∧ dominant significance (Eq. 3).

    With s = sgn(τ*), u = τᵢ·s is |τᵢ| where the signs agree, −|τᵢ| where they differ and 0 where τ* = 0 (a
    product with ±1 or 0 is exact), so the mask is [u > 0] ∧ [u ≥ λ·0.5·|τ*|] in five vector operations.
    """
    sign_star, abs_star = prepared if prepared is not None else _mmer_prepare(tau_star)
    u = tau_i * sign_star
    return (u > 0) & (u >= (lam * 0.5) * abs_star)


@register_mask(
    "tall",
    summary="TALL-masks: |τᵢ| > λ·|τ* − τᵢ| on the untrimmed τᵢ (λ defaults to 0.4, the middle of TALL's grid)",
    default_lambda=0.4,
    uses_raw=True,
)
def tall_mask(tau_i: torch.Tensor, tau_star: torch.Tensor, lam: float) -> torch.Tensor:
    """TALL's rule exactly as its code writes it (strict >; λ·|τ* − τᵢ|)."""
    return tau_i.abs() > (tau_star - tau_i).abs() * lam


@register_mask("emr", summary="EMR-Merging: sign agreement with τ*, plus a per-modality rescaler", rescaled=True)
def emr_mask(tau_i: torch.Tensor, tau_star: torch.Tensor, lam: float) -> torch.Tensor:
    """Mᵢ = [τᵢ·τ* > 0]; λ is unused (EMR is tuning-free)."""
    return tau_i * tau_star > 0


def reconstruct(
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
