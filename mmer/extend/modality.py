"""The new modality's entry into the LLM: a projector, and a model that splices projected features into the text.

The encoder (CLIP in the paper) is frozen and external: mmer takes its output features, never runs it. A
sample is token ids in which ``placeholder_id`` marks as many positions as the sample has feature vectors;
the projector maps the features to the embedding width and they overwrite those positions' embeddings in
order (the authors' ``<imgpad>`` scheme, LLaVA's too). Text-only data (a task extension) has no features, and
text-only samples mixed into the modality's (LLaVA-665k's ShareGPT conversations) have none either: a batch's
features are those of its rows with placeholders, in row order, so each goes to its own sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmer.errors import ConfigError

if TYPE_CHECKING:
    from transformers.utils import ModelOutput


class Projector(nn.Module):
    """Encoder features → LLM embeddings: ``mlp2x_gelu`` (Linear → GELU → Linear, the paper's) or ``linear``."""

    def __init__(self, kind: str, in_features: int, hidden: int) -> None:
        super().__init__()
        self.kind = kind
        self.in_features = in_features
        if kind == "mlp2x_gelu":
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        elif kind == "linear":
            self.net = nn.Sequential(nn.Linear(in_features, hidden))
        else:
            raise ValueError(f"unknown projector kind {kind!r}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.to(self.net[0].weight.dtype))


def parameter_count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


class MoExtendModel(nn.Module):
    """A transformers MoE causal LM (``lm``, possibly extended in place) plus the modality's projector.

    Calling it returns what the LM's own forward returns, a transformers ``ModelOutput`` (``.logits``, and
    ``.loss`` when ``labels`` are given), as a modality's transformers model does under the router, so code
    written for one runs on the other; ``features`` fill the ``placeholder_id`` positions.
    """

    def __init__(self, lm: nn.Module, projector: Projector | None = None, placeholder_id: int | None = None) -> None:
        super().__init__()
        if projector is not None and placeholder_id is None:
            raise ConfigError("a projector needs a placeholder token id", key="placeholder_id")
        self.lm = lm
        self.projector = projector
        self.placeholder_id = placeholder_id
        self.manifest: dict[str, Any] | None = None

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the projected features written over the placeholder positions.

        ``features`` [S, F, d] belong, in order, to the S rows of ``input_ids`` that hold placeholders (each
        exactly F); rows without placeholders (text-only samples) keep their token embeddings.
        """
        embeds = self.lm.get_input_embeddings()(input_ids)
        if features is None:
            if self.projector is not None and torch.is_grad_enabled() and self._projector_trains():
                # A batch of text-only samples still runs a projector being trained, on no rows: its parameters
                # get a (zero) gradient on every step and every process, so the loss always has a graph and
                # DDP's gradient exchange never waits for a process that skipped them (LLaVA likewise runs
                # its projector on an empty slice for a text-only sample).
                nothing = self.projector(embeds.new_zeros(0, self.projector.in_features))
                return embeds + nothing.sum().to(embeds.dtype)
            return embeds
        if self.projector is None or self.placeholder_id is None:
            raise ConfigError(
                "the batch has features but the model has no projector",
                key="features",
                hint="align a projector first (mmer extend align) or drop the features from the data",
            )
        slots = input_ids == self.placeholder_id
        per_row = slots.sum(1)
        # The features are those of the rows that have placeholders, in row order (a text-only row has none):
        # each such row must have one per feature vector, and there must be one feature row per such row.
        with_slots = int((per_row > 0).sum())
        bad = ((per_row != 0) & (per_row != features.shape[1])).nonzero()
        if bad.numel() or with_slots != features.shape[0]:
            where = (
                f"row {int(bad[0])} has {int(per_row[int(bad[0])])} placeholder tokens (id {self.placeholder_id})"
                if bad.numel()
                else f"{with_slots} rows have placeholder tokens (id {self.placeholder_id})"
            )
            raise ConfigError(
                f"{where}, but the batch has features of {features.shape[0]} samples × {features.shape[1]} vectors",
                key="features",
                hint="every sample with features needs exactly one placeholder token per feature vector; a "
                "text-only sample has none and no features (docs/moextend.md §7)",
            )
        projected = self.projector(features).to(embeds.dtype)
        return embeds.masked_scatter(slots.unsqueeze(-1), projected.reshape(-1, embeds.shape[-1]))

    def _projector_trains(self) -> bool:
        return self.projector is not None and any(p.requires_grad for p in self.projector.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """The LM's output for the spliced embeddings: ``.logits`` [batch, length, vocab], and with ``labels``
        (``-100`` where no loss is taken, e.g. the placeholders) transformers' shifted next-token ``.loss``."""
        embeds = self.embed(input_ids, features)
        return self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            labels=labels,
            use_cache=False,
            output_router_logits=False,
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, features: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """transformers' ``generate`` from the spliced embeddings (returns only the new tokens)."""
        attention_mask = kwargs.pop("attention_mask", torch.ones_like(input_ids))
        return self.lm.generate(inputs_embeds=self.embed(input_ids, features), attention_mask=attention_mask, **kwargs)
