"""MoExtend's quick start: a tiny MoE LLM and a made-up new modality, built on the spot, all stages end to end.

``mmer extend demo`` needs no download and runs in seconds on a CPU: it writes a tiny Mixtral (transformers'
own class, 4 MoE layers of 4 experts, top-2) with ``save_pretrained``, training and held-out data files in the
format ``mmer extend`` reads (:mod:`mmer.extend.data`), and the recipe it trains with, then runs align (a),
the Extender's probe (b) and the new experts' fine-tune (c) exactly as ``mmer extend train`` does
(:func:`mmer.extend.run_moextend`), and measures the pack against the base. Every file it writes is one a
newcomer can point the other ``mmer extend`` commands at, or replace with their own.

The new modality: each sample carries :data:`PATCHES` feature vectors from one of :data:`CLASSES` noisy
clusters (a frozen encoder's output, as in the paper's §3); the text after them counts up from a token that
names the cluster. The base LM cannot know the cluster, so what the pack learns is read from the features.
The LM is randomly initialised: the numbers show the machinery, not a benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mmer.extend.data import ExtendData, load_data, save_data
from mmer.io.workdir import claim_workdir
from mmer.progress import NULL_PROGRESS, ProgressSink

PAD, BOS, PLACEHOLDER = 0, 1, 3
FIRST_TOKEN = 5
VOCAB = 48
HIDDEN = 32
PATCHES = 3
FEATURE_DIM = 16
CLASSES = 4
LENGTH = 12
TRAIN_SAMPLES = 96
HELD_OUT_SAMPLES = 32
DEMO_KIND = "extend-demo-workdir"
# A few steps per stage at a learning rate that moves tiny weights: the paper's defaults (Table 6) are for
# 665k samples and would take hours here. Written to recipe.yaml, which the run then reads back.
RECIPE: dict[str, Any] = {
    "align": {"steps": 30, "learning_rate": 0.01, "batch_size": 16, "warmup_ratio": 0.0, "log_every": 0},
    "probe": {"steps": 10, "learning_rate": 0.01, "batch_size": 16, "warmup_ratio": 0.0, "log_every": 0},
    "finetune": {"steps": 40, "learning_rate": 0.01, "batch_size": 16, "warmup_ratio": 0.0, "log_every": 0},
    "extend": {"modality": "clusters"},
    "projector": {"kind": "mlp2x_gelu"},
}
CPU_ONLY = {"device": "cpu", "mixed_precision": "no"}  # seconds either way; the same numbers on every machine


@dataclass(frozen=True)
class ExtendDemoFiles:
    """Where the demo's inputs are: the base LM, the data files and the recipe."""

    root: Path
    base: Path
    train: Path
    held_out: Path
    text: Path
    recipe: Path
    pack: Path


def tiny_mixtral(seed: int = 0):
    """A randomly initialised tiny Mixtral with routers spread apart (no exact ties in the top-2 routing)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = MixtralForCausalLM(config).eval()
        with torch.no_grad():
            for layer in lm.model.layers:
                layer.mlp.gate.weight.normal_(0.0, 0.5)
    return lm


def cluster_data(samples: int, seed: int, features: bool = True) -> ExtendData:
    """Samples of the made-up modality (``features``) or, without, the same kind of text alone (for forgetting)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURE_DIM, generator=torch.Generator().manual_seed(1234)) * 2.0
    label = torch.randint(0, CLASSES, (samples,), generator=g)
    start = 1 + PATCHES if features else 1
    ids = torch.full((samples, LENGTH), PAD, dtype=torch.long)
    ids[:, 0] = BOS
    steps = torch.arange(LENGTH - start)
    offset = label if features else torch.randint(0, VOCAB - FIRST_TOKEN, (samples,), generator=g)
    ids[:, start:] = FIRST_TOKEN + (offset[:, None] * 7 + steps[None, :] * 3) % (VOCAB - FIRST_TOKEN)
    if not features:
        return ExtendData(ids, attention_mask=torch.ones_like(ids))
    ids[:, 1:start] = PLACEHOLDER
    labels = ids.clone()
    labels[:, :start] = -100  # no loss on the placeholders; the first text token is the one the features decide
    noise = torch.randn(samples, PATCHES, FEATURE_DIM, generator=g) * 0.5
    return ExtendData(
        ids,
        labels=labels,
        attention_mask=torch.ones_like(ids),
        features=centres[label][:, None, :] + noise,
        placeholder_id=PLACEHOLDER,
    )


def build_extend_demo(root: str | Path) -> ExtendDemoFiles:
    """Write the base LM, the data and the recipe under ``root`` (new, empty or an earlier extend demo's)."""
    root = claim_workdir(root, kind=DEMO_KIND, writes="base/, train.safetensors, recipe.yaml, pack/ and more")
    files = ExtendDemoFiles(
        root,
        root / "base",
        root / "train.safetensors",
        root / "held_out.safetensors",
        root / "text.safetensors",
        root / "recipe.yaml",
        root / "pack",
    )
    if not (files.base / "config.json").is_file():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        tiny_mixtral().save_pretrained(files.base)
    save_data(files.train, cluster_data(TRAIN_SAMPLES, seed=1))
    save_data(files.held_out, cluster_data(HELD_OUT_SAMPLES, seed=2))
    save_data(files.text, cluster_data(HELD_OUT_SAMPLES, seed=3, features=False))
    recipe = {
        name: {**section, **CPU_ONLY} if name in ("align", "probe", "finetune") else section
        for name, section in RECIPE.items()
    }
    files.recipe.write_text(
        "# The recipe `mmer extend demo` trained with: a few steps per stage for a tiny model.\n"
        + yaml.safe_dump(recipe, sort_keys=False),
        encoding="utf-8",
    )
    return files


def run_extend_demo(root: str | Path, progress: ProgressSink | None = None) -> dict[str, Any]:
    """Build the demo's inputs, run every MoExtend stage into ``root/pack`` and evaluate it; returns a summary."""
    progress = progress or NULL_PROGRESS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from more, and spinning threads slow a busy machine
    try:
        return _run(root, progress)
    finally:
        torch.set_num_threads(threads)


def _run(root: str | Path, progress: ProgressSink) -> dict[str, Any]:
    from mmer.extend import MoExtendModel, evaluate, load_base, load_extension_pack, load_moextend_recipe
    from mmer.extend.stages import run_moextend

    files = build_extend_demo(root)
    recipe = load_moextend_recipe(files.recipe)
    result = run_moextend(
        load_base(files.base), load_data(files.train), files.pack, recipe, overwrite=True, progress=progress
    )
    held_out, text = load_data(files.held_out), load_data(files.text)
    trained = load_extension_pack(load_base(files.base), files.pack)
    summary = result.to_dict()
    summary["files"] = {name: str(getattr(files, name)) for name in ("base", "train", "held_out", "text", "recipe")}
    summary["held_out"] = evaluate(trained, held_out)
    summary["text"] = {"base": evaluate(MoExtendModel(load_base(files.base)), text), "pack": evaluate(trained, text)}
    return summary
