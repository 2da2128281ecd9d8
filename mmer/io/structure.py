"""Where a checkpoint keeps its LLM, found through transformers' own model structure when no name layout fits.

The four name layouts (``mmer/io/layouts.py``) cover the prefixes most families save under. A family that keeps
its LLM elsewhere (an omni model's thinker beside its talker, a classifier wrapping a whole VLM) is read here,
from what the installed transformers says about that family, never from the checkpoint's code:

1. the class: one transformers registers for the config's ``model_type`` in its own auto mappings (the one the
   config's ``architectures`` names, if it is among them); ``config.json`` only chooses among those, and no
   ``auto_map``/remote code is ever followed;
2. the model: that class built from the config on the ``meta`` device (no memory, no weights read);
3. the LLM: the first sub-model whose ``get_decoder()`` is a module built from the family's text config
   (``get_text_config(decoder=True)``) and whose ``get_output_embeddings()`` is its head;
4. the files' names: each on-disk key renamed as ``from_pretrained`` renames it (the family's checkpoint
   conversion mapping), so that a checkpoint saved under an older layout lands where transformers would load it.

The result is a prefix :class:`~mmer.io.layouts.Layout` like the four, named ``structure:<body>|<head>`` so that
a manifest records it without needing transformers to read it back (docs/layouts.md §2).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping, Set
from typing import Any

# The auto mappings whose classes can hold a multimodal or plain LLM, in the order a class is preferred.
_MAPPINGS = (
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
)


class NotFound(Exception):
    """Why transformers' structure does not place this checkpoint's LLM (said in the layout refusal)."""


def _quiet() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _model_class(model_type: str, architectures: object) -> type:
    """The transformers class for ``model_type``: among those its auto mappings register, the one
    ``architectures`` names, else the first in :data:`_MAPPINGS` order."""
    import transformers
    from transformers.models.auto import modeling_auto

    registered: list[str] = []
    for mapping in _MAPPINGS:
        name = getattr(modeling_auto, mapping, {}).get(model_type)
        for candidate in name if isinstance(name, (list, tuple)) else [name]:
            if isinstance(candidate, str) and candidate not in registered:
                registered.append(candidate)
    named = [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else []
    chosen = next((a for a in named if a in registered), registered[0] if registered else None)
    cls = getattr(transformers, chosen, None) if chosen else None
    if cls is None:
        raise NotFound(f"transformers {transformers.__version__} registers no model class for {model_type!r}")
    return cls


# A config names how many modules the meta build creates (layers, experts, blocks); each costs time and Python
# memory even on the meta device. A checkpoint holds at least one tensor per layer or expert it really has, so a
# count above the files' tensor count (with room for fused experts) is a config that lies, refused before building.
_COUNT_WORDS = ("layers", "experts", "blocks")
_COUNT_SLACK = 256


def _check_counts(config: object, limit: int, where: str = "config.json") -> None:
    if isinstance(config, Mapping):
        for key, value in config.items():
            name = f"{where}:{key}"
            if isinstance(value, int) and not isinstance(value, bool) and any(w in str(key) for w in _COUNT_WORDS):
                if value > limit:
                    raise NotFound(
                        f"{name} = {value} is more than the {limit - _COUNT_SLACK} tensors the files hold could "
                        "make up; a model that size is not built"
                    )
            else:
                _check_counts(value, limit, name)
    elif isinstance(config, list):
        for item in config:
            _check_counts(item, limit, where)


def _meta_model(config: Mapping[str, Any], tensor_count: int) -> Any:
    import torch
    from transformers import CONFIG_MAPPING

    _check_counts(config, tensor_count + _COUNT_SLACK)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise NotFound(f"config.json's model_type {str(model_type)[:80]!r} is not a transformers family")
    cls = _model_class(model_type, config.get("architectures"))
    settings = {k: v for k, v in config.items() if k not in ("auto_map", "model_type")}
    # transformers writes a non-finite float (Nemotron-H's time_step_limit ends at inf) as {"__float__": "Infinity"}
    # and reads it back when it loads the file itself; from_dict does not, so the config is read as transformers
    # reads config.json
    decode = getattr(CONFIG_MAPPING[model_type], "_decode_special_floats", None)
    if callable(decode):
        settings = decode(settings)
    try:
        with _quiet(), torch.device("meta"):
            hf_config = CONFIG_MAPPING[model_type].from_dict(settings)
            return cls(hf_config)
    except Exception as err:  # the family's own validation refuses this config: say so, do not guess
        raise NotFound(f"{cls.__name__} cannot be built from config.json: {type(err).__name__}: {err}") from err


def _llm_modules(model: Any) -> tuple[str, str]:
    """In-memory names of the LLM's decoder and head (see the module docstring, step 3)."""
    from transformers import PreTrainedModel

    text = model.config.get_text_config(decoder=True)
    if getattr(model.config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        raise NotFound("an encoder-decoder: its decoder cross-attends to an encoder a causal-LM base does not have")
    names = {id(module): name for name, module in model.named_modules()}
    for _, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        try:
            decoder, head = sub.get_decoder(), sub.get_output_embeddings()
        except (AttributeError, NotImplementedError, ValueError, TypeError):
            continue
        if decoder is None or decoder is sub or head is None or getattr(decoder, "config", None) is not text:
            continue
        if id(decoder) in names and id(head) in names:
            return names[id(decoder)], names[id(head)]
    raise NotFound(f"{type(model).__name__} has no decoder built from its text config with an output head")


def loaded_names(model: Any, keys: Set[str]) -> dict[str, str]:
    """The in-memory name ``from_pretrained`` loads each on-disk key into (identity without transformers 5's
    conversion machinery)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {key: key for key in keys}
    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    meta = model.state_dict()
    names = {}
    for key in keys:
        name, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if name not in meta and key in meta:  # as from_pretrained does: a key the model has keeps its name
            name = key
        names[key] = name
    return names


def _disk_prefix(loaded: Mapping[str, str], prefix: str, what: str) -> tuple[str, set[str]]:
    """The one on-disk prefix that stands for the in-memory ``prefix``, and the keys loaded under it."""
    under = {key for key, name in loaded.items() if name.startswith(prefix + ".")}
    if not under:
        raise NotFound(f"no tensor of the files loads into the {what} ({prefix})")
    prefixes = set()
    for key in under:
        rest = loaded[key][len(prefix) + 1 :]
        if key.endswith("." + rest) or key == rest:
            prefixes.add(key[: len(key) - len(rest)])
    if len(prefixes) != 1:
        found = ", ".join(sorted(prefixes)[:3]) or "none"
        raise NotFound(f"the {what}'s tensors are not under one prefix on disk (found: {found})")
    disk = prefixes.pop()
    strays = sorted(k for k in under if not k.startswith(disk))
    if strays:
        raise NotFound(f"{strays[0]!r} loads into the {what} but is not under its prefix {disk!r}")
    return disk, under


def find_llm(keys: Set[str], config: Mapping[str, Any] | None) -> tuple[str, str, bool]:
    """``(body_prefix, head_prefix, whitelist)`` of the LLM in a checkpoint with these tensor names and this
    ``config.json``, read off transformers' structure; :class:`NotFound` says why not."""
    if not isinstance(config, Mapping):
        raise NotFound("no config.json to read the family from")
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise NotFound("transformers is not installed") from err
    model = _meta_model(config, len(keys))
    decoder, head = _llm_modules(model)
    loaded = loaded_names(model, keys)
    body_prefix, body = _disk_prefix(loaded, decoder, "decoder")
    stacked = {loaded[k][len(decoder) + 1 :].split(".", 1)[0] for k in body}
    if not {"layers", "embed_tokens"} <= stacked:
        raise NotFound(
            f"the decoder transformers names ({decoder}) holds {', '.join(sorted(stacked)[:4])}, not the "
            "embed_tokens and layers.N of a decoder-only LLM a plain causal LM can be the base of"
        )
    if any(name.startswith(head + ".") for name in loaded.values()):
        head_prefix, head_keys = _disk_prefix(loaded, head, "output head")
    else:  # a head tied to the embeddings is not saved: its in-memory name stands in, and nothing is under it
        head_prefix, head_keys = head + ".", set()
    if body_prefix.startswith(head_prefix) or head_prefix.startswith(body_prefix):
        raise NotFound(f"the decoder ({body_prefix}) and the head ({head_prefix}) share a prefix on disk")
    from mmer.io.layouts import CANONICAL_LLM

    llm = body | head_keys
    # A prefix layout maps names by their prefix alone: a decoder tensor whose name on disk is not a causal LM's
    # (Kimi K2.5 saves its layers as blocks.N, which transformers renames to layers.N on load) would reach the
    # merge under a name no base has; the rename is said here instead of a base mismatch there.
    renamed = sorted(
        k
        for k in body
        if k[len(body_prefix) :] != loaded[k][len(decoder) + 1 :]
        and not CANONICAL_LLM.match("model." + k[len(body_prefix) :])
    )
    if renamed:
        raise NotFound(
            f"{renamed[0]!r} loads into the decoder as {loaded[renamed[0]]!r}: the files name the decoder's "
            "tensors otherwise than a causal LM does (transformers renames them on load), which no prefix "
            "layout maps"
        )
    claimed = {k for k in keys if k.startswith((body_prefix, head_prefix))}
    if claimed == llm:
        return body_prefix, head_prefix, False
    whitelisted = {k for k in claimed if k in head_keys or CANONICAL_LLM.match("model." + k[len(body_prefix) :])}
    if whitelisted == llm:
        return body_prefix, head_prefix, True
    stray = sorted(claimed ^ llm)[0]
    raise NotFound(f"{stray!r} is under the LLM's prefix {body_prefix!r} but transformers loads it elsewhere")
