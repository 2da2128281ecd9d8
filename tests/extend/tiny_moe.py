"""Tiny real transformers MoE models and data for the extend tests (no conftest here: see tests/cli).

Every builder is deterministic (seeded) and cheap (hidden 32, ≤ 4 layers, 4 experts, vocabulary 48), so each
test builds what it needs; the on-disk copies are cached per session under one temporary directory.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from mmer.extend import ExtendData, TrainOptions

VOCAB = 48
HIDDEN = 32
PLACEHOLDER = 3
FEATURES = 3  # feature vectors per sample
FEATURE_DIM = 10
FAMILY_NAMES = ("mixtral", "qwen2_moe", "olmoe")

_ROOT = Path(tempfile.mkdtemp(prefix="mmer-extend-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run each extend test module on one thread (import it into the module to activate it).

    Tiny models gain nothing from a second thread, and on a busy machine OpenMP's spinning threads make them
    up to a hundred times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_lm(family: str = "mixtral", seed: int = 0, layers: int = 4) -> nn.Module:
    """A randomly initialised tiny causal LM of ``family``; Qwen2-MoE's layer 1 is a dense MLP."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        OlmoeConfig,
        OlmoeForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

    common = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if family == "mixtral":
        config, cls = MixtralConfig(intermediate_size=48, num_local_experts=4, **common), MixtralForCausalLM
    elif family == "qwen2_moe":
        config = Qwen2MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            **common,
        )
        cls = Qwen2MoeForCausalLM
    elif family == "olmoe":
        config, cls = (
            OlmoeConfig(intermediate_size=24, num_experts=4, norm_topk_prob=False, **common),
            OlmoeForCausalLM,
        )
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    lm = cls(config).eval()
    with torch.no_grad():  # spread the routers (Qwen2-MoE and OLMoE start theirs at zero): no exact logit ties
        for layer in lm.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "top_k"):
                gate.weight.normal_(0.0, 0.5)
    return lm


@functools.cache
def saved_lm(family: str = "mixtral", seed: int = 0) -> Path:
    """``build_lm(family, seed)`` written with ``save_pretrained`` (once per session)."""
    path = _ROOT / f"{family}-{seed}"
    build_lm(family, seed).save_pretrained(path)
    return path


def load_lm(family: str = "mixtral", seed: int = 0) -> nn.Module:
    """A fresh copy of the saved model, read back from disk with stock transformers."""
    from mmer.extend import load_base

    return load_base(saved_lm(family, seed))


def make_data(n: int = 24, length: int = 12, seed: int = 1, features: bool = True) -> ExtendData:
    """Random token sequences, 3 placeholder slots at positions 1-3, some right-padding, features."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(0, n, 3):  # every third sample is 3 tokens shorter
        ids[i, -3:] = 0
        mask[i, -3:] = 0
    if not features:
        return ExtendData(ids, attention_mask=mask)
    ids[:, 1 : 1 + FEATURES] = PLACEHOLDER
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, 1 : 1 + FEATURES] = -100
    return ExtendData(
        ids,
        labels=labels,
        attention_mask=mask,
        features=torch.randn(n, FEATURES, FEATURE_DIM, generator=g),
        placeholder_id=PLACEHOLDER,
    )


def make_mixed_data(n: int = 12, text_every: int = 3) -> tuple[ExtendData, torch.Tensor]:
    """``make_data(n)`` with every ``text_every``-th sample (1, 1 + text_every, ...) a text-only one (no
    placeholder, no features, ``feature_mask`` 0); returns (data, which samples are text-only)."""
    digits, text = make_data(n), make_data(n, seed=2, features=False)
    is_text = torch.arange(n) % text_every == 1

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(is_text[:, None], b, a)

    data = ExtendData(
        pick(digits.input_ids, text.input_ids),
        labels=pick(digits.labels, text.labels),
        attention_mask=pick(digits.attention_mask, text.attention_mask),
        features=digits.features[~is_text],
        placeholder_id=PLACEHOLDER,
        feature_mask=(~is_text).long(),
    )
    return data, is_text


def quick(steps: int = 3, **changes) -> TrainOptions:
    """A few CPU steps with a learning rate large enough to move the tiny weights."""
    values = {
        "steps": steps,
        "batch_size": 8,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "device": "cpu",
        "mixed_precision": "no",
        "log_every": 0,
    }
    return TrainOptions(**(values | changes))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
