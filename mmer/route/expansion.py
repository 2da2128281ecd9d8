"""Expansion mode (MMER Eq. 4-7; docs/method.md §4): one forward pass over a sequence that mixes modalities.

Every token is tagged with a weight group: 0 for text, i for the router's i-th modality. Inside each decoder
layer of the LLM, every ``Linear`` applies θ_base + mᵢ∘τ* to the tokens of modality i and θ_base + m̄∘τ* (m̄ the
mean of the masks, fractional) to text tokens (Eq. 4 and 7); attention runs over the whole sequence (Eq. 5).
Generated tokens are text: routing is on for the prompt only, and decoding continues on the text weights with
the prompt's KV cache (which keeps the per-modality keys and values), as DAMC does.

Choices the paper leaves open, each with its option:

- **Norms.** The paper routes the attention projections (Eq. 4) and draws the whole block, FFN included, in
  Fig. 3; it says nothing of the RMSNorm weights inside a block. They act on each token alone, so they are
  routed like the Linears (``route_norms=True``); ``False`` gives every token the text norms.
- **Outside the blocks.** Embedding lookup and ``lm_head`` only act on text (modality tokens come from their
  encoders; every predicted token is text), so they and the final norm use the text weights.
- **m̄** averages the masks of the modalities the router was opened with.
- **Mixture-of-Experts blocks.** The fused expert parameters and the top-k router are not per-token Linear
  modules, so every token runs them on the text weights; a shared expert (Qwen2-MoE) is Linears and is
  routed, its input flattened to [batch·seq, hidden] by the block (rows keep their token's group).
- **Extension packs** the router serves (:mod:`mmer.route.packs`) are not weight groups: a pack adds experts
  and router rows to its layers, which neither paper mixes per token with masked weights. Naming one is
  refused; route whole prompts to it.
- **Per-modality weights cached or rebuilt.** The text weights are the router's live weights (switched to
  the ``MEAN`` state), so expansion mode adds no copy of the LLM by itself. ``cache_modality_weights=True``
  materialises every modality's weights for every routed module once: the fastest prompt pass, but n extra
  copies of the routed (decoder-layer) weights, e.g. 2 × 12.9 GB for a bf16 7B LLM and two modalities.
  ``False`` rebuilds a modality's weights inside each routed module while the prompt passes through it
  (unpack the bits, θ_base + mᵢ∘τ*) and frees them right after: no extra copy beyond one module's weights at
  a time, at the cost of one rebuild per module per modality per prompt. Decoding never rebuilds: generated
  tokens run on the text weights. ``bench/router_bench.py`` measures both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call

from mmer.route.models import (
    RoutingInputError,
    attach_generation_config,
    bind_model,
    causal_lm_class,
    empty_model,
    llm_layout,
    load_config,
)
from mmer.route.weights import MEAN, base_config_dir

if TYPE_CHECKING:
    from mmer.route.router import Router

TEXT = 0
EMBED = "model.embed_tokens.weight"


@dataclass
class MixedInput:
    """A mixed-modality prompt: embeddings, each token's weight group (0 = text), and the attention mask."""

    inputs_embeds: torch.Tensor  # [batch, seq, hidden]
    token_modality: torch.Tensor  # [batch, seq], long
    attention_mask: torch.Tensor  # [batch, seq], long


class RoutingState:
    """Which token positions belong to which weight group, for the forward pass in flight.

    Positions are flattened over [batch, seq]. Each group keeps its positions as runs of consecutive positions
    (a mixed prompt is a few blocks: text, image, text, audio...), so a routed module gathers a group's rows
    with slices (no copy at all for a group that is one block) rather than an index gather.
    """

    def __init__(self) -> None:
        self.groups: list[tuple[int, list[tuple[int, int]]]] | None = None  # None: every token is text
        self.shape: tuple[int, ...] = ()  # [batch, seq] of the pass in flight

    def set(self, token_modality: torch.Tensor | None) -> None:
        if token_modality is None:
            self.groups = None
            return
        flat = token_modality.reshape(-1).tolist()
        self.shape = tuple(token_modality.shape)
        runs: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for i in range(1, len(flat) + 1):
            if i == len(flat) or flat[i] != flat[start]:
                runs.setdefault(int(flat[start]), []).append((start, i))
                start = i
        if list(runs) == [TEXT]:
            self.groups = None
        else:
            self.groups = sorted(runs.items())


class RoutedModule(torch.nn.Module):
    """Wraps one per-token module (a Linear, a norm): each token group runs it with its own weights.

    The wrapped module's own parameters are the text weights; group ``g > 0`` gets modality ``g``'s, from a
    cache or rebuilt on the spot. Rows are gathered per group, so each group is one matrix product.
    """

    def __init__(
        self, inner: torch.nn.Module, names: dict[str, str], state: RoutingState, owner: ExpansionModel
    ) -> None:
        super().__init__()
        self.inner = inner
        self.names = names  # parameter leaf → canonical LLM name
        self.state = state
        self.owner = owner
        self.cached: dict[int, dict[str, torch.Tensor]] = {}

    def params_for(self, group: int) -> dict[str, torch.Tensor]:
        """The weights group ``group`` runs with: cached, or rebuilt now (rebuild mode)."""
        if group in self.cached:
            return self.cached[group]
        return self.owner.group_params(group, self.names)

    def _run(self, group: int, x: torch.Tensor) -> torch.Tensor:
        if group == TEXT:
            return self.inner(x)
        params = {k: v.to(x.device) for k, v in self.params_for(group).items()}  # a no-op unless CPU-offloaded
        return functional_call(self.inner, params, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.state.groups
        if groups is None:
            return self.inner(x)
        lead = self.state.shape
        tokens = lead[0] * lead[1]
        if tuple(x.shape[:2]) == lead:  # [batch, seq, ...]: hidden states, or per-head ([..., heads, head_dim])
            flat = x.reshape(-1, *x.shape[2:])
        elif x.dim() >= 2 and x.shape[0] == tokens:  # flattened in token order (an MoE block's shared expert)
            flat, lead = x, (tokens,)
        else:
            raise RuntimeError(f"routed module got input {tuple(x.shape)}, expected it to start with {lead}")
        if len(groups) == 1:
            return self._run(groups[0][0], x)
        out: torch.Tensor | None = None
        for group, runs in groups:
            rows = [flat[a:b] for a, b in runs]
            y = self._run(group, rows[0] if len(rows) == 1 else torch.cat(rows))  # one product per group
            if out is None:
                out = y.new_empty((flat.shape[0], *y.shape[1:]))
            offset = 0
            for a, b in runs:
                out[a:b] = y[offset : offset + b - a]
                offset += b - a
        assert out is not None
        return out.reshape(*lead, *out.shape[1:])


def _routable(module_name: str, module: torch.nn.Module, route_norms: bool) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    leaf = module_name.rsplit(".", 1)[-1].lower()
    return route_norms and "norm" in leaf


class ExpansionModel:
    """The base LLM's causal-LM class on text weights, with every per-token module of its blocks routed.

    Build it with ``router.expansion()``; shares θ_base, τ* and the masks with the router.
    """

    def __init__(self, router: Router, *, cache_modality_weights: bool = True, route_norms: bool = True) -> None:
        self.router = router
        self.weights = router.weights
        self.groups = ("text", *router.modalities)
        self.cache_modality_weights = cache_modality_weights
        self.state = RoutingState()
        device = self.weights.device
        base_dir = base_config_dir(router.ckpt)
        config = load_config(base_dir)
        self.lm = empty_model(causal_lm_class(config, base_dir), config)
        layout = llm_layout(self.lm)
        # The text weights θ_base + m̄∘τ* are the router's live weights in its MEAN state (its first rows):
        # expansion mode adds no copy of the LLM, and switches the router to MEAN before each pass.
        text = router.views(MEAN)
        bind_model(self.lm, layout, text.get, None, device, str(base_dir))
        attach_generation_config(self.lm, base_dir)
        self.vocab_size = self.weights.rows[MEAN][EMBED][0]
        self.routed: dict[str, RoutedModule] = {}
        self.unrouted: list[str] = []
        for module_name, module in list(self.lm.named_modules()):
            params = dict(module.named_parameters(recurse=False))
            canonical = {leaf: layout.to_canonical(f"{module_name}.{leaf}") for leaf in params}
            if not params or not all(c is not None and c.startswith("model.layers.") for c in canonical.values()):
                continue
            if not _routable(module_name, module, route_norms):
                self.unrouted.append(module_name)
                continue
            parent_name, _, leaf = module_name.rpartition(".")
            wrapped = RoutedModule(module, canonical, self.state, self)  # type: ignore[arg-type]
            setattr(self.lm.get_submodule(parent_name), leaf, wrapped)
            self.routed[module_name] = wrapped
        router.dispatch(self.lm, layout)  # under the router's device map, if it has one
        if cache_modality_weights:
            with torch.no_grad():
                for wrapped in self.routed.values():
                    for group in range(1, len(self.groups)):
                        wrapped.cached[group] = self.group_params(group, wrapped.names)

    # --------------------------------------------------------------------------------------------- weights
    def group_params(self, group: int, names: dict[str, str]) -> dict[str, torch.Tensor]:
        """θ_base + mᵢ∘τ* of one module's parameters for modality group ``group`` (rebuilt now)."""
        modality = self.groups[group]
        return {leaf: self.router.shared_param(modality, canonical) for leaf, canonical in names.items()}

    def nbytes(self) -> dict[str, int]:
        """Bytes this model adds to the router's: the cached per-modality weights (text weights are shared).

        A cached tensor that is θ_base itself (not merged) is the router's, and not counted.
        """
        shared = {t.untyped_storage().data_ptr() for t in self.weights.base.values()}
        seen: set[int] = set()
        total = 0
        for wrapped in self.routed.values():
            for per in wrapped.cached.values():
                for t in per.values():
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in shared and ptr not in seen:
                        seen.add(ptr)
                        total += t.nbytes
        return {"modality_cache": total}

    def use_text_weights(self) -> None:
        """Put the router's live weights in the text state θ_base + m̄∘τ* (a no-op when they are already)."""
        self.router.switch(MEAN)

    # ---------------------------------------------------------------------------------------------- inputs
    def group_of(self, modality: str) -> int:
        """The weight-group number of ``modality`` (its position in ``groups``; 0 is text)."""
        if modality in self.router.packs:
            raise RoutingInputError(
                f"{modality!r} is a MoExtend extension pack: expansion mode mixes the MMER modalities "
                f"({', '.join(self.groups[1:])}) per token, and a pack's extra experts have no per-token mixing "
                "with their masked weights",
                key=modality,
                hint=f"run the whole prompt on the pack: router(input_ids, attention_mask, features, "
                f"modality={modality!r})",
            )
        if modality not in self.groups[1:]:
            raise RoutingInputError(
                f"no modality {modality!r} in this router (has {', '.join(self.groups[1:])})", key=modality
            )
        return self.groups.index(modality)

    @torch.no_grad()
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings (θ_base + m̄∘τ* rows); ids must be in the base's vocabulary."""
        input_ids = input_ids.to(self.weights.device)
        if input_ids.numel() and int(input_ids.max()) >= self.vocab_size:
            raise RoutingInputError(
                f"text token id {int(input_ids.max())} is outside the base vocabulary ({self.vocab_size} tokens)",
                key="input_ids",
                hint="ids a modality added (placeholders, special tokens) go in that modality's part",
            )
        self.use_text_weights()
        return self.lm.get_input_embeddings()(input_ids)

    @torch.no_grad()
    def embed_modality(self, modality: str, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One modality's part: its model's inputs (``input_ids`` with expanded placeholders, pixels/features).

        Runs the modality's model up to the entry of its LLM and keeps the embeddings it would feed it at the
        placeholder positions (encoder + projector output); ids the modality added to the vocabulary take its
        private rows; every other token is text. Returns the embeddings and each token's group.
        """
        group = self.group_of(modality)
        built = self.router.models[modality]
        device = self.weights.device
        input_ids = inputs["input_ids"].to(device)
        placeholder = torch.isin(input_ids, torch.tensor(sorted(built.placeholders), device=device))
        if not bool(placeholder.any()):
            raise RoutingInputError(
                f"{modality}: input_ids hold none of its placeholder ids {sorted(built.placeholders)}",
                key="input_ids",
                hint="put the processor's placeholder tokens where the features go",
            )
        captured = _capture_llm_input(built.model, built.decoder, {k: _to(v, device) for k, v in inputs.items()})
        if captured.shape[:2] != input_ids.shape:
            raise RoutingInputError(
                f"{modality}: the model turned {tuple(input_ids.shape)} input ids into {tuple(captured.shape[:2])} "
                "embeddings",
                key="input_ids",
                hint="repeat each placeholder once per feature in input_ids, as the model's processor does",
            )
        added = (input_ids >= self.vocab_size) & ~placeholder
        embeds = self.embed_text(torch.where(added | placeholder, 0, input_ids))
        embeds = torch.where(placeholder.unsqueeze(-1), captured.to(embeds.dtype), embeds)
        if bool(added.any()):
            embeds[added] = self._private_rows(modality, input_ids[added]).to(embeds.dtype)
        groups = torch.where(placeholder | added, group, TEXT).long()
        return embeds, groups

    def _private_rows(self, modality: str, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weights.private[modality].get(EMBED)
        if rows is None or int(ids.max()) >= rows.row_start + rows.tensor.shape[0]:
            raise RoutingInputError(
                f"{modality}: token id {int(ids.max())} is in neither the base's nor the modality's vocabulary",
                key="input_ids",
            )
        return rows.tensor[ids - rows.row_start]

    def embed(self, parts: Sequence[torch.Tensor | tuple[str, dict[str, Any]]]) -> MixedInput:
        """Build a mixed prompt from parts in order: text ids ``[batch, n]``, or ``(modality, model inputs)``."""
        embeds, groups = [], []
        for part in parts:
            if isinstance(part, torch.Tensor):
                embeds.append(self.embed_text(part))
                groups.append(torch.full(part.shape, TEXT, dtype=torch.long, device=self.weights.device))
            else:
                e, g = self.embed_modality(*part)
                embeds.append(e)
                groups.append(g)
        if not embeds:
            raise RoutingInputError("an empty prompt", key="parts", hint="give at least one part")
        token_modality = torch.cat(groups, dim=1)
        return MixedInput(torch.cat(embeds, dim=1), token_modality, torch.ones_like(token_modality))

    # --------------------------------------------------------------------------------------------- running
    @contextmanager
    def routing(self, token_modality: torch.Tensor | None) -> Iterator[None]:
        """Route the forward passes inside the block by ``token_modality`` (``None``: all text)."""
        self.state.set(None if token_modality is None else token_modality.to(self.weights.device))
        try:
            yield
        finally:
            self.state.set(None)

    def __call__(self, mixed: MixedInput | None = None, *, token_modality: torch.Tensor | None = None, **kw: Any):
        """One forward pass of the LLM (``CausalLMOutputWithPast``); routed where ``token_modality`` says."""
        if mixed is not None:
            kw.setdefault("inputs_embeds", mixed.inputs_embeds)
            kw.setdefault("attention_mask", mixed.attention_mask)
            token_modality = mixed.token_modality if token_modality is None else token_modality
        tokens = kw.get("inputs_embeds", kw.get("input_ids"))
        if token_modality is not None and (tokens is None or tuple(token_modality.shape) != tuple(tokens.shape[:2])):
            raise RoutingInputError(
                f"token_modality has shape {tuple(token_modality.shape)} but the input has "
                f"{None if tokens is None else tuple(tokens.shape[:2])} tokens",
                key="token_modality",
            )
        self.use_text_weights()
        with torch.no_grad(), self.routing(token_modality):
            return self.lm(**kw)

    def generate(self, mixed: MixedInput, **kwargs: Any) -> torch.Tensor:
        """Generate text after a mixed prompt: routed prefill, then text weights with the KV cache."""
        prompt_shape = tuple(mixed.token_modality.shape)

        def before(module: torch.nn.Module, args: tuple, kw: dict[str, Any]) -> None:
            embeds = kw.get("inputs_embeds")
            is_prompt = embeds is not None and tuple(embeds.shape[:2]) == prompt_shape
            self.state.set(mixed.token_modality.to(self.weights.device) if is_prompt else None)

        def after(module: torch.nn.Module, args: tuple, output: Any) -> None:
            self.state.set(None)

        handles = [
            self.lm.register_forward_pre_hook(before, with_kwargs=True),
            self.lm.register_forward_hook(after),
        ]
        self.use_text_weights()
        try:
            with torch.no_grad():
                return self.lm.generate(
                    inputs_embeds=mixed.inputs_embeds, attention_mask=mixed.attention_mask, **kwargs
                )
        finally:
            for handle in handles:
                handle.remove()
            self.state.set(None)


class _Captured(Exception):
    """Raised inside a modality model's forward once the LLM's input embeddings are known."""


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _capture_llm_input(model: torch.nn.Module, decoder: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The ``inputs_embeds`` ``model(**inputs)`` hands its LLM decoder; the LLM itself is never run."""
    box: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            box["embeds"] = embeds
        raise _Captured

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "embeds" not in box:
        raise RoutingInputError(
            f"{type(model).__name__} does not hand its LLM input embeddings; expansion mode cannot encode it",
            hint="this model family is not supported by expansion mode yet",
        )
    return box["embeds"]
