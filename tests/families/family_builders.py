"""Tiny models of every multimodal family the installed transformers ships, built from one shared text config.

Each family's own config class is instantiated with its defaults and then shrunk: every sub-config's size fields
become tiny (``SMALL``), and the LLM's text config (found by transformers' ``get_text_config``) takes the shared
``TEXT`` dimensions. The LLM inside a model is found through transformers' own structure (``get_decoder`` and
``get_output_embeddings``), never by name, so the test's view of "the LLM" is independent of mmer's name-based
layouts (``mmer/io/layouts.py``) that it checks.

The base is the plain causal LM of the same text config: the class transformers registers for the text
config's ``model_type``, or for the longest ``_``-prefix of it that has one (``qwen2_vl_text`` → ``qwen2``),
accepted only when its tensors are the family's LLM tensors, name for name and shape for shape.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# The mappings whose families are multimodal LMs: image/video-text-to-text, multimodal LM (audio and omni LLMs
# included), speech-to-text. Missing names (another transformers version) are skipped.
MAPPINGS = (
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
)
BASE_VOCAB = 256
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
)
# Every other sub-config (vision/audio towers, projectors): the smallest sizes that still build.
SMALL = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    depth=1,
    embed_dim=16,
    num_heads=2,
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_layers=1,
    projection_dim=16,
    out_hidden_size=TEXT["hidden_size"],
    ffn_dim=32,
    vocab_size=BASE_VOCAB,
    embedding_size=TEXT["hidden_size"],  # a talker's input: the thinker's hidden states (Qwen2.5-Omni)
    # speech-synthesis towers (an omni model's token2wav): vocoder channels, codec vocabulary, encoder widths
    upsample_initial_channel=64,
    num_embeds=64,
    emb_dim=16,
    enc_emb_dim=16,
    enc_dim=16,
    enc_attention_channels=16,
    enc_se_channels=16,
)
MAX_PARAMETERS = 2_000_000  # above this after shrinking, a family is not "tiny" and the matrix skips it


def families() -> dict[str, str]:
    """Every family in the multimodal mappings of the installed transformers: model_type → class name."""
    from transformers.models.auto import modeling_auto

    found: dict[str, str] = {}
    for mapping in MAPPINGS:
        for family, cls in getattr(modeling_auto, mapping, {}).items():
            found.setdefault(family, cls)
    return found


def _quiet():
    """transformers warns about every shrunk config; the matrix reads none of it."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shrink(config, values: dict[str, int], seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    for key, value in values.items():
        if _is_size(getattr(config, key, None)):
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(getattr(config, "layer_types", None), list) and _is_size(layers):
        with contextlib.suppress(Exception):  # a derived (read-only) layer_types follows num_hidden_layers itself
            config.layer_types = config.layer_types[:layers]  # the per-layer pattern's start, as many as are left
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "padding_idx"):
        token = getattr(config, key, None)
        if _is_size(token) and _is_size(vocab) and token >= vocab:
            with contextlib.suppress(Exception):
                setattr(config, key, 0)
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub, SMALL, seen)


def _text_width(config, text) -> None:
    """Sub-configs that feed the LLM directly take its width (their validators require it)."""
    for name in ("adaptor_config", "adapter_config"):
        sub = getattr(config, name, None)
        for key in ("hidden_size", "text_hidden_size"):
            if name == "adaptor_config" and key == "hidden_size" or key == "text_hidden_size":
                if _is_size(getattr(sub, key, None)):
                    setattr(sub, key, text.hidden_size)
        if isinstance(getattr(sub, "vision_feature_layer", None), list):  # indexes the shrunk tower's layers
            sub.vision_feature_layer = [-1]


def _balanced_encoder(config, text) -> None:
    """T5Gemma 2 refuses an encoder unlike its decoder: the encoder's text config takes the decoder's sizes."""
    encoder = config.encoder.text_config
    _shrink(encoder, TEXT, set())
    encoder.layer_types = list(text.layer_types)


def _fun_asr_adaptor(config, text) -> None:
    config.adaptor_config.intermediate_size = text.hidden_size // 4  # its validator: text width / 4


# What a family's own validators need beyond the generic shrink (each fixes the harness, not the family).
FIXUPS = {"t5gemma2": _balanced_encoder, "fun_asr_nano": _fun_asr_adaptor}


def tiny_config(family: str, extra_vocab: int = 0):
    """The family's config with every size shrunk and the shared ``TEXT`` dimensions in its text config."""
    from transformers import CONFIG_MAPPING

    with _quiet():
        config = CONFIG_MAPPING[family]()
        text = config.get_text_config(decoder=True)
        seen: set[int] = set()
        # the text config first (the towers' pass then skips it); where it is the whole config (an encoder-decoder
        # such as Whisper), the towers' sizes TEXT does not name shrink with it
        text_sizes = {**TEXT, "vocab_size": BASE_VOCAB + extra_vocab}
        _shrink(text, text_sizes if text is not config else {**SMALL, **text_sizes}, seen)
        if text is not config:
            _shrink(config, SMALL, seen)
        _text_width(config, text)
        if family in FIXUPS:
            FIXUPS[family](config, text)
        # as from_pretrained will read it back: a config class that derives one sub-config's sizes from another's
        # (Idefics2's perceiver takes the text width) builds the model its own loader expects
        with contextlib.suppress(Exception):
            config = type(config).from_dict(config.to_dict())
            text = config.get_text_config(decoder=True)
        for target in {id(config): config, id(text): text}.values():
            if hasattr(target, "tie_word_embeddings"):
                target.tie_word_embeddings = False
    return config


# Families whose mapping names a class that cannot load back what it saves under the family's config; the
# family's own class (the one its published checkpoints carry) is built instead.
OWN_CLASS = {
    # the mapping's Gemma3ForConditionalGeneration: shieldgemma2's checkpoint conversion mapping (a "model."
    # prefix) is written for ShieldGemma2ForImageClassification, so its save→load round trip loses the LLM
    "shieldgemma2": "ShieldGemma2ForImageClassification",
}


def model_class(family: str):
    import transformers

    return getattr(transformers, OWN_CLASS.get(family) or families()[family])


def count_parameters(family: str) -> int:
    """Parameters of the tiny model, counted on the meta device (nothing allocated)."""
    with _quiet(), torch.device("meta"):
        model = model_class(family)(tiny_config(family))
    return sum(p.numel() for p in model.parameters())


def build(family: str, seed: int, extra_vocab: int = 0):
    """The tiny model, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    with _quiet():
        return model_class(family)(tiny_config(family, extra_vocab)).eval()


def _module_name(model, module) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def llm_names(model) -> dict[str, str]:
    """Canonical causal-LM name → the model's own state-dict key, for its LLM as transformers defines it.

    The LLM is the first sub-model (the model itself first) with a decoder of its own, ``get_decoder()``
    (embeddings, layers and final norm), and a head, ``get_output_embeddings()``: the model's own for most
    families, an omni model's thinker's, a classifier's wrapped VLM's. An empty dict when there is none.
    """
    from transformers import PreTrainedModel

    for _, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        try:
            decoder, head = sub.get_decoder(), sub.get_output_embeddings()
        except (AttributeError, NotImplementedError, ValueError, TypeError):
            continue
        if decoder is None or decoder is sub or head is None:
            continue
        body, head_name = _module_name(model, decoder), _module_name(model, head)
        names = {}
        for key in model.state_dict():
            if key.startswith(body + "."):
                names["model." + key[len(body) + 1 :]] = key
            elif key.startswith(head_name + "."):
                names["lm_head." + key[len(head_name) + 1 :]] = key
        return names
    return {}


def causal_base_type(text_model_type: str) -> str | None:
    """The model_type of the plain causal LM a text config of ``text_model_type`` is the LLM of."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    parts = text_model_type.split("_")
    for end in range(len(parts), 0, -1):
        candidate = "_".join(parts[:end])
        if candidate in causal:
            return candidate
    return None


def build_base(family: str):
    """The plain causal LM of the family's text config (``BASE_VOCAB`` rows), or ``None`` if transformers has
    none."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    text = tiny_config(family).get_text_config(decoder=True)
    base_type = causal_base_type(text.model_type)
    if base_type is None:
        return None
    settings = {k: v for k, v in text.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    torch.manual_seed(0)
    with _quiet():
        config = CONFIG_MAPPING[base_type](**settings)
        config.tie_word_embeddings = False
        return getattr(transformers, causal[base_type])(config).eval()


def mismatch(base, model) -> str | None:
    """Why ``base`` cannot be the base of ``model``'s LLM (names or shapes differ), or ``None`` if it can."""
    names = llm_names(model)
    if not names:
        return f"{type(model).__name__} has no decoder of its own (get_decoder/get_output_embeddings)"
    base_state = base.state_dict()
    state = model.state_dict()
    for canonical in sorted(set(base_state) ^ set(names)):
        where = "the base" if canonical in base_state else type(model).__name__
        return f"{canonical} exists only in {where}"
    for canonical, key in names.items():
        have, want = tuple(state[key].shape), tuple(base_state[canonical].shape)
        if have != want and not (have[1:] == want[1:] and len(have) == len(want) and have[0] > want[0]):
            return f"{canonical} is {list(have)} in the model, {list(want)} in the base"
    return None


def fine_tune(model, base, seed: int, density: float = 0.5) -> None:
    """Set the model's LLM to θ_base + a sparse seeded τ (rows past the base vocabulary keep their own values)."""
    g = torch.Generator().manual_seed(seed)
    names = llm_names(model)
    state = model.state_dict()
    with torch.no_grad():
        for canonical, tensor in base.state_dict().items():
            if not tensor.is_floating_point():
                continue
            delta = torch.randn(tensor.shape, generator=g) * 0.02 * (torch.rand(tensor.shape, generator=g) < density)
            state[names[canonical]][: tensor.shape[0]].copy_(tensor + delta.to(tensor.dtype))


@dataclass
class FamilyModels:
    """One family's base and two fine-tunes on disk."""

    family: str
    base: Path
    first: Path
    second: Path


MODALITIES = ("first", "second")
EXTRA_VOCAB = {"first": 2, "second": 1}  # private vocabulary rows each fine-tune adds (its new tokens)


def write_family(family: str, root: Path) -> FamilyModels:
    """Save the base and two fine-tunes (different seeds, towers and added rows) with ``save_pretrained``."""
    base = build_base(family)
    if base is None:
        raise ValueError(f"{family}: no causal LM for its text config")
    with _quiet():
        base.save_pretrained(root / "base")
        for seed, name in enumerate(MODALITIES, start=1):
            model = build(family, seed, EXTRA_VOCAB[name])
            fine_tune(model, base, seed)
            model.save_pretrained(root / name)
            if hasattr(model, "load_speakers"):  # an omni model loads its voices from a file beside the weights
                torch.save({"voice": {"bos_token": 0, "cond": torch.zeros(1, 4)}}, root / name / "spk_dict.pt")
    return FamilyModels(family, root / "base", root / MODALITIES[0], root / MODALITIES[1])


def load(family: str, directory: Path, strict: bool = False):
    """The family's own class loaded from ``directory``; ``strict``: every weight of the files lands in the
    model and every weight of the model comes from the files (transformers warns and goes on otherwise)."""
    from transformers import PreTrainedModel

    cls = model_class(family)
    with _quiet():
        if not strict:
            return cls.from_pretrained(directory).eval()
        if cls.from_pretrained.__func__ is not PreTrainedModel.from_pretrained.__func__:
            cls.from_pretrained(directory)  # the family's own loader (Qwen2.5-Omni's reads its voices) loads it
        # transformers' loader itself reports what did not land (an override may not pass the report through)
        model, info = PreTrainedModel.from_pretrained.__func__(cls, directory, output_loading_info=True)
    if strict:
        problems = {k: sorted(v)[:3] for k, v in info.items() if k != "error_msgs" and v} or info["error_msgs"]
        assert not problems, f"{family}: {directory.name} does not load cleanly with its own class: {problems}"
    return model.eval()


def loaded_names(model, keys: set[str]) -> dict[str, str]:
    """The in-memory name transformers loads each on-disk key into: its checkpoint conversion mapping's renames
    and converters (transformers 5 fuses some MoE experts), as ``from_pretrained`` applies them. Identity for a
    transformers without that machinery."""
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
        if name not in meta and key in meta:  # as from_pretrained: a key already in the model keeps its name
            name, _ = rename_source_key(key, [], [], model.base_model_prefix, meta)
        names[key] = name
    return names
