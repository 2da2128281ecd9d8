"""A small built-in example: a tiny base LLM and two multimodal models fine-tuned from it, made on the spot.

``mmer demo`` runs the whole pipeline on them with no download: a tiny Qwen2 base, a LLaVA-style vision model
(llava-hf layout, two added vocabulary rows) and a Qwen2-Audio model (one added row), all real transformers
classes saved with ``save_pretrained``. Their LLMs are the base plus seeded deltas shaped like full
fine-tunes (dense, but for the embedding rows of unused tokens) that agree on a shared direction and conflict
elsewhere, so the trim, TIES and the masks all have real work to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mmer.io.workdir import DEMO_KIND, claim_workdir

# Not mmer.synthetic.TINY_LLAMA, on purpose: LLaVA and Qwen2-Audio wrap a Qwen2 LLM here, and four layers of
# width 64 leave inspect-masks a per-layer footprint worth showing.
TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


# Share of the base vocabulary a demo fine-tune's training text never used (their embedding rows stay unchanged).
UNUSED_TOKENS = 0.3


def vision_density(name: str) -> float:
    """The demo vision model rewrites attention, more so in later layers."""
    from mmer.io.layouts import layer_index, module_type

    layer = layer_index(name)
    depth = 0.5 if layer is None else (layer + 1) / TEXT_CONFIG["num_hidden_layers"]
    return (0.7 if module_type(name) in ("q", "k", "v", "o") else 0.15) * depth


def audio_density(name: str) -> float:
    """The demo audio model touches little, mostly early MLPs (MMER's audio mask kept 2.2 % in the paper)."""
    from mmer.io.layouts import layer_index, module_type

    layer = layer_index(name)
    early = 0.5 if layer is None else 1.0 - layer / TEXT_CONFIG["num_hidden_layers"]
    return (0.35 if module_type(name) in ("gate", "up", "down") else 0.03) * early


@dataclass(frozen=True)
class DemoModels:
    """Paths of the demo's models and of their YAML specs."""

    root: Path
    base: Path
    vision: Path
    audio: Path
    specs: tuple[Path, Path, Path]


def _text_config(vocab_extra: int = 0):
    from transformers import Qwen2Config

    return Qwen2Config(**{**TEXT_CONFIG, "vocab_size": TEXT_CONFIG["vocab_size"] + vocab_extra})


def fine_tune_deltas(
    base_state: dict[str, torch.Tensor], seed: int, density: Callable[[str], float], scale: float = 0.02
) -> dict[str, torch.Tensor]:
    """Seeded stand-ins for a full fine-tune: every entry moves, except the embedding rows of unused tokens.

    As in a real full fine-tune, τᵢ is dense (every weight gets gradient, so almost no entry of τᵢ is exactly
    zero) and the embedding rows of tokens the training text never used stay exactly as they were; a fixed
    share of the base vocabulary (:data:`UNUSED_TOKENS`, drawn per model) plays them. So TIES' global top-K
    (TIES §3) has entries to trim and the default K = 0.8 trims: the untouched rows are far less than 1 − K of
    the model. The delta is a direction every model shares, a small dense drift of its own, and a larger sparse
    part where its task lives: ``density(name)`` says how much of each tensor that part touches, so each demo
    modality leaves its own footprint across layers and modules for ``inspect-masks`` to show.
    """
    from mmer.io.layouts import module_type

    shared = torch.Generator().manual_seed(1234)
    own = torch.Generator().manual_seed(seed)
    deltas = {}
    for name in sorted(base_state):
        t = base_state[name]
        common = torch.randn(t.shape, generator=shared) * scale * 0.25
        drift = torch.randn(t.shape, generator=own) * scale * 0.1
        specific = torch.randn(t.shape, generator=own) * scale * 2.0
        keep = torch.rand(t.shape, generator=own) < density(name)
        delta = common + drift + specific * keep
        if module_type(name) == "embed":  # input rows of tokens no training text used get no gradient
            delta[torch.rand(t.shape[0], generator=own) < UNUSED_TOKENS] = 0.0
        deltas[name] = delta
    return deltas


def _apply(model, base_state: dict[str, torch.Tensor], seed: int, density: Callable[[str], float]) -> None:
    """Set the MLLM's LLM to base + deltas; rows past the base vocabulary keep their own random values."""
    from mmer.io.layouts import detect_layout

    deltas = fine_tune_deltas(base_state, seed, density)
    state = model.state_dict()
    layout = detect_layout(set(state), type(model).__name__)  # the in-memory tree of this transformers version
    with torch.no_grad():
        for name, base in base_state.items():
            target = state[layout.to_disk(name)]
            target[: base.shape[0]].copy_(base + deltas[name])


__all__ = ["DEMO_KIND", "DemoModels", "build_demo_models", "claim_workdir", "fine_tune_deltas"]  # claim_workdir: io's


def build_demo_models(root: str | Path, seed: int = 0) -> DemoModels:
    """Write the base, vision and audio models and their YAML specs under ``root`` (idempotent).

    ``root`` must be new, empty or an earlier demo work directory (see :func:`claim_workdir`).
    """
    root = claim_workdir(root)  # before the slow imports: a refusal should be instant
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2ForCausalLM,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    paths = DemoModels(
        root,
        root / "base",
        root / "vision",
        root / "audio",
        (root / "base.yaml", root / "vision.yaml", root / "audio.yaml"),
    )
    if all((p / "config.json").is_file() for p in (paths.base, paths.vision, paths.audio)) and all(
        s.is_file() for s in paths.specs
    ):
        return paths
    torch.manual_seed(seed)
    base = Qwen2ForCausalLM(_text_config()).eval()
    base.save_pretrained(paths.base)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    vision_config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        text_config=_text_config(vocab_extra=2),
        image_token_index=TEXT_CONFIG["vocab_size"],
        projector_hidden_act="gelu",
    )
    vision = LlavaForConditionalGeneration(vision_config).eval()
    _apply(vision, base_state, seed + 1, vision_density)
    vision.save_pretrained(paths.vision)

    audio_config = Qwen2AudioConfig(
        audio_config=dict(
            d_model=32,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=20,
        ),
        text_config=_text_config(vocab_extra=1).to_dict(),
        audio_token_index=TEXT_CONFIG["vocab_size"],
    )
    audio = Qwen2AudioForConditionalGeneration(audio_config).eval()
    _apply(audio, base_state, seed + 2, audio_density)
    audio.save_pretrained(paths.audio)

    for spec, data in zip(
        paths.specs,
        (
            {"model": str(paths.base)},
            {"model": str(paths.vision), "modality": "vision"},
            {"model": str(paths.audio), "modality": "audio", "lambda": 0.8},
        ),
        strict=True,
    ):
        spec.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return paths
