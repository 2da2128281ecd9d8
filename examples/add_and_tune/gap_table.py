#!/usr/bin/env python
"""Measure how far `mmer add` with stand-ins lands from the exact re-merge, on small synthetic models.

    python examples/add_and_tune/gap_table.py [--workdir DIR]

The models are the test suite's tiny ones (a 2-layer LLM, hidden size 16, seeded sparse fine-tuning deltas):
vision (60 % of weights changed, 2 extra vocabulary rows), audio (30 %, 1 row), a new *task* of vision (the
vision model changed again on 25 % of its weights, σ = 0.02) and a new *modality* (video, 50 %). For each case
the checkpoint of the old models is merged, the new model(s) added once with the originals (exact, equal to
merging everything from scratch) and once from the checkpoint alone (stand-ins), and `measure_gap` compares
the two; each modality's own reconstruction error ‖θ̂ᵢ − θᵢ‖₁ / ‖τᵢ‖₁ is shown for both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import mmer
from mmer.add import add_models
from mmer.add.gap import measure_gap
from mmer.config import MergeOptions, ModelSpec, Recipe
from mmer.synthetic import TINY_LLAMA, llama_shapes

HIDDEN, VOCAB = TINY_LLAMA["hidden_size"], TINY_LLAMA["vocab_size"]


def base_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) * 0.1 for n, s in llama_shapes(TINY_LLAMA).items()}


def fine_tune(base: dict[str, torch.Tensor], seed: int, density: float, rows: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        new = t + torch.randn(t.shape, generator=g) * 0.02 * (torch.rand(t.shape, generator=g) < density)
        if rows and name in ("model.embed_tokens.weight", "lm_head.weight"):
            new = torch.cat([new, torch.randn(rows, t.shape[1], generator=g)])
        out[name] = new
    return out


def write(directory: Path, llm: dict[str, torch.Tensor], component: str | None = None, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {n: t.contiguous() for n, t in llm.items()}
    if component is not None:
        g = torch.Generator().manual_seed(seed)
        state[f"{component}.weight"] = torch.randn(HIDDEN, 8, generator=g)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA))
    return directory


def recipe(base: Path, models: dict[str, Path], k: float) -> Recipe:
    specs = tuple(ModelSpec(str(p), modality=m) for m, p in models.items())
    return Recipe(ModelSpec(str(base)), specs, MergeOptions(k=k, hash_inputs=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    root = parser.parse_args().workdir or Path(tempfile.mkdtemp(prefix="mmer-gap-"))
    base = base_state()
    vision = fine_tune(base, 1, 0.6, rows=2)
    g = torch.Generator().manual_seed(5)
    task = {n: t + torch.randn(t.shape, generator=g) * 0.02 * (torch.rand(t.shape, generator=g) < 0.25)
            for n, t in vision.items()}  # fmt: skip
    paths = {
        "base": write(root / "base", base),
        "vision": write(root / "vision", vision, "multi_modal_projector", 11),
        "audio": write(root / "audio", fine_tune(base, 2, 0.3, rows=1), "audio_tower", 12),
        "vision_task": write(root / "vision_task", task, "multi_modal_projector", 11),
        "video": write(root / "video", fine_tune(base, 4, 0.5), "video_tower", 13),
    }
    old = {"vision": paths["vision"], "audio": paths["audio"]}
    cases = [
        ("new task of vision, K=0.8", ["vision_task"], 0.8),
        ("new modality, K=0.8", ["video"], 0.8),
        ("new task of vision, K=0.2", ["vision_task"], 0.2),
        ("task + modality at once, K=0.8", ["vision_task", "video"], 0.8),
    ]
    print("| case | τ* rel. ℓ1 diff. | mask agreement | rebuild error exact → stand-in |")
    print("|---|---|---|---|")
    for n, (label, added, k) in enumerate(cases):
        case = root / f"case{n}"
        mmer.run_merge(recipe(paths["base"], old, k), case / "merged")
        specs = [ModelSpec(str(paths[m]), modality=m) for m in added]
        add_models(case / "merged", specs, case / "exact")
        add_models(case / "merged", specs, case / "standin", mode="standin")
        print(row(label, measure_gap(case / "exact", case / "standin", paths)))
    # Two adds in a row from the artifact alone (stand-ins of stand-ins) vs one exact merge of all four.
    chain = root / "chain"
    mmer.run_merge(recipe(paths["base"], old, 0.8), chain / "merged")
    add_models(chain / "merged", [ModelSpec(str(paths["vision_task"]), modality="vision_task")], chain / "one",
               mode="standin")  # fmt: skip
    add_models(chain / "one", [ModelSpec(str(paths["video"]), modality="video")], chain / "two", mode="standin")
    everything = {m: paths[m] for m in ("vision", "audio", "vision_task", "video")}
    mmer.run_merge(recipe(paths["base"], everything, 0.8), chain / "exact")
    print(row("two adds in a row, K=0.8", measure_gap(chain / "exact", chain / "two", paths)))


def row(label: str, gap) -> str:
    agree = ", ".join(f"{m} {g['mask_agreement']:.3f}" for m, g in gap.modalities.items())
    error = ", ".join(f"{m} {g['error_a']:.3f} → {g['error_b']:.3f}" for m, g in gap.modalities.items())
    return f"| {label} | {gap.tau_star_rel_l1:.3f} | {agree} | {error} |"


if __name__ == "__main__":
    main()
