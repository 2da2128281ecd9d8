"""MoExtend in miniature: teach a tiny text-only Mixtral to read handwritten digits, and compare with full fine-tuning.

1. Pretrain a tiny Mixtral-layout MoE language model (4 layers, 4 experts, top-2) on English text that ships
   with Python (``pydoc_data.topics``), character by character. This is the "pretrained MoE LLM".
2. The new modality: scikit-learn's 8×8 handwritten digits. A frozen random-feature encoder turns each image
   into 4 patch features; a projector (trained) maps them into the LM.
3. MoExtend: align the projector (stage a), tune only the routers to find the layers the digits disturb and
   keep the top half (stage b), add one expert per chosen layer copied from its most-used expert and train
   only the new experts, router rows, calibrations and the projector (stage c). Save the extension pack and
   load it back onto a fresh copy of the base.
4. Full fine-tuning of the same aligned model (projector + every LM weight, same data, steps and schedule),
   and MoExtend with a new expert in every layer (the paper's Table 3 "All layer" row).

Reported for each: trainable parameters, fine-tuning time, digit accuracy on held-out images, and forgetting,
the change of the loss on held-out text. A table and a PNG go to ``results/``.

Run: ``python examples/moextend/run.py`` (needs scikit-learn and matplotlib; about ten minutes on 2 CPU cores,
most of it pretraining; on a busy machine ``OMP_NUM_THREADS=1`` is much faster than 2 spinning threads).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmer.extend import (
    ExtendData,
    ExtendOptions,
    MoExtendModel,
    MoExtendRecipe,
    ProbeOptions,
    TrainOptions,
    align,
    evaluate,
    finetune,
    load_base,
    load_extension_pack,
    plan_extension,
    run_probe,
    set_trainable,
    train,
    write_pack,
)

HERE = Path(__file__).resolve().parent
PAD, BOS, EOS, IMAGE = 0, 1, 2, 3
PATCHES, FEATURE_DIM = 4, 32
TEXT_LENGTH = 64


# --------------------------------------------------------------------------------------------------------- text
def corpus() -> str:
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return "".join(c for c in text if c.isascii() and (c.isprintable() or c == "\n"))


class CharTokenizer:
    """One token per character, after the four special tokens."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text) | set("0123456789"))
        self.ids = {c: i + 4 for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 4

    def encode(self, text: str) -> list[int]:
        return [self.ids[c] for c in text]


def text_data(tokenizer: CharTokenizer, text: str, samples: int, seed: int) -> ExtendData:
    """Random windows of the text, each a BOS then TEXT_LENGTH - 1 characters; every token is a target."""
    ids = torch.tensor(tokenizer.encode(text))
    starts = torch.randint(0, len(ids) - TEXT_LENGTH, (samples,), generator=torch.Generator().manual_seed(seed))
    windows = torch.stack([ids[s : s + TEXT_LENGTH - 1] for s in starts.tolist()])
    return ExtendData(torch.cat([torch.full((samples, 1), BOS), windows], dim=1))


# ------------------------------------------------------------------------------------------------------- digits
def digit_features(images: torch.Tensor) -> torch.Tensor:
    """The frozen "encoder": 4 patches of 4×4 pixels → a fixed random projection with a tanh → [N, 4, 32]."""
    patches = images.reshape(-1, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(-1, PATCHES, 16) / 16.0
    projection = torch.randn(16, FEATURE_DIM, generator=torch.Generator().manual_seed(1234)) / 4.0
    return torch.tanh(patches @ projection)


def digit_data(tokenizer: CharTokenizer, images: torch.Tensor, digits: torch.Tensor, template: str) -> ExtendData:
    """BOS, 4 image placeholders, the prompt, then the answer digit and EOS: only those two are targets."""
    prompt = tokenizer.encode(template)
    rows, labels = [], []
    for digit in digits.tolist():
        answer = tokenizer.encode(str(digit))
        row = [BOS] + [IMAGE] * PATCHES + prompt + answer + [EOS]
        rows.append(row)
        labels.append([-100] * (len(row) - 2) + answer + [EOS])
    return ExtendData(
        torch.tensor(rows),
        labels=torch.tensor(labels),
        features=digit_features(images),
        placeholder_id=IMAGE,
    )


def digit_accuracy(model: MoExtendModel, data: ExtendData) -> float:
    """Share of images whose most likely answer token is the right digit."""
    with torch.no_grad():
        logits = model(data.input_ids, data.attention_mask, data.features).logits
    answer_position = data.input_ids.shape[1] - 3  # predicts the digit at position -2
    predicted = logits[:, answer_position].argmax(-1)
    return float((predicted == data.labels[:, -2]).float().mean())


# -------------------------------------------------------------------------------------------------------- model
def tiny_mixtral(vocab: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    # An MoE LLM (MoExtend adds experts to one), so not mmer.synthetic's dense Llama.
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(config)


def options(steps: int, lr: float, batch: int = 32, seed: int = 0) -> TrainOptions:
    return TrainOptions(
        steps=steps,
        learning_rate=lr,
        batch_size=batch,
        warmup_ratio=0.03,
        device="auto",
        mixed_precision="auto",
        log_every=0,
        seed=seed,
    )


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps of every method")
    parser.add_argument("--probe-steps", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=None, help="where the base and the pack go (default: temp)")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="moextend-example-"))
    args.results.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # 1. the "pretrained" MoE LM
    text = corpus()
    split = int(len(text) * 0.9)
    tokenizer = CharTokenizer(text)
    train_text, held_text = text_data(tokenizer, text[:split], 20000, 1), text_data(tokenizer, text[split:], 512, 2)
    if not (workdir / "base" / "config.json").is_file():  # a --workdir from an earlier run keeps its base
        lm = tiny_mixtral(len(tokenizer))
        model = MoExtendModel(lm)
        started = time.perf_counter()
        steps = options(args.pretrain_steps, 3e-3)
        pretrain = train(model, set_trainable(model, "full"), train_text, steps, stage="pretrain")
        print(f"pretrained in {time.perf_counter() - started:.0f} s: text loss {pretrain.lm_losses[-1]:.3f}")
        lm.save_pretrained(workdir / "base")
    text_before = evaluate(MoExtendModel(load_base(workdir / "base")), held_text, 64)["loss"]

    # 2. the new modality
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = torch.tensor(digits.images, dtype=torch.float32), torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))
    cut = int(len(order) * 0.7)
    fit, test = order[:cut], order[cut:]
    captions = digit_data(tokenizer, images[fit], labels[fit], " a handwritten ")
    questions = digit_data(tokenizer, images[fit], labels[fit], " which digit? ")
    test_questions = digit_data(tokenizer, images[test], labels[test], " which digit? ")

    # 3. MoExtend: align → probe → extend → finetune → pack
    recipe = MoExtendRecipe(
        align=options(200, 1e-3),
        probe=options(args.probe_steps, 1e-3),
        finetune=options(args.steps, 1e-3),
        selection=ProbeOptions(fraction=0.5),
        extend=ExtendOptions(modality="digits"),
    )
    aligned, align_report = align(load_base(workdir / "base"), captions, options=recipe.align)
    aligned_projector = copy.deepcopy(aligned.projector.state_dict())
    print(f"aligned: digit accuracy with the projector alone {digit_accuracy(aligned, test_questions):.1%}")
    started = time.perf_counter()
    probe = run_probe(aligned, questions, recipe.probe, recipe.selection)
    probe_seconds = time.perf_counter() - started
    plan = plan_extension(aligned, recipe.extend, probe)
    print(
        f"probe: d_j = { {k: round(v, 4) for k, v in probe.scores.items()} } → layers {plan.layers}, "
        f"sources {plan.sources}"
    )
    moextend = finetune(aligned, questions, plan, recipe)
    pack = write_pack(
        aligned,
        workdir / "pack",
        modality="digits",
        extend_options=recipe.extend,
        selection=plan.to_dict(),
        training={"finetune": moextend.to_dict()},
        overwrite=True,
    )
    reloaded = load_extension_pack(load_base(workdir / "base"), pack)
    assert torch.equal(
        reloaded(test_questions.input_ids, None, test_questions.features).logits,
        aligned(test_questions.input_ids, None, test_questions.features).logits,
    ), "the pack must reproduce the trained model"
    rows = {
        "MoExtend": {
            "trainable parameters": moextend.trainable_parameters,
            "fine-tuning seconds": moextend.seconds,
            "extra probe seconds": probe_seconds,
            "digit accuracy": digit_accuracy(reloaded, test_questions),
            "text loss change": evaluate(reloaded, held_text, 64)["loss"] - text_before,
        }
    }

    # 4. full fine-tuning of the same aligned model (projector + all of the LM)
    full = MoExtendModel(load_base(workdir / "base"), copy.deepcopy(aligned.projector), IMAGE)
    full.projector.load_state_dict(aligned_projector)
    full_report = train(full, set_trainable(full, "full"), questions, recipe.finetune, stage="full fine-tuning")
    rows["full fine-tuning"] = {
        "trainable parameters": full_report.trainable_parameters,
        "fine-tuning seconds": full_report.seconds,
        "extra probe seconds": 0.0,
        "digit accuracy": digit_accuracy(full, test_questions),
        "text loss change": evaluate(full, held_text, 64)["loss"] - text_before,
    }

    # 5. MoExtend with a new expert in every layer (Table 3's "All layer"), no probe needed
    every = MoExtendModel(load_base(workdir / "base"), copy.deepcopy(aligned.projector), IMAGE)
    every.projector.load_state_dict(aligned_projector)
    all_recipe = replace(recipe, extend=replace(recipe.extend, layers="all"))
    all_plan = plan_extension(every, all_recipe.extend, probe)  # the same κ′ statistics choose the sources
    all_report = finetune(every, questions, all_plan, all_recipe)
    rows["MoExtend, all layers"] = {
        "trainable parameters": all_report.trainable_parameters,
        "fine-tuning seconds": all_report.seconds,
        "extra probe seconds": 0.0,
        "digit accuracy": digit_accuracy(every, test_questions),
        "text loss change": evaluate(every, held_text, 64)["loss"] - text_before,
    }
    base_parameters = count(load_base(workdir / "base"))
    report(rows, args, base_parameters, text_before, plan.layers, align_report.trainable_parameters)


def report(rows: dict, args, base_parameters: int, text_before: float, layers: list[int], projector: int) -> None:
    header = "| method | trainable parameters | fine-tuning time | digit accuracy | text loss change (forgetting) |"
    lines = [header, "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        share = r["trainable parameters"] / (base_parameters + projector)
        probe = f" (+{r['extra probe seconds']:.0f} s probe)" if r["extra probe seconds"] else ""
        lines.append(
            f"| {name} | {r['trainable parameters']:,} ({share:.1%}) | {r['fine-tuning seconds']:.0f} s{probe} | "
            f"{r['digit accuracy']:.1%} | {r['text loss change']:+.4f} |"
        )
    note = (
        f"Base: {base_parameters:,} parameters, held-out text loss {text_before:.4f} nats/char before fine-tuning. "
        f"MoExtend extended layers {layers}. {args.steps} fine-tuning steps each, same data and schedule."
    )
    table = "\n".join(lines) + "\n\n" + note + "\n"
    (args.results / "results.md").write_text(table)
    summary = {"rows": rows, "layers": layers, "text_loss_before": text_before, "steps": args.steps}
    (args.results / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    metrics = [
        ("trainable parameters", "trainable parameters"),
        ("fine-tuning seconds", "fine-tuning time (s)"),
        ("digit accuracy", "digit accuracy (held out)"),
        ("text loss change", "text loss change (forgetting)"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        values = [rows[n][key] for n in names]
        ax.bar(names, values, color=["tab:blue", "tab:orange", "tab:green"][: len(names)])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7, rotation=15)
    fig.suptitle("MoExtend vs full fine-tuning: tiny Mixtral + sklearn digits")
    fig.tight_layout()
    fig.savefig(args.results / "results.png", dpi=120)


if __name__ == "__main__":
    main()
