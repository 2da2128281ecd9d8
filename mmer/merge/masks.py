"""Mask rules by name: which entries of τ* each modality keeps, and the one reconstruction formula.

Read beside mmer-method.md §3. MMER's Eq. 3: mᵢ = [sgn(τᵢ) = sgn(τ*)] ∧ [|τᵢ| ≥ λᵢ·0.5·|τ*|], the ℓ1-optimal
choice of Eq. 2 at λᵢ = 1, with the inequality inclusive.

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
    """A registered mask rule: ``fn(tau_i, tau_star, lam) -> bool tensor``."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    summary: str


MASKS: dict[str, MaskRule] = {}


def register_mask(name: str, *, summary: str) -> Callable:
    def decorate(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> Callable:
        if name in MASKS:
            raise KeyError(f"mask rule {name!r} is already registered")
        MASKS[name] = MaskRule(name, fn, summary)
        return fn

    return decorate


@register_mask("mmer", summary="MMER Eq. 3: sign agrees with τ* and |τᵢ| ≥ λ·0.5·|τ*|")
def mmer_mask(tau_i: torch.Tensor, tau_star: torch.Tensor, lam: float) -> torch.Tensor:
    """Directional congruence ∧ dominant significance (Eq. 3)."""
    sign_star = torch.sign(tau_star)
    congruent = (torch.sign(tau_i) == sign_star) & (sign_star != 0)
    significant = tau_i.abs() >= (lam * 0.5) * tau_star.abs()
    return congruent & significant


def reconstruct(
    base: torch.Tensor, tau_star: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """θ̂ᵢ = θ_base + mᵢ∘τ*, in float32 then cast to ``dtype`` (the base's by default).

    The one formula that merge checks, reconstruction and routing all use, so they cannot drift apart.
    """
    out = base.float() + torch.where(mask, tau_star.float(), torch.zeros((), device=tau_star.device))
    return out.to(dtype or base.dtype)
