"""Which live parameter each checkpoint tensor lives in: transformers 5's fused MoE experts, read from transformers.

A decoupled checkpoint keeps θ_base, τ* and the masks per *on-disk* LLM tensor (its slots), under canonical
names of the files (``model.layers.0.block_sparse_moe.experts.3.w1.weight`` for a Mixtral saved by
``save_pretrained``). transformers 5 holds some of those tensors differently in memory: it renames them
(``block_sparse_moe.gate`` → ``mlp.gate``) and fuses each layer's experts into 3-D parameters
(``mlp.experts.gate_up_proj`` [E, 2F, D] = per expert ``cat([w1, w3])``, ``mlp.experts.down_proj`` [E, D, F]),
with the checkpoint conversion mapping of the model family (``transformers.conversion_mapping``).

The router binds every model to one set of *live* tensors named like the in-memory parameters of the base
causal LM, and rebuilds each slot straight into its part of them: a slot is a view of its live parameter
(``gate_up_proj[e, :F]`` for expert e's w1, ``[e, F:]`` for its w3, ``down_proj[e]`` for its w2), so a switch
writes θ_base + mᵢ∘τ* of every expert in place, with no extra copy and nothing derived by subtracting.
τ* and the masks stay per on-disk tensor, as the merge wrote them.

The parts come from transformers' own mapping, interpreted here for what MoE families use: renamings, and
converters made of ``MergeModulelist`` (stack the experts, in transformers' natural key order) optionally
followed by ``Concatenate`` (in the converter's source-pattern order). Any other conversion op is refused
with the tensor named. Without transformers' conversion machinery (transformers 4) nothing is renamed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from mmer.checkpoint.decoupled import DecoupledCheckpoint
from mmer.errors import ConfigError, LayoutError
from mmer.route.models import causal_lm_class, empty_model, llm_layout, load_config
from mmer.route.weights import base_config_dir

Index = tuple[tuple[str, int, int, int], ...]  # ("narrow", dim, start, length) or ("select", dim, index, 0)


@dataclass(frozen=True)
class Part:
    """Where one checkpoint tensor (``slot``) lives: ``param``, or a slice of it (``index``)."""

    slot: str
    param: str
    index: Index = ()

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The slot's view of ``tensor`` (the live ``param``): writes into it land in the parameter."""
        for op, dim, a, b in self.index:
            tensor = tensor.narrow(dim, a, b) if op == "narrow" else tensor.select(dim, a)
        return tensor


@dataclass
class LiveLayout:
    """Every slot's :class:`Part`; ``shapes`` gives the shape of each parameter assembled from several slots."""

    parts: dict[str, Part]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._slots: dict[str, list[str]] = {}
        for slot, part in self.parts.items():
            self._slots.setdefault(part.param, []).append(slot)

    @property
    def params(self) -> dict[str, list[str]]:
        """Live parameter name → the slots it holds (one for a plain or renamed tensor)."""
        return self._slots

    @property
    def renamed(self) -> bool:
        """Whether any slot lives under another name or in a slice (the checkpoint is not stored as in memory)."""
        return any(p.param != s or p.index for s, p in self.parts.items())

    def param_of(self, slot: str) -> str:
        return self.parts[slot].param

    def whole_slot(self, param: str) -> str | None:
        """The slot a parameter is entirely made of (``None`` when several slots are fused into it)."""
        slots = self._slots.get(param, [])
        return slots[0] if len(slots) == 1 and not self.parts[slots[0]].index else None

    def assemble(self, param: str, like: torch.Tensor, part_of: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """A new tensor of ``param`` (dtype and device of ``like``) filled with ``part_of(slot)`` for each slot."""
        out = torch.empty(self.shapes[param], dtype=like.dtype, device=like.device)
        for slot in self._slots[param]:
            self.parts[slot].view(out).copy_(part_of(slot))
        return out


def identity(slots: Iterable[str]) -> LiveLayout:
    """Every slot is a live parameter of its own name (checkpoints stored as transformers holds them)."""
    return LiveLayout({s: Part(s, s) for s in slots})


def _conversion_mapping(model_type: str | None, class_name: str) -> bool:
    """Whether transformers registers a checkpoint conversion for this family (transformers ≥ 5 only)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return False
    return any(get_checkpoint_conversion_mapping(key) for key in (class_name, model_type) if key)


def live_layout(ckpt: DecoupledCheckpoint, shapes: Mapping[str, tuple[int, ...]]) -> LiveLayout:
    """The layout of the live parameters for the checkpoint's slots (``shapes``: slot → shape), from the base LM.

    Slots named as the base causal LM holds them in memory stay as they are; the others go through
    transformers' conversion mapping for the base's family. Only built from a model (on meta, nothing
    allocated) when transformers registers a conversion for that family, so dense families cost nothing.
    """
    directory = base_config_dir(ckpt)
    try:
        config = load_config(directory)
        cls = causal_lm_class(config, directory)
    except ConfigError:  # no causal LM to read a mapping from: the names are bound as they are, and checked then
        return identity(shapes)
    if not _conversion_mapping(getattr(config, "model_type", None), cls.__name__):
        return identity(shapes)
    from transformers.conversion_mapping import get_model_conversion_mapping

    lm = empty_model(cls, config)
    layout = llm_layout(lm)
    params = {layout.to_canonical(n) or n: tuple(p.shape) for n, p in lm.named_parameters(remove_duplicate=False)}
    mapping = get_model_conversion_mapping(lm)
    return layout_from_mapping(shapes, params, mapping, str(ckpt.path))


def _natural(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def layout_from_mapping(
    shapes: Mapping[str, tuple[int, ...]], params: Mapping[str, tuple[int, ...]], mapping: list, source: str
) -> LiveLayout:
    """Interpret transformers' ``mapping`` (renamings, MergeModulelist/Concatenate converters) for ``shapes``.

    ``params`` are the in-memory parameters (canonical name → shape); every assembled parameter must get
    exactly their shape, so a mapping read wrongly is refused rather than bound.
    """
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    parts: dict[str, Part] = {}
    groups: dict[str, dict[str, list[str]]] = {}  # fused param → source pattern → slots
    owners: dict[str, object] = {}
    for slot in sorted(shapes, key=_natural):
        if slot in params:
            parts[slot] = Part(slot, slot)
            continue
        target, pattern = rename_source_key(slot, renamings, converters)
        if pattern is None:
            parts[slot] = Part(slot, target if target in params else slot)  # unknown names fail when bound
            continue
        groups.setdefault(target, {}).setdefault(pattern, []).append(slot)
        owners[target] = next(c for c in converters if pattern in c.source_patterns)
    fused_shapes: dict[str, tuple[int, ...]] = {}
    for target, by_pattern in groups.items():
        converter = owners[target]
        ops = list(converter.operations)  # type: ignore[attr-defined]
        kinds = [type(op) for op in ops]
        if kinds not in ([MergeModulelist], [MergeModulelist, Concatenate]):
            slot = next(iter(by_pattern.values()))[0]
            raise LayoutError(
                f"{source}: transformers converts {slot} into {target} with "
                f"{', '.join(k.__name__ for k in kinds)}, which the router cannot map to a slice",
                file=source,
                tensor=slot,
                hint="the router follows expert stacking (MergeModulelist) and concatenation only; rebuild the "
                "modality with `mmer reconstruct` and load it with from_pretrained, or please report the family",
            )
        patterns = [p for p in converter.source_patterns if p in by_pattern]  # type: ignore[attr-defined]
        first = by_pattern[patterns[0]][0]
        if len(patterns) > 1 and len(ops) == 1:
            raise LayoutError(f"{source}: {target} gets several tensors per expert", file=source, tensor=first)
        rank = len(shapes[first]) + 1
        stack = ops[0].dim % rank
        cat = ops[1].dim % rank if len(ops) > 1 else None
        offset = 0
        stacked: list[int] = []
        for pattern in patterns:
            slots = sorted(by_pattern[pattern], key=_natural)
            shape = tuple(shapes[slots[0]])
            odd = next((s for s in slots if tuple(shapes[s]) != shape), None)
            if odd is not None:
                raise LayoutError(
                    f"{source}: {odd} is {tuple(shapes[odd])} but {slots[0]} is {shape}; transformers stacks them "
                    f"into {target}",
                    file=source,
                    tensor=odd,
                )
            stacked = [*shape[:stack], len(slots), *shape[stack:]]
            length = stacked[cat] if cat is not None else 0
            for i, slot in enumerate(slots):
                narrow = (("narrow", cat, offset, length),) if cat is not None else ()
                parts[slot] = Part(slot, target, (*narrow, ("select", stack, i, 0)))
            offset += length
        if cat is not None:
            stacked[cat] = offset
        fused_shapes[target] = tuple(stacked)
        expected = params.get(target)
        if expected != fused_shapes[target]:
            raise LayoutError(
                f"{source}: {len(sum(by_pattern.values(), []))} tensors ({first}, …) assemble into "
                f"{target} {fused_shapes[target]}, but the base model holds "
                + ("no such parameter" if expected is None else f"it as {expected}"),
                file=source,
                tensor=first,
                hint="the checkpoint's expert tensors do not match its config",
            )
        if math.prod(fused_shapes[target]) != sum(math.prod(shapes[s]) for p in patterns for s in by_pattern[p]):
            raise LayoutError(f"{source}: {target} is not covered exactly by its expert tensors", tensor=first)
    return LiveLayout(parts, fused_shapes)
