"""The wrapper block: a frozen transformers MoE block plus new experts, new router rows and a calibration.

It replaces ``model.layers[l].mlp`` but holds the original block's own ``gate`` and ``experts`` modules (and
Qwen2-MoE's shared expert) under their original attribute names, so every pretrained parameter keeps its name
and its storage: the extended model's state dict is the base's plus the new tensors, and removing the wrapper
gives back the untouched base. New tensors live in separate modules because ``requires_grad`` is per tensor
(the authors' ``gate_vision`` design): the old router rows and experts can never be trained by accident.

Routing per token, in the authors' code's order (§2.4):

1. logits = [W_old·x ; W_new·x] (m + n wide; the aux loss and the routing statistics see these);
2. p = softmax(logits) in float32;
3. the top-k experts are chosen on the *uncalibrated* p;
4. p′ = calibration(p) (identity at initialisation);
5. the k weights are gathered from p′ and renormalised to sum 1 only if the base does (Mixtral always;
   Qwen2-MoE and OLMoE when ``norm_topk_prob``);
6. old-expert slots run through the original experts module (any of its transformers implementations), new
   slots through the new expert tensors, in the same SwiGLU form; Qwen2-MoE adds its gated shared expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from mmer.extend.calibration import Calibration
from mmer.extend.families import MoeFamily, block_shape


class NewRouterRows(nn.Module):
    """The n new rows of an extended layer's router (no bias, like every router it extends)."""

    def __init__(self, n_new: int, hidden: int, dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_new, hidden, dtype=dtype, device=device))


class NewExperts(nn.Module):
    """The n new experts of a layer, in the base's fused layout: gate_up_proj [n, 2F, D], down_proj [n, D, F]."""

    def __init__(
        self,
        n_new: int,
        hidden: int,
        intermediate: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(n_new, 2 * intermediate, hidden, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.zeros(n_new, hidden, intermediate, dtype=dtype, device=device))
        self.act_fn = act_fn

    def expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """New expert ``j`` on tokens ``x``: the same SwiGLU as transformers' eager experts."""
        gate, up = F.linear(x, self.gate_up_proj[j].to(x.dtype)).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[j].to(x.dtype))


def route(
    logits: torch.Tensor,
    top_k: int,
    calibration: Calibration | None,
    renormalise: bool,
    weights_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-5 above: (top-k weights, top-k expert indices) from the m + n logits of each token.

    Args:
        logits: [tokens, m + n] router logits.
        top_k: experts per token (unchanged by the extension: the active parameter count stays the same).
        calibration: the layer's calibration, applied to the full probability vector after selection.
        renormalise: divide the kept weights by their sum (the base family's rule).
        weights_dtype: cast the weights to this dtype (the logits' for Qwen2-MoE/OLMoE), or keep float32.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top_values, top_index = torch.topk(probs, top_k, dim=-1)
    if calibration is not None and calibration.form != "none":
        top_values = calibration(probs).gather(-1, top_index)
    if renormalise:
        top_values = top_values / top_values.sum(dim=-1, keepdim=True)
    if weights_dtype is not None:
        top_values = top_values.to(weights_dtype)
    return top_values, top_index


class ExtendedMoeBlock(nn.Module):
    """A frozen MoE block of ``family`` extended with ``n_new`` experts (see the module docstring).

    The original block object is kept (unregistered) so :meth:`original_block` can put it back unchanged.
    ``routing_sink``, when set, receives this layer's m + n logits on every forward (aux loss, statistics).
    """

    def __init__(
        self,
        original: nn.Module,
        family: MoeFamily,
        layer: int,
        n_new: int,
        calibration: str,
        calibration_hidden: int,
        calibration_init_std: float,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        shape = block_shape(original, layer)
        device = original.gate.weight.device
        self.layer = layer
        self.family = family
        self.num_old = shape.num_experts
        self.num_new = n_new
        self.top_k = shape.top_k
        self.renormalise = family.renormalises(original)
        self.jitter_noise = float(getattr(original, "jitter_noise", 0.0)) if family.jitter else 0.0
        # The original modules, registered under their original names: parameter names and storage unchanged.
        self.gate = original.gate
        self.experts = original.experts
        if family.shared_expert:
            self.shared_expert = original.shared_expert
            self.shared_expert_gate = original.shared_expert_gate
        object.__setattr__(self, "_original", original)
        self.new_router = NewRouterRows(n_new, shape.hidden, dtype, device)
        self.new_experts = NewExperts(n_new, shape.hidden, shape.intermediate, original.experts.act_fn, dtype, device)
        self.calibration = Calibration(
            calibration, shape.num_experts + n_new, calibration_hidden, calibration_init_std
        )
        self.calibration.to(device=device, dtype=torch.float32)
        self.calibration_form = calibration
        self.calibration_hidden = calibration_hidden
        self.routing_sink: Callable[[int, torch.Tensor], None] | None = None

    def original_block(self) -> nn.Module:
        """The transformers block this wrapper was built around (sharing its parameters)."""
        return self._original

    @property
    def num_experts(self) -> int:
        return self.num_old + self.num_new

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, m + n] logits: the frozen old rows, then the new rows.

        The old logits are computed exactly as the base router computes them (bit for bit). A copied row's
        logit equals its source's only up to the matrix kernel's rounding (even within one product, columns
        are summed in different orders), so the paper's tie between a source and its copy is broken by
        rounding, not by design.
        """
        old = F.linear(x, self.gate.weight)
        new = F.linear(x, self.new_router.weight.to(x.dtype))
        return torch.cat([old, new], dim=-1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        x = hidden_states.reshape(-1, hidden)
        logits = self.router_logits(x)
        if self.routing_sink is not None:
            self.routing_sink(self.layer, logits)
        weights_dtype = logits.dtype if self.family.weights_in_logits_dtype else None
        weights, index = route(logits, self.top_k, self.calibration, self.renormalise, weights_dtype)
        out = self._dispatch(x, weights, index)
        if self.family.shared_expert:
            shared = self.shared_expert(x)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out.reshape(batch, length, hidden)

    def _dispatch(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        old = index < self.num_old
        # Old slots go through the original experts module, whatever its backend (eager, grouped_mm...). New
        # slots are handed to it as expert 0 with weight 0, which adds exactly 0, so no backend needs to know
        # about experts it does not hold.
        out = self.experts(x, torch.where(old, index, 0), torch.where(old, weights, torch.zeros_like(weights)))
        for j in range(self.num_new):
            token, slot = torch.where(index == self.num_old + j)
            if token.numel() == 0:
                continue
            contribution = self.new_experts.expert(j, x[token]) * weights[token, slot, None]
            out = out.index_add(0, token, contribution.to(out.dtype))
        return out
