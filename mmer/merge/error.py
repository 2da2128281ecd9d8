"""The relative ℓ1 reconstruction error ‖θ̂ᵢ − θᵢ‖₁ / ‖τᵢ‖₁ of a rebuilt model.

θ̂ᵢ is modality i's model rebuilt from the merge (``merge.masks.rebuild_weight``), θᵢ its fine-tuned model and
τᵢ = θᵢ − θ_base its task vector, each norm summed over the model's merged tensors: 0 means the fine-tuned model
is rebuilt exactly, 1 means it is as far from it as the base itself. Measuring it in units of τᵢ makes models
of any size and any amount of fine-tuning comparable, which is what the paper's per-modality accuracy loss
stands for when no benchmark is run (MMER, arXiv 2505.17110, §3.2, Eq. 2 is the per-entry ℓ1 objective the
masks minimise).

``compare``, ``tune``, ``verify`` and the ``add`` gap all report it through these functions, so the number
means the same everywhere. Sums are float32 per tensor, accumulated in Python floats across tensors.
"""

from __future__ import annotations

import torch


def error_l1(
    rebuilt: torch.Tensor,
    *,
    theta: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    tau: torch.Tensor | None = None,
) -> float:
    """‖θ̂ − θ‖₁ of one tensor, in float32.

    Given ``theta`` (the fine-tuned tensor itself, when it is read), it is ‖θ̂ − θ‖₁. Given ``base`` and ``tau``
    instead (the merge engine's passes hold τ, not θ), it is ‖(θ̂ − θ_base) − τ‖₁: the same quantity without
    reading θ again, and exactly 0 wherever θ̂ keeps τ whole.
    """
    if theta is not None:
        return float((rebuilt.float() - theta.float()).abs().sum())
    if base is None or tau is None:
        raise TypeError("error_l1 needs theta, or base and tau")
    return float(((rebuilt.float() - base.float()) - tau.float()).abs().sum())


def tau_l1(
    tau: torch.Tensor | None = None, *, theta: torch.Tensor | None = None, base: torch.Tensor | None = None
) -> float:
    """‖τ‖₁ of one tensor in float32, the denominator; from ``tau`` itself or as ‖θ − θ_base‖₁."""
    if tau is None:
        if theta is None or base is None:
            raise TypeError("tau_l1 needs tau, or theta and base")
        return float((theta.float() - base.float()).abs().sum())
    return float(tau.float().abs().sum())


def relative_error(error: float, norm: float) -> float:
    """Σ‖θ̂ − θ‖₁ / Σ‖τ‖₁ over a model's tensors; 0 for a model that did not move from its base (τ = 0)."""
    return error / norm if norm else 0.0
