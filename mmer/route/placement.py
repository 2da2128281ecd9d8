"""Spread a router's LLM over several devices with accelerate, each weight rebuilt on the device it lives on.

``Router.from_pretrained(path, device_map="auto")`` is for a base LLM larger than one GPU. The map is
accelerate's (and transformers'): module name → device, over the *base causal LM's* module names
(``model.embed_tokens``, ``model.layers.0``, ``lm_head``...), given explicitly or computed by
``infer_auto_device_map`` for ``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential``. Every LLM tensor
the router holds for a weight (its live copy, θ_base, τ* and each modality's packed mask, private rows) is put
on that weight's device, so a switch rebuilds each weight where it lives: no big tensor crosses devices.
Each modality's model (and each pack's, and expansion mode's) is then hooked with ``dispatch_model`` under the
same map translated to its own layout; components (encoders, projectors) go on the main device, the first
non-CPU device of the map (where the inputs enter).

Values mean what they mean to accelerate: a GPU holds and runs its modules; ``"cpu"`` holds them in host
memory, where switches rebuild them, and with a GPU in the map they run on the main device (CPU offload,
streamed per forward from the same host tensors the switch rewrote). ``"disk"`` is refused: accelerate
writes disk-offloaded weights to files once and reads those back, so a switch could not reach them and every
modality would silently run the weights of the moment of dispatch. ``"meta"`` holds nothing and is refused.

For the computed maps, ``max_memory`` is the budget for everything the router keeps per weight (live copy,
θ_base unless ``base_device`` moves it, τ*, masks): accelerate sizes the modules from the live copy alone, so
the budgets are divided by that ratio before it places them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmer.checkpoint.decoupled import DecoupledCheckpoint, slot_dtype
from mmer.errors import ConfigError
from mmer.io.layouts import Layout
from mmer.route.models import causal_lm_class, check_device, empty_model, load_config
from mmer.route.weights import base_config_dir

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
REFUSED = ("disk", "meta")


def as_device(value: Any) -> torch.device:
    """accelerate's device spelling (``0``, ``"cuda:1"``, ``"cpu"``) as a torch device."""
    return (
        torch.device("cuda", value) if isinstance(value, int) and not isinstance(value, bool) else torch.device(value)
    )


def check_values(device_map: Mapping[str, Any], source: str) -> None:
    """Refuse disk and meta placement (see the module docstring) and devices this torch does not have."""
    for module, value in device_map.items():
        if str(value) in REFUSED:
            raise ConfigError(
                f"{source}: device_map puts {module or 'the model'} on {value!r}; the router rewrites its weights "
                f"in place on every switch, which {value} offload cannot follow (the modules would keep the "
                "weights they had when dispatched)",
                key="device_map",
                hint="give max_memory enough room on the GPUs and 'cpu' (host RAM) for the whole LLM; "
                "base_device='cpu' moves θ_base off the GPUs",
            )
        try:
            device = as_device(value)
        except (RuntimeError, TypeError):
            raise ConfigError(
                f"{source}: device_map value {value!r} for {module!r} is not a device",
                key="device_map",
                hint="use a GPU index (0), 'cuda:1' or 'cpu'",
            ) from None
        check_device(device)


def main_device(device_map: Mapping[str, Any]) -> torch.device:
    """Where inputs and components go: the first non-CPU device of the map, as accelerate chooses it."""
    devices = [as_device(v) for v in device_map.values()]
    return next((d for d in devices if d.type != "cpu"), torch.device("cpu"))


def infer_map(
    lm: torch.nn.Module,
    strategy: str,
    max_memory: Mapping[Any, Any] | None,
    dtype: torch.dtype,
    footprint: float,
) -> dict[str, Any]:
    """accelerate's placement of the base causal LM ``lm`` (meta tensors), budgets divided by ``footprint``."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    budget = get_max_memory(dict(max_memory) if max_memory is not None else None)
    budget = {k: int(v / footprint) for k, v in budget.items()}
    no_split = list(getattr(lm, "_no_split_modules", None) or [])
    if strategy != "sequential":
        budget = get_balanced_memory(
            lm, budget, no_split_module_classes=no_split, dtype=dtype, low_zero=strategy == "balanced_low_0"
        )
    return dict(infer_auto_device_map(lm, max_memory=budget, no_split_module_classes=no_split, dtype=dtype))


def footprint(ckpt: DecoupledCheckpoint, modalities: Sequence[str], base_moved: bool) -> float:
    """Bytes the router holds per byte of live weights: live + θ_base (unless moved) + τ* (base dtype) + masks."""
    live = merged = elements = 0
    for slot in ckpt.slots:
        numel = math.prod(slot.shape)
        size = numel * slot_dtype(slot).itemsize
        live += size
        elements += numel
        merged += size if slot.merged and not ckpt.is_single_model else 0
    masks = 0 if ckpt.is_single_model else len(modalities) * elements / 8
    return (live * (1 if base_moved else 2) + merged + masks) / max(live, 1)


def place_llm(
    ckpt: DecoupledCheckpoint,
    modalities: Sequence[str],
    device_map: str | Mapping[str, Any],
    max_memory: Mapping[Any, Any] | None,
    base_device: Any,
) -> dict[str, Any]:
    """The map to use, over the base causal LM's module names: the caller's, or accelerate's for a strategy."""
    source = str(ckpt.path)
    if isinstance(device_map, str):
        if device_map not in AUTO_MAPS:
            raise ConfigError(
                f"{source}: device_map {device_map!r} is not one of {', '.join(AUTO_MAPS)} or a dict",
                key="device_map",
            )
        directory = base_config_dir(ckpt)
        config = load_config(directory)
        lm = empty_model(causal_lm_class(config, directory), config)
        dtype = slot_dtype(max(ckpt.slots, key=lambda s: math.prod(s.shape)))
        placed = infer_map(lm, device_map, max_memory, dtype, footprint(ckpt, modalities, base_device is not None))
    else:
        if max_memory is not None:
            raise ConfigError(
                f"{source}: max_memory given with an explicit device_map",
                key="max_memory",
                hint="max_memory sizes the computed maps (device_map='auto'...); an explicit map places as it says",
            )
        placed = dict(device_map)
    if not placed:
        raise ConfigError(f"{source}: device_map is empty", key="device_map", hint="use device_map='auto'")
    check_values(placed, source)
    return placed


def slot_devices(slots: list[str], device_map: Mapping[str, Any], source: str) -> dict[str, torch.device]:
    """The device of each canonical LLM tensor: the map's longest module prefix that contains it."""
    keys = sorted(device_map, key=len, reverse=True)
    out = {}
    for slot in slots:
        key = next((k for k in keys if k == "" or slot == k or slot.startswith(k + ".")), None)
        if key is None:
            raise ConfigError(
                f"{source}: device_map gives no device for {slot} (keys: {', '.join(list(device_map)[:6])}…)",
                key="device_map",
                tensor=slot,
                hint="name the base causal LM's modules (model.embed_tokens, model.layers.N, model.norm, lm_head), "
                "or use device_map='auto'",
            )
        out[slot] = as_device(device_map[key])
    return out


def model_map(
    model: torch.nn.Module, layout: Layout, device_map: Mapping[str, Any], main: torch.device
) -> dict[str, Any]:
    """The map in ``model``'s own module names: LLM modules translated by ``layout``, the rest on ``main``."""
    out: dict[str, Any] = {}
    if "" in device_map:
        return {"": device_map[""]}  # the whole model on one device (what accelerate infers when it all fits)
    for key, value in device_map.items():
        name = layout.to_disk(key + ".") if key in ("model", "lm_head") else layout.to_disk(key)
        out[name.rstrip(".")] = value
    covered = tuple(out)

    def is_covered(name: str) -> bool:
        return any(name == k or name.startswith(k + ".") for k in covered)

    tensors = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]

    def place(module_name: str, module: torch.nn.Module) -> None:
        prefix = f"{module_name}." if module_name else ""
        inside = [n for n in tensors if n.startswith(prefix) and not is_covered(n)]
        if not inside:
            return
        if module_name and not any(is_covered(n) for n in tensors if n.startswith(prefix)):
            out[module_name] = str(main)  # a component subtree (tower, projector) or an uncovered LLM part
            return
        for leaf, _ in module.named_parameters(recurse=False):
            out[prefix + leaf] = str(main)  # a parameter held directly by a module whose children are split
        for child, sub in module.named_children():
            place(prefix + child, sub)

    place("", model)
    return out


def dispatch(model: torch.nn.Module, device_map: Mapping[str, Any], main: torch.device) -> torch.nn.Module:
    """Hook ``model`` with accelerate under ``device_map`` (its own names); its tensors are already in place.

    ``force_hooks``: even a one-device map gets hooks, so the hooked path is the one tests run on a CPU.
    """
    import logging

    from accelerate import dispatch_model

    # accelerate warns of offloading whenever the map names "cpu"; with a CPU main device nothing is offloaded.
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    if main.type == "cpu":
        log.setLevel(logging.ERROR)
    try:
        dispatch_model(model, dict(device_map), main_device=str(main), force_hooks=True)  # it compares strings
    finally:
        log.setLevel(level)
    return model
