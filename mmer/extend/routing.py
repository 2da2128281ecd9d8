"""Router logits of every MoE layer during a forward pass, and how often each expert is selected (§6.1.1).

transformers records router logits only for its own router classes and only when asked; the wrapper block
computes its wider logits itself. So mmer collects them itself: a forward hook on each untouched layer's
router (its first output is the logits, checked once per router), and the extended blocks report theirs
through their ``routing_sink``. The same tap feeds the load-balancing loss (with gradients) and the routing
statistics of the Extender (without).

Selection counts use the **top**-k experts per token. The authors' ``expert_distribution.py`` sorted
ascending and kept the first two, i.e. counted the two *least* likely experts (their bug 1); the paper's text
says selected experts, and so does mmer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmer.extend.block import ExtendedMoeBlock
from mmer.extend.families import check_router_returns_logits, decoder_layers, family_of, is_moe_block


class RoutingTap:
    """Context manager: ``tap.logits[layer]`` holds each MoE layer's [tokens, experts] logits of the last forward.

    Args:
        model: the transformers causal LM (extended or not).
        detach: store detached logits (statistics) instead of keeping the graph (aux loss).
    """

    def __init__(self, model: nn.Module, detach: bool = False) -> None:
        self.model = model
        self.detach = detach
        self.logits: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._blocks: list[ExtendedMoeBlock] = []

    def _record(self, layer: int, logits: torch.Tensor) -> None:
        self.logits[layer] = logits.detach() if self.detach else logits

    def __enter__(self) -> RoutingTap:
        family = family_of(self.model)
        for index, layer in enumerate(decoder_layers(self.model)):
            block = layer.mlp
            if isinstance(block, ExtendedMoeBlock):
                block.routing_sink = self._record
                self._blocks.append(block)
            elif is_moe_block(block, family):
                check_router_returns_logits(block.gate, index)
                self._handles.append(block.gate.register_forward_hook(self._hook(index)))
        return self

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._record(layer, output[0])

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for block in self._blocks:
            block.routing_sink = None
        self._handles.clear()
        self._blocks.clear()

    def clear(self) -> None:
        self.logits = {}


def count_top_k(logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """How many times each expert is among a token's top-k by router probability (float64 [experts]).

    Args:
        logits: [tokens, experts] router logits.
        top_k: experts selected per token.
        mask: [tokens] bool or 0/1; tokens where it is false (padding) are not counted.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    selected = torch.topk(probs, top_k, dim=-1).indices  # top-k, largest first: never bottom-k
    if mask is not None:
        selected = selected[mask.reshape(-1).bool()]
    return torch.bincount(selected.reshape(-1).cpu(), minlength=logits.shape[-1]).to(torch.float64)


@dataclass
class RoutingCounts:
    """Per MoE layer, how often each expert was selected; ``tokens`` counted tokens (each gives k selections)."""

    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    def add(self, logits: Mapping[int, torch.Tensor], top_k: Mapping[int, int], mask: torch.Tensor | None) -> None:
        for layer, layer_logits in logits.items():
            counted = count_top_k(layer_logits, top_k[layer], mask)
            self.counts[layer] = self.counts[layer] + counted if layer in self.counts else counted
        self.tokens += int(mask.sum()) if mask is not None else next(iter(logits.values())).shape[0]

    def distribution(self) -> dict[int, torch.Tensor]:
        """Each layer's counts normalised to sum 1 (every layer sees the same token × k selections)."""
        return {layer: c / c.sum().clamp(min=1.0) for layer, c in sorted(self.counts.items())}

    def most_used(self, layer: int, n: int = 1) -> list[int]:
        """The ``n`` most-selected experts of ``layer``, ties to the lower index."""
        counts = self.counts[layer].tolist()
        return sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:n]

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "counts": {str(k): v.tolist() for k, v in sorted(self.counts.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutingCounts:
        counts = {int(k): torch.tensor(v, dtype=torch.float64) for k, v in data["counts"].items()}
        return cls(counts, int(data["tokens"]))


def layer_top_k(model: nn.Module) -> dict[int, int]:
    """k of every MoE layer of a causal LM (extended or not)."""
    family = family_of(model)
    return {
        i: int(layer.mlp.top_k if isinstance(layer.mlp, ExtendedMoeBlock) else layer.mlp.gate.top_k)
        for i, layer in enumerate(decoder_layers(model))
        if is_moe_block(layer.mlp, family)
    }


def routing_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Which tokens the statistics count: ``routing_mask`` if the data gives one, else ``attention_mask``."""
    mask = batch.get("routing_mask")
    if mask is None:
        mask = batch.get("attention_mask")
    return None if mask is None else mask.reshape(-1).bool()


@torch.no_grad()
def collect_routing_counts(runner: Any, batches: Iterable[Mapping[str, torch.Tensor]]) -> RoutingCounts:
    """Run ``batches`` through ``runner`` (a :class:`~mmer.extend.modality.MoExtendModel`) and count selections."""
    lm = runner.lm
    top_k = layer_top_k(lm)
    counts = RoutingCounts()
    was_training = runner.training
    runner.eval()
    try:
        with RoutingTap(lm, detach=True) as tap:
            for batch in batches:
                tap.clear()
                runner(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "features")})
                counts.add(tap.logits, top_k, routing_mask(batch))
    finally:
        runner.train(was_training)
    return counts
