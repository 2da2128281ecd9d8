#!/usr/bin/env python
"""Add a new task to a decoupled checkpoint, with and without the original models, then tune λ and K.

    python examples/add_and_tune/run.py [--workdir DIR] [--jobs 2]

Builds the tiny demo models (`mmer demo`'s Qwen2 base, llava-hf vision and Qwen2-Audio models; no download) and
a fourth one, the vision model fine-tuned further on a "new task" (its LLM moved again, its encoder and
projector untouched, as in MMER §3.2.3), then:

1. merges base + vision + audio into `merged/`;
2. adds the new task with the originals at hand (`mmer add`, exact: equal to merging all four from scratch),
   and again with only `merged/` at hand (stand-ins θ̂ᵢ = θ_base + mᵢ∘τ* for vision and audio);
3. measures how far the stand-in result is from the exact one (τ*, masks, each modality's rebuild error);
4. tunes λ per modality and K on the exact checkpoint with the reconstruction proxy, then with a score
   function of its own (`score.py`), in parallel, and merges again with the chosen values.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import yaml

import mmer
from mmer.add import add_models
from mmer.add.gap import measure_gap
from mmer.config import build_recipe, load_recipe
from mmer.demo import build_demo_models
from mmer.tune import run_tune, write_plot

HERE = Path(__file__).resolve().parent


def new_task_model(root: Path, vision: Path, base: Path) -> Path:
    """The vision MLLM fine-tuned on one more task: its LLM moves by another seeded sparse delta (a quarter of
    the weights, σ = 0.02), its vision tower and projector stay as they were."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    from mmer.io.layouts import detect_layout

    out = root / "vision_caption"
    if (out / "config.json").is_file():
        return out
    base_state = AutoModelForCausalLM.from_pretrained(base).state_dict()
    model = LlavaForConditionalGeneration.from_pretrained(vision)
    state = model.state_dict()
    layout = detect_layout(set(state), type(model).__name__)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, base in base_state.items():
            delta = torch.randn(base.shape, generator=g) * 0.02 * (torch.rand(base.shape, generator=g) < 0.25)
            state[layout.to_disk(name)][: base.shape[0]] += delta
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where models and outputs go (default: temp)")
    parser.add_argument("--jobs", type=int, default=2, help="workers for the custom score")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="mmer-add-tune-"))
    models = build_demo_models(root)
    caption = new_task_model(root, models.vision, models.base)
    spec = root / "vision_caption.yaml"
    spec.write_text(yaml.safe_dump({"model": str(caption), "modality": "vision_caption"}), encoding="utf-8")

    # 1. The checkpoint a user has: base + vision + audio.
    mmer.run_merge(build_recipe(list(models.specs)), root / "merged", overwrite=True)

    # 2. Add the new task: exactly (originals at hand), then with stand-ins only.
    exact = add_models(root / "merged", [spec], root / "exact", overwrite=True)
    approx = add_models(root / "merged", [spec], root / "standin", mode="standin", overwrite=True)
    for name, report in (("exact", exact), ("stand-in", approx)):
        old = ", ".join(
            f"{m}: {o.source}, mask {o.density_before:.1%} -> {o.density_after:.1%}" for m, o in report.old.items()
        )
        added = ", ".join(f"{m} ({a['kind']})" for m, a in report.added.items())
        print(f"add ({name}): {old}; added {added}")

    # 3. How far the stand-ins take the merge from the paper's exact re-merge.
    originals = {"vision": models.vision, "audio": models.audio, "vision_caption": caption}
    gap = measure_gap(root / "exact", root / "standin", originals)
    print(f"\nstand-in vs exact: τ* relative ℓ1 difference {gap.tau_star_rel_l1:.4f}")
    print(f"{'modality':16s} {'mask agree':>10s} {'rebuild Δ':>10s} {'err exact':>10s} {'err stand-in':>12s}")
    for m, g in gap.modalities.items():
        print(
            f"{m:16s} {g['mask_agreement']:10.4f} {g['rebuild_rel_l1']:10.4f} {g['error_a']:10.4f} "
            f"{g['error_b']:12.4f}"
        )

    # 4. Tune λ per modality (and K) on the exact checkpoint: its τ* is reused for its own K.
    recon = run_tune(checkpoint=root / "exact", score="recon", ks=(0.6, 0.8, 1.0))
    print(f"\nrecon proxy: K={recon.best_k:g}, λ={recon.best_lambdas}")
    own = run_tune(
        checkpoint=root / "exact",
        score=f"{HERE / 'score.py'}:agreement",
        lambdas=(0.3, 0.9, 1.5),
        jobs=args.jobs,
    )
    print(f"score.py:agreement ({own.backend}, {own.jobs} jobs): K={own.best_k:g}, λ={own.best_lambdas}")
    write_plot(own, root / "tune.png")
    recipe_file = own.write_recipe(root / "tuned.yaml")
    mmer.run_merge(build_recipe([], recipe_file), root / "tuned", overwrite=True)
    _, specs, options = load_recipe(recipe_file)
    chosen = ", ".join(f"{s.modality} λ={s.lambda_:g}" for s in specs)
    print(f"merged again with {recipe_file.name}: K={options.k:g}, {chosen}")
    print(f"\noutputs in {root}")


if __name__ == "__main__":
    main()
