"""Tiny real checkpoints, built once per session: one LLM written in every layout mmer reads.

``write_model`` stores a canonical causal-LM state dict (``model.layers.N…``, ``lm_head.weight``) under any
layout's on-disk names, with component tensors beside it, as single or sharded safetensors or pickled
``.bin``; so the same fine-tune can be fed to a merge through each layout and the results compared bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmer.io.layouts import LAYOUTS
from mmer.synthetic import TINY_LLAMA, llama_shapes

HIDDEN = TINY_LLAMA["hidden_size"]
VOCAB = TINY_LLAMA["vocab_size"]


def canonical_shapes(vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    return llama_shapes({**TINY_LLAMA, "vocab_size": vocab})


def base_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * 0.1).to(dtype) for n, s in canonical_shapes().items()}


def finetune_state(
    base: dict[str, torch.Tensor], seed: int, density: float = 0.5, extra_rows: int = 0
) -> dict[str, torch.Tensor]:
    """base + a sparse seeded delta; ``extra_rows`` appends private vocabulary rows to embed and lm_head."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        delta = torch.randn(t.shape, generator=g) * 0.02 * (torch.rand(t.shape, generator=g) < density)
        new = (t.float() + delta).to(t.dtype)
        if extra_rows and name in ("model.embed_tokens.weight", "lm_head.weight"):
            new = torch.cat([new, torch.randn(extra_rows, t.shape[1], generator=g).to(t.dtype)])
        out[name] = new
    return out


def component_state(seed: int, prefix: str = "multi_modal_projector.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        prefix + "linear_1.weight": torch.randn(HIDDEN, 8, generator=g),
        prefix + "linear_1.bias": torch.randn(HIDDEN, generator=g),
    }


def write_model(
    directory: Path,
    llm: dict[str, torch.Tensor],
    layout: str = "causal_lm",
    components: dict[str, torch.Tensor] | None = None,
    fmt: str = "safetensors",
    shards: int = 1,
    config: dict | None = None,
    extra_files: Iterable[str] = ("tokenizer_config.json",),
) -> Path:
    """Write ``llm`` (canonical names) in ``layout`` plus ``components``, in ``fmt`` over ``shards`` files."""
    directory.mkdir(parents=True, exist_ok=True)
    lay = LAYOUTS[layout]
    state = {lay.to_disk(n): t.contiguous() for n, t in llm.items()}
    state |= components or {}
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    if shards == 1:
        files = [f"{stem}.{ext}"]
    else:
        files = [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for file, group in zip(files, groups, strict=True):
        part = {n: state[n] for n in group}
        if fmt == "safetensors":
            save_file(part, str(directory / file), metadata={"format": "pt"})
        else:
            torch.save(part, directory / file)
    if shards > 1:
        index = {"metadata": {}, "weight_map": {n: files[i] for i, g in enumerate(groups) for n in g}}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    cfg = dict(config if config is not None else TINY_LLAMA)
    if config is None and layout != "causal_lm":
        cfg = {"model_type": "llava", "text_config": dict(TINY_LLAMA)}
    (directory / "config.json").write_text(json.dumps(cfg))
    for name in extra_files:
        (directory / name).write_text(json.dumps({"model_max_length": 64}))
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A base and two fine-tunes (vision adds 2 vocabulary rows, audio 1), in canonical form and on disk."""
    root = tmp_path_factory.mktemp("tiny")
    base = base_state()
    vision = finetune_state(base, seed=1, density=0.6, extra_rows=2)
    audio = finetune_state(base, seed=2, density=0.3, extra_rows=1)
    return {
        "root": root,
        "base": base,
        "vision": vision,
        "audio": audio,
        "vision_components": component_state(11),
        "audio_components": component_state(12, prefix="audio_tower."),
        "base_dir": write_model(root / "base", base),
        "vision_dir": write_model(root / "vision", vision, "hf_legacy", component_state(11)),
        "audio_dir": write_model(root / "audio", audio, "hf_legacy", component_state(12, prefix="audio_tower.")),
    }


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory):
    """The built-in demo: real transformers Qwen2 base, LLaVA and Qwen2-Audio models."""
    from mmer.demo import build_demo_models

    return build_demo_models(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache, made the active one, with offline mode on.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into ``huggingface_hub.constants`` at import time and
    ``snapshot_download`` reads ``constants.HF_HUB_CACHE`` when called, so the constants are patched as well as
    the environment (which mmer itself reads for HF_HUB_OFFLINE).
    """
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_model(cache: Path, repo_id: str, source: Path, commit: str) -> Path:
    """Put a model directory into a Hub cache as huggingface_hub lays it out (blobs by sha256, symlinks)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(source.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot
