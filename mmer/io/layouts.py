"""Where a checkpoint keeps its LLM: detected from tensor names, never from a transformers version.

Every layout maps its on-disk LLM names to the plain causal-LM names of the base
(``model.embed_tokens.weight``, ``model.layers.N.…``, ``model.norm.weight``, ``lm_head.weight``), called
*canonical* names here, and back. Whatever is not the LLM (vision/audio towers, projectors, ``image_newline``)
is the model's *component* and is carried over untouched. See docs/layouts.md §1–2 for the families.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmer.errors import LayoutError

CANONICAL_LLM = re.compile(r"^(model\.(embed_tokens|norm)\.|model\.layers\.\d+\.|lm_head\.)")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Layout:
    """One way of storing an LLM inside a checkpoint.

    Attributes:
        name: stable identifier written into manifests.
        body_prefix: on-disk prefix that stands for the canonical ``model.``.
        head_prefix: on-disk prefix that stands for the canonical ``lm_head.``.
        whitelist: when true, only the canonical decoder names under ``body_prefix`` are LLM tensors; the
            original LLaVA family keeps ``model.mm_projector``/``model.vision_tower`` beside the decoder.
        families: examples, for error messages and docs.
    """

    name: str
    body_prefix: str
    head_prefix: str
    whitelist: bool
    families: str

    def to_canonical(self, key: str) -> str | None:
        """The canonical LLM name of an on-disk key, or ``None`` if the key belongs to a component."""
        if key.startswith(self.head_prefix):
            return "lm_head." + key[len(self.head_prefix) :]
        if key.startswith(self.body_prefix):
            canonical = "model." + key[len(self.body_prefix) :]
            if self.whitelist and not CANONICAL_LLM.match(canonical):
                return None
            return canonical
        return None

    def to_disk(self, canonical: str) -> str:
        """The on-disk key of a canonical LLM name in this layout."""
        if canonical.startswith("lm_head."):
            return self.head_prefix + canonical[len("lm_head.") :]
        if canonical.startswith("model."):
            return self.body_prefix + canonical[len("model.") :]
        raise ValueError(f"not a canonical LLM name: {canonical}")


CAUSAL_LM = Layout(
    "causal_lm",
    "model.",
    "lm_head.",
    whitelist=True,
    families="plain causal LMs; original LLaVA, Video-LLaVA, PointLLM, Qwen2-VL (extra keys beside the decoder)",
)
HF_LEGACY = Layout(
    "hf_legacy",
    "language_model.model.",
    "language_model.lm_head.",
    whitelist=False,
    families="llava-hf as saved by transformers <=4.51 and >=5.2, Qwen2-Audio",
)
HF_NESTED = Layout(
    "hf_nested",
    "model.language_model.",
    "lm_head.",
    whitelist=False,
    families="transformers >=4.52 in-memory layout (on disk when saved by 4.52.0-4.52.3 or some 5.x)",
)
TEXT_MODEL = Layout("text_model", "model.text_model.", "lm_head.", whitelist=False, families="Idefics2/3, SmolVLM")

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (CAUSAL_LM, HF_LEGACY, HF_NESTED, TEXT_MODEL)}

STRUCTURE = "structure"  # a layout read off transformers' model structure (mmer/io/structure.py)
_PREFIX = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\."
_STRUCTURE_NAME = re.compile(rf"{STRUCTURE}:({_PREFIX})\|({_PREFIX})(\|canonical)?")


def structure_layout(body_prefix: str, head_prefix: str, whitelist: bool) -> Layout:
    """A prefix layout found through transformers' structure; its name carries its prefixes, so a manifest
    that records it reads back without transformers (``structure:<body>|<head>[|canonical]``)."""
    name = f"{STRUCTURE}:{body_prefix}|{head_prefix}" + ("|canonical" if whitelist else "")
    if not _STRUCTURE_NAME.fullmatch(name):
        raise ValueError(f"not a layout prefix pair: {body_prefix[:80]!r}, {head_prefix[:80]!r}")
    return Layout(name, body_prefix, head_prefix, whitelist, families="found through transformers' model structure")


def layout_named(name: str) -> Layout | None:
    """The layout a manifest records under ``name`` (one of :data:`LAYOUTS` or a ``structure:`` one), or
    ``None`` if ``name`` is neither."""
    if name in LAYOUTS:
        return LAYOUTS[name]
    match = _STRUCTURE_NAME.fullmatch(name) if isinstance(name, str) else None
    return structure_layout(match.group(1), match.group(2), bool(match.group(3))) if match else None


_CORRUPT_PREFIXES = (
    "model.language_model.language_model.",
    "model.language_model.visual.",
    "language_model.language_model.",
)


def detect_layout(keys: list[str] | set[str], source: str, config: dict | None = None) -> Layout:
    """Pick the layout from the tensor names; refuse names that match none or look like a broken save.

    When no name layout holds the decoder and the checkpoint's ``config`` (its config.json) is given, the LLM
    is looked for through transformers' own model structure (:mod:`mmer.io.structure`) before refusing.
    """
    for key in keys:
        if key.startswith(_CORRUPT_PREFIXES):
            raise LayoutError(
                f"{source}: tensor {key!r} has a doubled prefix, the signature of a broken transformers save",
                file=source,
                tensor=key,
                hint="re-save the model with transformers >= 4.52.4 (or the version that trained it)",
            )
    found = [
        layout
        for layout, marker in (
            (HF_NESTED, "model.language_model.layers."),
            (HF_LEGACY, "language_model.model.layers."),
            (TEXT_MODEL, "model.text_model.layers."),
            (CAUSAL_LM, "model.layers."),
        )
        if any(k.startswith(marker) for k in keys)
    ]
    if not found:
        structural = ""
        if config is not None:
            from mmer.io import structure

            try:
                return structure_layout(*structure.find_llm(set(keys), config))
            except structure.NotFound as err:
                structural = f"; transformers' structure of its family places no LLM either: {err}"
        why, hint = _why_no_decoder(keys)
        raise LayoutError(
            f"{source}: no LLM decoder layers found (looked for model.layers.N, language_model.model.layers.N, "
            f"model.language_model.layers.N, model.text_model.layers.N): {why}{structural}; first names: "
            + ", ".join(sorted(keys)[:5]),
            file=source,
            hint=hint,
        )
    if len(found) > 1:
        raise LayoutError(
            f"{source}: decoder layers are stored under two prefixes ({found[0].body_prefix} and "
            f"{found[1].body_prefix})",
            file=source,
            hint="the checkpoint mixes layouts; re-save it with one transformers version",
        )
    return found[0]


_ENCODER = re.compile(r"(^|\.)encoder\.")
_DECODER_STACK = re.compile(r"^(.*?\bdecoder\.(?:layers|layer|block)\.)\d+\.")
_ANY_STACK = re.compile(r"^(.*?\b(?:layers|layer|block|blocks|h)\.)\d+\.")
_NO_LLM_HINT = "mmer merges decoder-only LLMs fine-tuned from one plain causal-LM base; this family cannot be merged"


def _why_no_decoder(keys: list[str] | set[str]) -> tuple[str, str]:
    """Why a checkpoint with no decoder where a layout keeps one cannot be merged, read off its names
    (docs/layouts.md §2): an encoder-decoder, layer stacks under prefixes no layout reads, or no stack at all."""
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "a LoRA adapter (lora_A/lora_B weights)", "merge the LoRA adapter into its model first"
    decoder = sorted({m.group(1) for k in keys if (m := _DECODER_STACK.match(k))})
    if decoder and any(_ENCODER.search(k) for k in keys):
        return (
            f"an encoder-decoder model (decoder layers under {', '.join(decoder[:3])}), whose text decoder "
            "cross-attends to an encoder a causal-LM base does not have",
            _NO_LLM_HINT,
        )
    stacks = sorted({m.group(1) for k in keys if (m := _ANY_STACK.match(k))})
    if stacks:
        return (
            f"its layer stacks are under {', '.join(stacks[:4])}, which is not a decoder layout mmer reads "
            "(docs/layouts.md §1)",
            "mmer reads Llama/Qwen-style decoders (not a LoRA adapter or a frozen LLM); if one stack is such an LLM, "
            "save the model that holds it on its own (e.g. an omni model's thinker) and merge that",
        )
    hint = "mmer reads Llama/Qwen-style decoders; is this a LoRA adapter or a frozen-LLM model?"
    return "no stack of numbered layers at all", hint


def layer_index(canonical: str) -> int | None:
    """Decoder layer number of a canonical name, or ``None`` for embeddings, final norm and lm_head."""
    m = _LAYER.match(canonical)
    return int(m.group(1)) if m else None


def canonical_order(canonical: str) -> tuple[int, int, str]:
    """Sort key in model order: embeddings, then layers by number (not 1, 10, 2), final norm, lm_head."""
    layer = layer_index(canonical)
    if layer is not None:
        return (1, layer, canonical)
    if canonical.startswith("model.embed_tokens"):
        return (0, 0, canonical)
    if canonical.startswith("lm_head."):
        return (3, 0, canonical)
    return (2, 0, canonical)


def is_vocab_tensor(canonical: str) -> bool:
    """Embeddings and lm_head: row i belongs to token i, and models may append rows (new tokens)."""
    return canonical in ("model.embed_tokens.weight", "lm_head.weight")


def is_buffer_name(canonical: str) -> bool:
    """Derived buffers stored by old exporters; not parameters, never merged (every converter drops them)."""
    return canonical.endswith(".inv_freq")


MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "other")
_MODULE_PATTERNS = (
    ("q", re.compile(r"\.q_proj\.")),
    ("k", re.compile(r"\.k_proj\.")),
    ("v", re.compile(r"\.v_proj\.")),
    ("o", re.compile(r"\.o_proj\.")),
    ("gate", re.compile(r"\.(gate_proj|w1)\.")),
    ("up", re.compile(r"\.(up_proj|w3)\.")),
    ("down", re.compile(r"\.(down_proj|w2)\.")),
    ("embed", re.compile(r"embed_tokens\.")),
    ("lm_head", re.compile(r"^lm_head\.")),
    ("norm", re.compile(r"(norm|layernorm)[^.]*\.")),
)


def module_type(canonical: str) -> str:
    """Coarse module family of a canonical name (q/k/v/o/gate/up/down/embed/lm_head/norm/other)."""
    for name, pattern in _MODULE_PATTERNS:
        if pattern.search(canonical):
            return name
    return "other"
