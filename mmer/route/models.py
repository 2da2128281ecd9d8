"""Build a modality's transformers model without allocating its LLM: components loaded, LLM bound to shared tensors.

The model class comes from the component's ``config.json`` (``architectures``; only classes transformers
itself exports, never code from the checkpoint). It is created with accelerate's ``init_empty_weights`` (every
parameter on the meta device, nothing allocated), then each parameter is *bound*: an LLM parameter becomes a
view of a tensor the caller owns (the router's live weights, shared by every modality), a component parameter
is read from the checkpoint. Names are matched the way the rest of mmer does it, from tensor names alone: the
model's in-memory LLM layout is detected (``mmer.io.layouts``), and a component stored as ``vision_tower.x``
binds to the parameter whose name is ``vision_tower.x`` or ends with ``.vision_tower.x``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from mmer.errors import ConfigError, LayoutError, MmerError
from mmer.io.layouts import Layout, detect_layout
from mmer.io.reader import CheckpointReader

# Config attributes naming the token id a processor repeats where a modality's features go.
PLACEHOLDER_KEYS = tuple(
    f"{kind}_token_{suffix}" for kind in ("image", "audio", "video", "point", "speech") for suffix in ("id", "index")
)


class RoutingInputError(MmerError):
    """Inputs given to the router or to expansion mode do not fit the models (modality, shapes, placeholders)."""


def load_config(directory: Path) -> Any:
    """The model config of a component directory (local files only, no remote code)."""
    from transformers import AutoConfig

    from mmer.io.jsonfile import read_json_file
    from mmer.io.paths import check_inside

    # transformers parses the file with plain json (no depth or number bounds) and would follow a link out of
    # the checkpoint; both are settled here first, on the same bytes it will read.
    config_file = check_inside(directory, directory / "config.json", what="config file")
    if not isinstance(read_json_file(config_file, what="model config", error=ConfigError), dict):
        raise ConfigError(f"{config_file}: not a JSON object", file=str(config_file), hint="re-create the checkpoint")
    try:
        return AutoConfig.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"{directory / 'config.json'}: transformers cannot read this config ({err})",
            file=str(directory / "config.json"),
            hint="the model family needs a newer transformers, or the checkpoint is incomplete",
        ) from None


def model_class(config: Any, directory: Path, override: type | None = None) -> type:
    """The transformers class named first in ``config.architectures`` (or ``override``)."""
    if override is not None:
        return override
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    raise ConfigError(
        f"{directory / 'config.json'}: architectures {names or 'missing'} name no class transformers "
        f"{transformers.__version__} exports",
        file=str(directory / "config.json"),
        key="architectures",
        hint="pass model_classes={modality: TheClass}, or upgrade transformers",
    )


def causal_lm_class(config: Any, directory: Path) -> type:
    """The causal-LM class of a base LLM's config: ``architectures`` if it names one, else transformers' mapping."""
    try:
        return model_class(config, directory)
    except ConfigError:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        try:
            return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except KeyError:
            raise ConfigError(
                f"{directory / 'config.json'}: no causal-LM class for model_type {config.model_type!r}",
                file=str(directory / "config.json"),
                key="model_type",
                hint="upgrade transformers",
            ) from None


def empty_model(cls: type, config: Any) -> torch.nn.Module:
    """``cls(config)`` with every parameter on the meta device: no memory, no random init."""
    from accelerate import init_empty_weights

    # Parameters on the meta device hold nothing, yet transformers would still run every random initializer on
    # them (one dispatch per tensor, most of a small model's build time); its own no-init switch skips that,
    # and weight tying, which it also skips, is done after.
    with init_empty_weights(include_buffers=False), _no_init_weights():
        if hasattr(cls, "_from_config"):
            model = cls._from_config(config)
        else:
            model = cls(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _no_init_weights() -> Any:
    """transformers' context that turns weight initialization off (moved between its 4.x and 5.x layouts)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def attach_generation_config(model: torch.nn.Module, directory: Path) -> None:
    """Use the directory's ``generation_config.json`` (eos ids, defaults), as ``from_pretrained`` would."""
    if not (directory / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{directory / 'generation_config.json'}: transformers cannot read it ({err})",
            file=str(directory / "generation_config.json"),
            hint="fix or remove the file",
        ) from None


def check_device(device: torch.device) -> None:
    """Refuse a device this torch cannot use, before anything is loaded."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device} asked for, but this torch has no usable CUDA device",
            key="device",
            hint="install a CUDA build of torch, or pass device='cpu'",
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device} asked for, but only {torch.cuda.device_count()} CUDA devices are visible",
            key="device",
        )


def llm_layout(model: torch.nn.Module) -> Layout:
    """Where this in-memory model keeps its LLM (``model.language_model.*``, ``model.*`` ...)."""
    return detect_layout(set(model.state_dict(keep_vars=True)), type(model).__name__)


def decoder_module(model: torch.nn.Module, layout: Layout) -> torch.nn.Module:
    """The LLM's decoder (the module holding ``layers``), e.g. ``model.language_model`` of a llava-hf model."""
    return model.get_submodule(layout.body_prefix.rstrip("."))


def placeholder_ids(config: Any) -> set[int]:
    """Token ids the model replaces by modality features (``image_token_id``, ``audio_token_index``...)."""
    ids = set()
    for key in PLACEHOLDER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            ids.add(value)
    return ids


def match_components(stored: Iterable[str], in_memory: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Map in-memory names to stored component names; also return the stored names nothing matched.

    A stored name matches the in-memory name equal to it, ending with ``.`` + it (transformers ≥ 4.52 nests
    towers under ``model.``), or that it ends with ``.`` + the in-memory name (an older, flatter class).
    """
    memory = set(in_memory)
    by_suffix: dict[str, list[str]] = {}
    for name in memory:
        parts = name.split(".")
        for i in range(1, len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(name)
    mapping: dict[str, str] = {}
    unused = []
    for key in stored:
        if key in memory:
            candidates = [key]
        else:
            parts = key.split(".")
            shorter = [".".join(parts[i:]) for i in range(1, len(parts))]
            candidates = by_suffix.get(key, []) + [s for s in shorter if s in memory]
        candidates = [c for c in candidates if c not in mapping]
        if not candidates:
            unused.append(key)
            continue
        if len(candidates) > 1:
            raise LayoutError(
                f"component tensor {key!r} could be any of {sorted(candidates)[:4]}",
                tensor=key,
                hint="this model family stores its components under names mmer cannot place; please report it",
            )
        mapping[candidates[0]] = key
    return mapping, unused


def bind_model(
    model: torch.nn.Module,
    layout: Layout,
    llm_tensor: Callable[[str], torch.Tensor | None],
    components: CheckpointReader | None,
    device: torch.device,
    source: str,
) -> list[str]:
    """Give every meta parameter of ``model`` real storage; returns stored component names left unused.

    ``llm_tensor(canonical)`` returns the tensor an LLM parameter becomes (a view is kept as is, so the caller
    can rewrite it in place later), or ``None`` when the checkpoint has none (a tied ``lm_head``).

    Component tensors are read without a copy: on the CPU a parameter is a copy-on-write view of the mapped file
    (the page cache's pages until something writes into it, and a write never reaches the file), which spares
    the load a copy of every component weight; on another device the transfer is the only copy.
    """
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    non_llm = [n for n in named if layout.to_canonical(n) is None]
    mapping, unused = match_components([] if components is None else components.tensors, non_llm)
    bound: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for leaf, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in bound:
                module._parameters[leaf] = bound[id(param)]
                continue
            name = prefix + leaf
            canonical = layout.to_canonical(name)
            if canonical is not None:
                tensor = llm_tensor(canonical)
            elif name in mapping:
                tensor = components.get(mapping[name], copy=False).to(device)  # type: ignore[union-attr]
            else:
                tensor = None
            if tensor is None:
                continue  # left on meta: a tie below may fill it, otherwise it is reported
            if tuple(tensor.shape) != tuple(param.shape):
                raise LayoutError(
                    f"{source}: {name} is {tuple(param.shape)} in {type(model).__name__} but the checkpoint gives "
                    f"{tuple(tensor.shape)}",
                    file=source,
                    tensor=name,
                    hint="the component config does not describe these weights; was the checkpoint edited?",
                )
            new = torch.nn.Parameter(tensor, requires_grad=False)
            bound[id(param)] = bound[id(new)] = new
            module._parameters[leaf] = new
        for leaf, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            name = prefix + leaf
            stored = components.get(mapping[name], copy=False) if name in mapping else buffer  # type: ignore[union-attr]
            module._buffers[leaf] = stored.to(device)
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if left and hasattr(model, "tie_weights"):
        model.tie_weights()
        left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if left:
        raise LayoutError(
            f"{source}: the checkpoint has no tensor for {left[0]} of {type(model).__name__}"
            + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""),
            file=source,
            tensor=left[0],
            hint="the component's config and tensors do not match this transformers class",
        )
    return unused
