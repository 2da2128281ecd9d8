"""What every tests/route module shares: the demo merged once, rebuilt once, and fixed model inputs.

tests/route has no conftest.py for the reason tests/cli gives (a second ``conftest`` module would shadow the
one tests/test_pipeline.py imports by name), so each module declares a one-line session fixture over these
functions; the work itself is cached here, once per test session.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import mmer
from mmer.config import build_recipe

_CACHE: dict[str, Any] = {}


def tiny_moe_module():
    """tests/extend/tiny_moe.py, loaded once (the test directories are not packages, so no import path)."""
    if "tiny_moe" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "extend" / "tiny_moe.py"
        spec = importlib.util.spec_from_file_location("tiny_moe", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["tiny_moe"] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules["tiny_moe"]


# The demo's shapes (mmer.demo): LLaVA with 28-pixel images in 14-pixel patches → 4 image tokens; Qwen2-Audio
# with 16 mel bins and 20 source positions → 40 mel frames → 10 audio tokens. 512 is each model's placeholder.
PLACEHOLDER = 512
IMAGE_TOKENS = 4
AUDIO_TOKENS = 10


def merged_checkpoint(demo_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's base, vision and audio models merged with the default options."""
    if "merged" not in _CACHE:
        out = tmp_path_factory.mktemp("route") / "merged"
        mmer.run_merge(build_recipe(list(demo_models.specs)), out)
        _CACHE["merged"] = out
    return _CACHE["merged"]


# Merge options that change what a modality's tensor is made of (FORMAT.md "Rebuilding a modality").
VARIANTS = {
    "emr-rescaled": {"method": "emr", "mask": "emr"},
    "single-model": {"mask": "none"},
    "vocab-excluded": {"vocab_policy": "exclude"},
    "fp32-tau-base-by-reference": {"delta_dtype": "float32", "base_storage": "reference"},
}


def variant_checkpoint(demo_models: Any, tmp_path_factory: pytest.TempPathFactory, variant: str) -> Path:
    """The demo merged with one of :data:`VARIANTS`' options."""
    key = f"variant-{variant}"
    if key not in _CACHE:
        out = tmp_path_factory.mktemp("route") / variant
        mmer.run_merge(build_recipe(list(demo_models.specs), **VARIANTS[variant]), out)
        _CACHE[key] = out
    return _CACHE[key]


def rebuilt_models(demo_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``reconstruct(merged, out)``: out/vision and out/audio."""
    if "rebuilt" not in _CACHE:
        from mmer.route.reconstruct import reconstruct

        out = tmp_path_factory.mktemp("route") / "rebuilt"
        reconstruct(merged_checkpoint(demo_models, tmp_path_factory), out)
        _CACHE["rebuilt"] = out
    return _CACHE["rebuilt"]


def model_inputs(modality: str, batch: int = 1) -> dict[str, torch.Tensor]:
    """Fixed inputs as each model's processor would produce them: text ids with the placeholders expanded."""
    g = torch.Generator().manual_seed(7)
    if modality == "vision":
        ids = [11, 12] + [PLACEHOLDER] * IMAGE_TOKENS + [13, 14, 15]
        return {
            "input_ids": torch.tensor([ids] * batch),
            "pixel_values": torch.randn(batch, 3, 28, 28, generator=g),
        }
    ids = [21, 22] + [PLACEHOLDER] * AUDIO_TOKENS + [23, 24]
    return {
        "input_ids": torch.tensor([ids] * batch),
        "input_features": torch.randn(batch, 16, 40, generator=g),
        "feature_attention_mask": torch.ones(batch, 40, dtype=torch.long),
    }


def model_class(modality: str) -> type:
    from transformers import LlavaForConditionalGeneration, Qwen2AudioForConditionalGeneration

    return LlavaForConditionalGeneration if modality == "vision" else Qwen2AudioForConditionalGeneration


def load_quietly(cls: type, path: Path) -> torch.nn.Module:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return cls.from_pretrained(path).eval()
