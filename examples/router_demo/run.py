#!/usr/bin/env python
"""Merge two tiny multimodal LLMs, then run both from one shared LLM with mmer's router.

    python examples/router_demo/run.py [--workdir DIR] [--device cpu|cuda]

Builds (with transformers, no download) a tiny Qwen2 base LLM, a llava-hf vision model and a Qwen2-Audio model
fine-tuned from it, merges them into a decoupled checkpoint, and then:

1. retention: runs the vision model on an image and the audio model on an audio clip through one Router,
   which switches modality by rebuilding θ_base + mᵢ∘τ* in place;
2. expansion: one prompt mixing text, the image and the audio clip, every token on its own modality's weights;
3. reconstruct: writes the vision model back out as a checkpoint `from_pretrained` loads unchanged.

The models are random, so the generated ids mean nothing; what matters is that every step runs and agrees.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import mmer
from mmer.config import build_recipe
from mmer.demo import build_demo_models
from mmer.route.reconstruct import reconstruct_modality
from mmer.route.router import Router

PLACEHOLDER = 512  # both demo models put their features where the token id 512 stands


def image_inputs() -> dict[str, torch.Tensor]:
    """What LlavaProcessor would give for one 28×28 image: the <image> token repeated once per patch feature.

    CLIP with 28-pixel images and 14-pixel patches gives 2×2 = 4 patch features (the class token is dropped),
    so the prompt holds 4 placeholders; pixel_values are the normalised image, here random.
    """
    ids = [1, 2] + [PLACEHOLDER] * 4 + [3, 4]
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels}


def audio_inputs() -> dict[str, torch.Tensor]:
    """What Qwen2AudioProcessor would give for one clip: 16 mel bins × 40 frames (the tiny encoder's fixed
    length, 2 × max_source_positions), every frame valid, and the <|AUDIO|> token once per output feature:
    the encoder's stride-2 convolution and pooling turn 40 frames into 10 features."""
    ids = [5, 6] + [PLACEHOLDER] * 10 + [7, 8]
    return {
        "input_ids": torch.tensor([ids]),
        "input_features": torch.randn(1, 16, 40, generator=torch.Generator().manual_seed(2)),
        "feature_attention_mask": torch.ones(1, 40, dtype=torch.long),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where models and outputs go (default: temp)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="mmer-router-demo-"))

    models = build_demo_models(root)
    merged = root / "merged"
    report = mmer.run_merge(build_recipe(list(models.specs)), merged, overwrite=True)
    for m in report.modalities:
        print(f"merged {m.name}: mask keeps {m.density:.1%} of the LLM")

    # 1. Retention: one LLM on the device, each modality rebuilt from θ_base when it is asked for.
    router = Router.from_pretrained(merged, device=args.device)
    image, audio = image_inputs(), audio_inputs()
    for modality, inputs in (("vision", image), ("audio", audio), ("vision", image)):
        inputs = {k: v.to(args.device) for k, v in inputs.items()}
        out = router.generate(**inputs, modality=modality, max_new_tokens=8, do_sample=False)
        print(
            f"{modality:6s} generate -> {out[0, inputs['input_ids'].shape[1] :].tolist()} "
            f"(switch rebuilt {router.last_switch_rebuilt} tensors in {router.last_switch_seconds * 1e3:.0f} ms)"
        )
    held = router.nbytes()
    print("router holds: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in held.items()))

    # 2. Expansion: text, image and audio tokens in one sequence, each on its own weights; text on the mean mask.
    expansion = router.expansion()
    mixed = expansion.embed(
        [
            torch.tensor([[10, 11, 12]]),
            ("vision", image),
            torch.tensor([[13]]),
            ("audio", audio),
            torch.tensor([[14, 15]]),
        ]
    )
    print(f"mixed prompt groups: {mixed.token_modality[0].tolist()}  (0 text, 1 vision, 2 audio)")
    print(f"expansion generate -> {expansion.generate(mixed, max_new_tokens=8, do_sample=False)[0].tolist()}")

    # 3. Reconstruct: a standalone llava-hf checkpoint, in the source's own key names.
    from transformers import LlavaForConditionalGeneration

    reconstruct_modality(merged, "vision", root / "vision-rebuilt", overwrite=True)
    rebuilt = LlavaForConditionalGeneration.from_pretrained(root / "vision-rebuilt").eval()
    with torch.no_grad():
        same = torch.equal(rebuilt(**image).logits, router(**image, modality="vision").logits.cpu())
    print(f"rebuilt checkpoint at {root / 'vision-rebuilt'}; its logits equal the router's: {same}")


if __name__ == "__main__":
    main()
