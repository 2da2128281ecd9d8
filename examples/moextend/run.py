"""MoExtend in miniature: teach a tiny text-only Mixtral to read handwritten digits, and measure what it forgets.

1. Pretrain a tiny Mixtral-layout MoE language model (4 layers, 4 experts, top-2) on English text that ships
   with Python (``pydoc_data.topics``), character by character. This is the "pretrained MoE LLM".
2. The new modality: scikit-learn's 8×8 handwritten digits. A frozen random-feature encoder turns each image
   into 4 patch features; a projector (trained) maps them into the LM. The fine-tuning mix also holds
   text-only samples (``--text-share``; LLaVA-665k's 40k ShareGPT conversations are 6 % of it).
3. For every seed: align the projector (stage a), run the Extender's probe (stage b, the paper's 1,000 steps),
   then fine-tune, from the same aligned projector, with the same data, steps and schedule:
   MoExtend on the probe's layers (its pack written and loaded back onto a fresh base), full fine-tuning
   (projector + every LM weight, the paper's "MoExtend-Full"), MoExtend on every layer, and the paper's
   Table 3 placements (first half, second half, every other layer).
4. The three main arms at each learning rate of ``--lrs`` (default: the paper's 2e-5 for this stage, and
   1e-3, which the miniature's 600 steps can move), the placements at ``--placement-lrs`` (default: 1e-3).

Reported per arm, as mean ± sample standard deviation over the seeds: trainable parameters, fine-tuning
time, digit accuracy on held-out images, and forgetting, the change of the loss on held-out text. Tables, a
JSON with every seed's numbers and the machine it ran on, and a PNG go to ``results/``.

Run: ``OMP_NUM_THREADS=1 python examples/moextend/run.py`` (needs scikit-learn and matplotlib; the README says
how long it took). ``--tiny`` is the suite's few-second version of the same code.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from mmer.extend import (
    ExtendData,
    ExtendDataset,
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
from mmer.extend.options import ALIGN_DEFAULTS, FINETUNE_DEFAULTS, PROBE_DEFAULTS

HERE = Path(__file__).resolve().parent
PAD, BOS, EOS, IMAGE = 0, 1, 2, 3
PATCHES, FEATURE_DIM = 4, 32
TEXT_LENGTH = 64  # pretraining and held-out text windows
QUESTION = " which digit? "
# Text-only training samples are as long as a digit question (BOS + 4 images + prompt + digit + EOS), so
# mixing them in pads nothing.
MIX_TEXT_LENGTH = 1 + PATCHES + len(QUESTION) + 2
LAYERS = 4
# The paper's Table 3 placements beside the probe's choice (half of the layers each) and all layers.
PLACEMENTS = {"first half": (0, 1), "second half": (2, 3), "every other": (0, 2)}
MAIN_ARMS = ("MoExtend", "full fine-tuning", "MoExtend, all layers")
PAPER_LR = FINETUNE_DEFAULTS.learning_rate
MINIATURE_LR = 1e-3


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


def text_data(tokenizer: CharTokenizer, text: str, samples: int, seed: int, length: int = TEXT_LENGTH) -> ExtendData:
    """Random windows of the text, each a BOS then ``length - 1`` characters; every token is a target."""
    ids = torch.tensor(tokenizer.encode(text))
    starts = torch.randint(0, len(ids) - length, (samples,), generator=torch.Generator().manual_seed(seed))
    windows = torch.stack([ids[s : s + length - 1] for s in starts.tolist()])
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


class MixedData(ExtendDataset):
    """Digit questions with text-only samples among them, as LLaVA-665k mixes ShareGPT's text conversations
    into its image data.

    A text-only sample has no placeholder and no features, which one data file cannot say (its features are
    [N, F, d]: every sample has F), so this data set keeps the two apart and a batch's ``features`` are those
    of its digit samples, in batch order: the model writes them over the placeholders in that order.
    """

    def __init__(self, digits: ExtendData, text: ExtendData) -> None:
        if digits.input_ids.shape[1] != text.input_ids.shape[1]:
            raise ValueError("digit and text samples must have one length")
        self.digits = len(digits)
        self.input_ids = torch.cat([digits.input_ids, text.input_ids])
        self.labels = torch.cat([digits.labels, text.labels])
        self.attention_mask = torch.cat([digits.attention_mask, text.attention_mask])
        self.features = digits.features
        self.placeholder_id = digits.placeholder_id
        self.source = "digits + text"

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def feature_dim(self) -> int | None:
        return int(self.features.shape[-1])

    def fetch(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long)
        return {
            "input_ids": self.input_ids[index],
            "labels": self.labels[index],
            "attention_mask": self.attention_mask[index],
            "features": self.features[index[index < self.digits]],
        }


def mixed_data(questions: ExtendData, tokenizer: CharTokenizer, text: str, share: float, seed: int) -> ExtendDataset:
    """The questions plus text windows making up ``share`` of the samples (none: the questions alone)."""
    if share <= 0:
        return questions
    count = round(len(questions) * share / (1 - share))
    return MixedData(questions, text_data(tokenizer, text, count, seed, MIX_TEXT_LENGTH))


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
        num_hidden_layers=LAYERS,
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


def machine() -> dict:
    """What the numbers depend on beyond the seeds: threads, the CPU's kernels, the builds."""
    import numpy
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------------------- run
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--align-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps of every arm")
    parser.add_argument("--probe-steps", type=int, default=PROBE_DEFAULTS.steps, help="the paper's 1,000")
    parser.add_argument("--lrs", type=float, nargs="+", default=[PAPER_LR, MINIATURE_LR], help="fine-tuning lrs")
    parser.add_argument("--placement-lrs", type=float, nargs="*", default=[MINIATURE_LR], help="lrs of Table 3's rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--text-share", type=float, default=0.06, help="text-only share of the fine-tuning mix")
    parser.add_argument("--held-out-text", type=int, default=512, help="held-out text windows for forgetting")
    parser.add_argument("--pretrain-only", action="store_true", help="stop once --workdir holds the base")
    parser.add_argument("--tiny", action="store_true", help="a few steps of everything (the test suite's run)")
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=None, help="combine results.json files of single-seed runs"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where the base and the packs go (default: temp)")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.tiny:
        args.pretrain_steps, args.align_steps, args.steps, args.probe_steps = 3, 2, 3, 2
        args.held_out_text = 16
    return args


def fresh(workdir: Path, projector_state: dict, projector) -> MoExtendModel:
    """A fresh copy of the base with the aligned projector: every arm of a seed starts from this."""
    model = MoExtendModel(load_base(workdir / "base"), copy.deepcopy(projector), IMAGE)
    model.projector.load_state_dict(projector_state)
    return model


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    if args.merge:
        return merge(args.merge, args.results)
    started_all = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="moextend-example-"))
    args.results.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # 1. the "pretrained" MoE LM
    text = corpus()
    split = int(len(text) * 0.9)
    tokenizer = CharTokenizer(text)
    held_text = text_data(tokenizer, text[split:], args.held_out_text, 2)
    pretrain_seconds = None
    if not (workdir / "base" / "config.json").is_file():  # a --workdir from an earlier run keeps its base
        train_text = text_data(tokenizer, text[:split], 20000, 1)
        lm = tiny_mixtral(len(tokenizer))
        model = MoExtendModel(lm)
        started = time.perf_counter()
        pretrain = train(
            model, set_trainable(model, "full"), train_text, options(args.pretrain_steps, 3e-3), stage="pretrain"
        )
        pretrain_seconds = time.perf_counter() - started
        print(f"pretrained in {pretrain_seconds:.0f} s: text loss {pretrain.lm_losses[-1]:.3f}")
        lm.save_pretrained(workdir / "base")
    if args.pretrain_only:
        return {"base": str(workdir / "base"), "pretrain seconds": pretrain_seconds}
    base_parameters = count(load_base(workdir / "base"))
    text_before = evaluate(MoExtendModel(load_base(workdir / "base")), held_text, 64)["loss"]

    # 2. the new modality, and the fine-tuning mix
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = torch.tensor(digits.images, dtype=torch.float32), torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))
    cut = int(len(order) * 0.7)
    fit, test = order[:cut], order[cut:]
    captions = digit_data(tokenizer, images[fit], labels[fit], " a handwritten ")
    questions = digit_data(tokenizer, images[fit], labels[fit], QUESTION)
    mix = mixed_data(questions, tokenizer, text[:split], args.text_share, 4)
    test_questions = digit_data(tokenizer, images[test], labels[test], QUESTION)

    runs: list[dict] = []
    probes: dict[int, dict] = {}
    for seed in args.seeds:
        # 3. align (paper lr) → probe (paper length, the code's lr) on the mix, both seeded
        recipe = MoExtendRecipe(
            align=options(args.align_steps, ALIGN_DEFAULTS.learning_rate, seed=seed),
            probe=options(args.probe_steps, PROBE_DEFAULTS.learning_rate, seed=seed),
            selection=ProbeOptions(fraction=0.5),
            extend=ExtendOptions(modality="digits"),
        )
        aligned, align_report = align(load_base(workdir / "base"), captions, options=recipe.align)
        projector, projector_state = aligned.projector, copy.deepcopy(aligned.projector.state_dict())
        aligned_accuracy = digit_accuracy(aligned, test_questions)
        started = time.perf_counter()
        probe = run_probe(aligned, mix, recipe.probe, recipe.selection)
        probe_seconds = time.perf_counter() - started
        probes[seed] = {
            "layers": probe.selected,
            "scores": {str(k): v for k, v in sorted(probe.scores.items())},
            "aligned digit accuracy": aligned_accuracy,
            "align seconds": align_report.seconds,
            "probe seconds": probe_seconds,
        }
        print(f"seed {seed}: projector alone {aligned_accuracy:.1%}; probe d_j {probe.scores} → {probe.selected}")
        for lr in args.lrs:
            arms = list(MAIN_ARMS) + (list(PLACEMENTS) if lr in args.placement_lrs else [])
            finetune_recipe = replace(recipe, finetune=options(args.steps, lr, seed=seed))
            for arm in arms:
                model = fresh(workdir, projector_state, projector)
                if arm == "full fine-tuning":
                    report = train(model, set_trainable(model, "full"), mix, finetune_recipe.finetune, stage="full")
                    layers = list(range(LAYERS))
                else:
                    chosen = {"MoExtend": "extender", "MoExtend, all layers": "all"}.get(arm, PLACEMENTS.get(arm))
                    arm_recipe = replace(finetune_recipe, extend=replace(recipe.extend, layers=chosen))
                    plan = plan_extension(model, arm_recipe.extend, probe)  # κ′ statistics choose the sources
                    report = finetune(model, mix, plan, arm_recipe)
                    layers = plan.layers
                    if arm == "MoExtend":
                        model = reload_from_pack(model, workdir, plan, arm_recipe, report, test_questions)
                runs.append(
                    {
                        "arm": arm,
                        "lr": lr,
                        "seed": seed,
                        "layers": layers,
                        "trainable parameters": report.trainable_parameters,
                        "fine-tuning seconds": report.seconds,
                        "digit accuracy": digit_accuracy(model, test_questions),
                        "text loss change": evaluate(model, held_text, 64)["loss"] - text_before,
                    }
                )
                r = runs[-1]
                print(
                    f"  lr {lr:g} {arm:22s} layers {layers}: digits {r['digit accuracy']:.1%}, "
                    f"text loss {r['text loss change']:+.4f} ({report.seconds:.0f} s)"
                )
    summary = {
        "mode": "tiny" if args.tiny else "full",
        "base parameters": base_parameters,
        "projector parameters": count(projector),
        "text loss before": text_before,
        "steps": {"pretrain": args.pretrain_steps, "align": args.align_steps, "probe": args.probe_steps},
        "fine-tuning steps": args.steps,
        "learning rates": {"align": ALIGN_DEFAULTS.learning_rate, "probe": PROBE_DEFAULTS.learning_rate},
        "fine-tuning learning rates": args.lrs,
        "text share": args.text_share,
        "mix": {"digit samples": len(questions), "text-only samples": len(mix) - len(questions)},
        "seeds": args.seeds,
        "probes": probes,
        "runs": runs,
        "rows": aggregate(runs),
        "pretrain seconds": pretrain_seconds,
        "wall seconds": time.perf_counter() - started_all,
        "machine": machine(),
    }
    report_results(summary, args.results)
    return summary


# Keys that vary between runs of the same experiment; every other key of their summaries must agree.
PER_RUN = ("seeds", "probes", "runs", "rows", "wall seconds", "pretrain seconds", "machine")


def merge(files: Sequence[Path], results: Path) -> dict:
    """One report from runs of the same settings on other seeds (e.g. one process per seed on a many-core
    machine): their runs side by side, the statistics over all their seeds."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    first = parts[0]
    for f, part in zip(files, parts, strict=True):
        differs = [k for k in first if k not in PER_RUN and part.get(k) != first[k]]
        if differs:
            raise SystemExit(f"{f}: {', '.join(differs)} differ from {files[0]}'s; only runs of one setting merge")
    seeds = [s for part in parts for s in part["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"seeds {seeds} repeat; merge runs of different seeds")
    runs = [r for part in parts for r in part["runs"]]
    summary = first | {
        "seeds": seeds,
        "probes": {k: v for part in parts for k, v in part["probes"].items()},
        "runs": runs,
        "rows": aggregate(runs),
        "wall seconds": sum(part["wall seconds"] for part in parts),
        "merged": {"files": [str(f) for f in files], "wall seconds": [part["wall seconds"] for part in parts]},
    }
    results.mkdir(parents=True, exist_ok=True)
    report_results(summary, results)
    return summary


def reload_from_pack(model, workdir: Path, plan, recipe, report, test_questions) -> MoExtendModel:
    """Write the pack, load it onto a fresh base, and insist on bit-identical logits: what is measured is the pack."""
    pack = write_pack(
        model,
        workdir / "pack",
        modality="digits",
        extend_options=recipe.extend,
        selection=plan.to_dict(),
        training={"finetune": report.to_dict()},
        overwrite=True,
    )
    reloaded = load_extension_pack(load_base(workdir / "base"), pack)
    with torch.no_grad():
        same = torch.equal(
            reloaded(test_questions.input_ids, None, test_questions.features).logits,
            model(test_questions.input_ids, None, test_questions.features).logits,
        )
    assert same, "the pack must reproduce the trained model"
    return reloaded


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def aggregate(runs: list[dict]) -> dict:
    """Per (lr, arm): each measure's mean, sample sd, min and max over the seeds."""
    rows: dict[str, dict] = {}
    for r in runs:
        rows.setdefault(f"{r['lr']:g}|{r['arm']}", []).append(r)
    out = {}
    for key, group in rows.items():
        out[key] = {
            "lr": group[0]["lr"],
            "arm": group[0]["arm"],
            "layers": sorted({tuple(g["layers"]) for g in group}),
            "trainable parameters": [g["trainable parameters"] for g in group],
            **{
                m: spread([g[m] for g in group]) for m in ("fine-tuning seconds", "digit accuracy", "text loss change")
            },
        }
    return out


def report_results(summary: dict, results: Path) -> None:
    total = summary["base parameters"] + summary["projector parameters"]
    seeds = len(summary["seeds"])
    lines = []
    for lr in summary["fine-tuning learning rates"]:
        lines += [
            f"**Fine-tuning lr {lr:g}**, mean ± sd over {seeds} seeds [min, max]:",
            "",
            "| method | layers | trainable parameters | fine-tuning time | digit accuracy | text loss change |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for row in summary["rows"].values():
            if row["lr"] != lr:
                continue
            layers = "; ".join(",".join(map(str, ls)) for ls in row["layers"])
            params = sorted(set(row["trainable parameters"]))
            share = params[0] / total
            params_text = "–".join(f"{p:,}" for p in params) + f" ({share:.1%})"
            acc, forget = row["digit accuracy"], row["text loss change"]
            lines.append(
                f"| {row['arm']} | {layers} | {params_text} | {row['fine-tuning seconds']['mean']:.0f} s | "
                f"{acc['mean']:.1%} ± {acc['sd']:.1%} [{acc['min']:.1%}, {acc['max']:.1%}] | "
                f"{forget['mean']:+.3f} ± {forget['sd']:.3f} [{forget['min']:+.3f}, {forget['max']:+.3f}] |"
            )
        lines.append("")
    probe_lines = [
        f"seed {seed}: projector alone {p['aligned digit accuracy']:.1%}, probe d_j "
        + ", ".join(f"{float(v):.3f}" for v in p["scores"].values())
        + f" → layers {p['layers']}"
        for seed, p in summary["probes"].items()
    ]
    mix = summary["mix"]
    parts = f" (the sum of {len(summary['merged']['files'])} single-seed runs)" if "merged" in summary else ""
    if summary.get("pretrain seconds"):
        parts += f", pretraining {summary['pretrain seconds'] / 60:.1f} min of it"
    note = (
        f"Base: {summary['base parameters']:,} parameters, held-out text loss {summary['text loss before']:.4f} "
        f"nats/char before fine-tuning. Mix: {mix['digit samples']:,} digit questions + {mix['text-only samples']:,} "
        f"text-only samples ({summary['text share']:.0%}). {summary['fine-tuning steps']} fine-tuning steps per arm; "
        f"align {summary['steps']['align']} steps at lr {summary['learning rates']['align']:g}, probe "
        f"{summary['steps']['probe']} steps at lr {summary['learning rates']['probe']:g}.\n\n"
        + "\n".join(f"- {line}" for line in probe_lines)
        + f"\n\nWall time {summary['wall seconds'] / 60:.1f} min{parts} on {summary['machine']['cpu']} "
        f"({summary['machine']['torch threads']} torch threads, {summary['machine']['cpu capability']} kernels, "
        f"torch {summary['machine']['torch']})."
    )
    table = "\n".join(lines) + "\n" + note + "\n"
    (results / "results.md").write_text(table)
    (results / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table)
    plot(summary, results / "results.png")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = summary["fine-tuning learning rates"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    arms = list(dict.fromkeys(r["arm"] for r in summary["rows"].values()))
    width = 0.8 / len(lrs)
    for ax, measure in zip(axes, ("digit accuracy", "text loss change"), strict=True):
        for j, lr in enumerate(lrs):
            xs, means, sds = [], [], []
            for i, arm in enumerate(arms):
                row = summary["rows"].get(f"{lr:g}|{arm}")
                if row:
                    xs.append(i + (j - (len(lrs) - 1) / 2) * width)
                    means.append(row[measure]["mean"])
                    sds.append(row[measure]["sd"])
            ax.bar(xs, means, width, yerr=sds, capsize=3, label=f"lr {lr:g}")
        ax.set_xticks(range(len(arms)), arms, fontsize=7, rotation=15)
        ax.set_title(f"{measure} (mean ± sd, {len(summary['seeds'])} seeds)", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("MoExtend vs full fine-tuning: tiny Mixtral + sklearn digits, text-only share in the mix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
