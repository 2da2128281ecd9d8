"""The training objective (§2.6): next-token cross-entropy plus a per-layer load-balancing loss.

transformers' own aux loss pools every layer's logits into one tensor with one expert count, which fails or
is wrong once extended layers have m + n experts and the others m. Here each layer gets its own Switch term

    ℓ_j = s_j · Σ_i f_ij · P_ij,   f_ij = share of the layer's tokens that selected expert i in their top-k,
                                   P_ij = mean router probability of expert i,

over non-padding tokens, and the loss is the mean of ℓ_j over the MoE layers. With ``scale="layer"`` (mmer's
default) s_j is the layer's own expert count, so a perfectly balanced layer scores k whatever its width; with
``scale="max"`` it is the widest layer's count, as the authors' code (hard-coded 9) does. For one layer this
is exactly transformers' ``load_balancing_loss_func``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts label t + 1; ``ignore_index`` labels are skipped.

    Returns 0 (with a graph) when a batch has no target at all.
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    if not bool((shift_labels != ignore_index).any()):
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


def load_balancing_loss(
    router_logits: Mapping[int, torch.Tensor],
    top_k: int | Mapping[int, int],
    attention_mask: torch.Tensor | None = None,
    scale: str = "layer",
) -> torch.Tensor:
    """Mean over layers of the per-layer Switch term above.

    Args:
        router_logits: layer → [tokens, experts of that layer] raw router logits (widths may differ).
        top_k: k for every layer, or per layer.
        attention_mask: [batch, length] or [tokens]; 0 marks padding, which is left out of f and P.
        scale: ``layer`` (each layer's own expert count) or ``max`` (the widest layer's, the authors' code).
    """
    if not router_logits:
        raise ValueError("no router logits to balance")
    if scale not in ("layer", "max"):
        raise ValueError(f"unknown aux scale {scale!r}")
    widest = max(t.shape[-1] for t in router_logits.values())
    terms = []
    for layer, logits in sorted(router_logits.items()):
        k = top_k if isinstance(top_k, int) else top_k[layer]
        experts = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1)
        selected = torch.topk(probs, k, dim=-1).indices
        if attention_mask is None:
            weight = torch.ones(probs.shape[0], dtype=torch.float32, device=probs.device)
        else:
            weight = attention_mask.reshape(-1).to(device=probs.device, dtype=torch.float32)
        tokens = weight.sum().clamp(min=1.0)
        chosen = torch.zeros(experts, dtype=torch.float32, device=probs.device)
        chosen = chosen.scatter_add(0, selected.reshape(-1), weight.repeat_interleave(k))
        f = chosen / tokens
        p = (probs * weight.unsqueeze(-1)).sum(0) / tokens
        terms.append((experts if scale == "layer" else widest) * (f * p).sum())
    return torch.stack(terms).mean()
