"""One seed of the mini paper study: data splits, the fine-tuned models, validation selection, test numbers.

``run.py`` calls :func:`run_seed` once per seed (in this process or in worker processes) and aggregates. Every
seed's result is cached as ``<workdir>/seed<S>/result.json`` beside the settings that produced it, and every
trained model beside its ``train_meta.json``, so a rerun with the same settings recomputes nothing.

What a seed changes: the training randomness of every model (encoder initialisation, batch order) and DARE's
random drops. What it does not change: the data, the test sets and the validation split (carved from the training
data with a fixed seed), so the spread over seeds is the spread of training, not of the data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mini_model as B
import numpy as np
import torch
from mini_data import LABELS, MODALITIES, TASKS, Split, carve_validation

import mmer
from mmer.compare import parse_variant
from mmer.merge.masks import MASKS
from mmer.merge.methods import METHODS
from mmer.route.weights import MEAN, DeviceWeights

COMBOS = (("digits", "speech"), ("digits", "points"), ("speech", "points"), ("digits", "speech", "points"))
SHORT = {"digits": "I", "speech": "A", "points": "P"}
TAU = "<tau*>"  # key of the diagnostic text weights θ_base + τ* (not the paper's routing)
NEW_TASK = "numbers"  # Table 3: the speech MLLM fine-tuned further on spoken digit words
CONTINUED = "speech_numbers"  # its directory and its modality name in the checkpoint after `mmer add`
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


# --------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Everything a seed's result depends on (its JSON is reused only when these are equal)."""

    tiny: bool
    train: B.TrainConfig
    continue_steps: int  # Table 3: further fine-tuning of the speech MLLM on the new task
    lora_rank: int
    val_fraction: float
    max_val: int  # validation examples per task (a stratified subset of the carved split)
    max_test: int  # test examples per task
    n_mixed: int  # mixed-modality questions per combination
    variants: tuple[str, ...]
    grids: dict = field(default_factory=dict)  # variant -> list of option dicts (the validation search)
    growth_methods: tuple[str, ...] = ()
    trim_scope: str = "per-tensor"

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_grids(tiny: bool) -> dict[str, list[dict]]:
    """The validation search per variant: the options each method has, over the values their papers try.

    The first entry is mmer's default, so a tie keeps the default. NaiveMC and EMR have no hyper-parameter; DARE's
    drop rate stays at 0.5 (the MMER paper does not give one)."""
    ks = (0.4, 0.8)
    grids = {
        "average/none": [{}],
        "task_arithmetic/none": [{"alpha": a} for a in (0.3, 0.6, 1.0)],
        "ties/none": [{"k": k, "alpha": a} for a in (1.0, 1.5) for k in (0.8, 0.2)],
        "ties+dare/none": [{"k": k} for k in (0.8, 0.2)],
        "task_arithmetic/tall": [{"alpha": 0.3, "lambda_": lam} for lam in (0.4, 0.2, 0.6)],
        "emr/emr": [{}],
        "ties/mmer": [{"k": k, "lambda_": lam} for k in ks[::-1] for lam in (0.9, 0.5, 1.2)],
        "ties/sign_only": [{"k": k} for k in ks[::-1]],
        "ties/magnitude_only": [{"k": k, "lambda_": 0.9} for k in ks[::-1]],
    }
    if tiny:  # two candidates for MMER, one elsewhere: checks the search, not its result
        grids = {v: g[:2] if v == "ties/mmer" else g[:1] for v, g in grids.items()}
    return grids


# --------------------------------------------------------------------------------------------------- data
def fingerprint(split: Split) -> str:
    return hashlib.sha256(
        np.ascontiguousarray(split.x).tobytes() + np.ascontiguousarray(split.y).tobytes()
    ).hexdigest()[:16]


def cap(split: Split, n: int) -> Split:
    """The first ``n`` examples (every split is already in a seeded random order... except where it is not: so
    take a fixed stratified-by-position subsample through a fixed permutation)."""
    if len(split.y) <= n:
        return split
    idx = np.sort(np.random.default_rng(0).permutation(len(split.y))[:n])
    return Split(split.x[idx], split.y[idx])


def splits(raw: dict[str, tuple[Split, Split]], s: Settings) -> dict[str, dict[str, Split]]:
    """Per task: ``train`` (what models are trained on), ``val`` (carved from the training data, never trained
    on, used to choose every hyper-parameter) and ``test`` (used only for the reported numbers)."""
    out = {}
    for task, (train, test) in raw.items():
        fit, val = carve_validation(train, s.val_fraction)
        out[task] = {"train": fit, "val": cap(val, s.max_val), "test": cap(test, s.max_test)}
    return out


# --------------------------------------------------------------------------------------------------- models
def _trained(directory: Path, meta: dict) -> bool:
    file = directory / "train_meta.json"
    return file.is_file() and json.loads(file.read_text()) == meta


def build_models(work: Path, seed: int, data, prompter, tokenizer, s: Settings) -> dict[str, Path]:
    """The base, one fully fine-tuned MLLM per task, the speech MLLM fine-tuned further on the new task, and one
    LoRA MLLM per modality: on disk, reused when trained with the same settings and data."""
    base, config = B.base_llm(tokenizer)
    dirs = {"base": work / "models" / "base"}
    if not (dirs["base"] / "model.safetensors").is_file():
        B.save_mllm(dirs["base"], base, None, config, {"role": "base"})
    root = work / f"seed{seed}" / "models"
    for i, task in enumerate(TASKS):
        cfg = replace(s.train, seed=1000 * seed + i)
        d = dirs[task] = root / task
        meta = {"train": asdict(cfg), "data": fingerprint(data[task]["train"]), "kind": "full"}
        if _trained(d, meta):
            continue
        t = time.perf_counter()
        llm, enc = B.finetune(base, task, data[task]["train"], prompter, cfg, log=log)
        B.save_mllm(d, llm, enc, config, {"modality": task, "labels": list(LABELS[task])})
        (d / "train_meta.json").write_text(json.dumps(meta))
        log(f"seed {seed}: {task} fine-tuned in {time.perf_counter() - t:.0f} s")
    # Table 3: the speech MLLM, fine-tuned further on the new task (spoken digit words).
    cfg = replace(s.train, seed=1000 * seed + 50, steps=s.continue_steps)
    d = dirs[CONTINUED] = root / CONTINUED
    meta = {
        "train": asdict(cfg),
        "data": fingerprint(data[NEW_TASK]["train"]),
        "from": json.loads((dirs["speech"] / "train_meta.json").read_text()),
        "kind": "continued",
    }
    if not _trained(d, meta):
        t = time.perf_counter()
        init = B.load_mllm(dirs["speech"])
        llm, enc = B.finetune(base, NEW_TASK, data[NEW_TASK]["train"], prompter, cfg, log=log, init=init)
        B.save_mllm(d, llm, enc, config, {"modality": CONTINUED, "labels": list(LABELS[NEW_TASK])})
        (d / "train_meta.json").write_text(json.dumps(meta))
        log(f"seed {seed}: speech -> {NEW_TASK} fine-tuned further in {time.perf_counter() - t:.0f} s")
    # Adapters: the same modalities, the same seeds and steps, LoRA instead of full fine-tuning.
    for i, m in enumerate(MODALITIES):
        cfg = replace(s.train, seed=1000 * seed + i)
        d = dirs["lora:" + m] = work / f"seed{seed}" / "lora" / m
        meta = {"train": asdict(cfg), "rank": s.lora_rank, "data": fingerprint(data[m]["train"]), "kind": "lora"}
        if _trained(d, meta):
            continue
        t = time.perf_counter()
        llm, enc, peft_model = B.finetune_lora(base, m, data[m]["train"], prompter, cfg, rank=s.lora_rank, log=log)
        if d.exists():
            shutil.rmtree(d)
        peft_model.save_pretrained(str(d / "adapter"))  # the adapter as peft stores it: what one would keep
        B.save_mllm(d / "effective", llm, enc, config, {"modality": m, "lora_rank": s.lora_rank})
        (d / "train_meta.json").write_text(json.dumps(meta))
        log(f"seed {seed}: {m} LoRA-tuned in {time.perf_counter() - t:.0f} s")
    return dirs


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


# --------------------------------------------------------------------------------------------------- eval
def mixed_examples(test: dict[str, Split], n: int, seed: int = 0) -> dict[tuple[str, ...], list[dict]]:
    """Zero-shot questions over a sequence holding 2-3 entities, e.g. ``[CLS] image : <I> . audio : <A> . which
    word [MASK] . [SEP]``: the question names one entity's kind and the answer is 4-way (its label and 3 other
    labels of the same modality). No model ever saw a sequence with more than one entity. For each combination,
    ``n`` questions split evenly over the target modalities, one block per target. Fixed across seeds."""
    rng = np.random.default_rng(seed)
    out = {}
    for combo in COMBOS:
        blocks = []
        for m in combo:
            k = n // len(combo)
            picks = {e: rng.integers(0, len(test[e].y), k) for e in combo}
            offset = B.ANSWERS.index(LABELS[m][0])
            options, answer = [], []
            for j in range(k):
                true = int(test[m].y[picks[m][j]])
                others = rng.choice([c for c in range(len(LABELS[m])) if c != true], 3, replace=False)
                opts = [true, *others.tolist()]
                rng.shuffle(opts)
                options.append([o + offset for o in opts])
                answer.append(opts.index(true))
            blocks.append(
                {
                    "target": m,
                    "features": {e: test[e].x[picks[e]] for e in combo},
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


def checkpoint_weights(path: Path, extra: bool = True) -> tuple[dict[str, B.Weights], dict[str, B.Encoder], dict]:
    """Each modality's rebuilt LLM (θ_base + sᵢ·mᵢ∘τ*, or θ* for a single merged model), with ``extra`` also the
    text weights of expansion mode (θ_base + m̄∘τ*, or θ*) under the key MEAN and θ_base + τ* under TAU; each
    modality's encoder read back from the decoupled checkpoint's components; and the mask densities."""
    ckpt = mmer.load_decoupled(path)
    try:
        dw = DeviceWeights(ckpt, ckpt.modalities, torch.device("cpu"))
        names = [s.name for s in ckpt.slots]
        weights = {m: {n: dw.full(m, n).float() for n in names} for m in ckpt.modalities}
        if extra:
            weights[MEAN] = {n: dw.text_part(n).float() for n in names}
            if not ckpt.is_single_model:  # diagnostic only: text tokens through θ_base + τ*
                weights[TAU] = {
                    n: (dw.base[n].float() + dw.tau[n].float()) if n in dw.tau else dw.base[n] for n in names
                }
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


def accuracies(weights, encoders, tasks, data, split, prompter, task_of=None) -> dict[str, float]:
    """Each modality's accuracy on ``split``; ``task_of`` maps a checkpoint modality to the task it answers."""
    task_of = task_of or {}
    return {
        m: B.accuracy([weights[m]], encoders[m], task_of.get(m, m), data[task_of.get(m, m)][split], prompter)
        for m in tasks
    }


# --------------------------------------------------------------------------------------------------- merges
def options_for(variant: str, s: Settings, seed: int, chosen: dict) -> mmer.MergeOptions:
    base = mmer.MergeOptions(trim_scope=s.trim_scope, hash_inputs=False, base_storage="reference", zero_sign="zero")
    options = parse_variant(variant, base)
    if "trim_scope" not in METHODS[options.method].accepts:  # only trimming methods take a trim scope
        options = replace(options, trim_scope=mmer.MergeOptions().trim_scope)
    if options.dare:  # the seed draws DARE's drops; a method without DARE refuses a dare_seed
        options = replace(options, dare_seed=seed)
    return replace(options, **chosen)


def merge(dirs, tasks, options: mmer.MergeOptions, out: Path) -> float:
    t = time.perf_counter()
    specs = tuple(mmer.ModelSpec(str(dirs[m]), modality=m) for m in tasks)
    recipe = mmer.Recipe(base=mmer.ModelSpec(str(dirs["base"])), models=specs, options=options)
    mmer.run_merge(recipe, out, overwrite=True)
    return time.perf_counter() - t


def select(variant: str, dirs, data, ft_val, prompter, s: Settings, seed: int, work: Path) -> tuple[dict, list, Path]:
    """Merge every candidate of the variant's grid, score it by its mean validation retention over the three
    modalities (val accuracy / the fine-tuned model's val accuracy), keep the best (the first on a tie). No test
    example is read. Returns the chosen options, every candidate's scores, and the chosen checkpoint."""
    grid = s.grids.get(variant, [{}])
    root = work / f"seed{seed}" / "merged"
    scored, best, best_dir = [], None, None
    for i, chosen in enumerate(grid):
        out = root / f"{_slug(variant)}.cand{i}"
        seconds = merge(dirs, MODALITIES, options_for(variant, s, seed, chosen), out)
        weights, encoders, _ = checkpoint_weights(out, extra=False)
        val = accuracies(weights, encoders, MODALITIES, data, "val", prompter)
        retention = {m: val[m] / ft_val[m] if ft_val[m] else 0.0 for m in MODALITIES}
        score = float(np.mean(list(retention.values())))
        scored.append(
            {"options": chosen, "val_acc": val, "val_retention": retention, "score": score, "merge_s": seconds}
        )
        if best is None or score > best["score"]:
            if best_dir is not None:
                shutil.rmtree(best_dir)
            best, best_dir = scored[-1], out
        else:
            shutil.rmtree(out)
    final = root / _slug(variant)
    if final.exists():
        shutil.rmtree(final)
    best_dir.rename(final)
    return best["options"], scored, final


def _slug(label: str) -> str:
    return label.replace("/", "__").replace("+", "_").replace("=", "")


# --------------------------------------------------------------------------------------------------- one seed
def run_seed(seed: int, work: Path, s: Settings, raw) -> dict:
    """Everything measured for one seed (see the module docstring); cached in ``seed<S>/result.json``."""
    cache = work / f"seed{seed}" / "result.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("settings_key") == s.key():
            log(f"seed {seed}: cached result {cache}")
            return cached
    started = time.perf_counter()
    timings: dict[str, float] = {}
    tokenizer = B.load_tokenizer()
    prompter = B.Prompter(tokenizer)
    data = splits(raw, s)
    t = time.perf_counter()
    dirs = build_models(work, seed, data, prompter, tokenizer, s)
    timings["train"] = time.perf_counter() - t

    # --- fine-tuned models and the base
    t = time.perf_counter()
    base, _ = B.load_mllm(dirs["base"])
    tuned, encs = {}, {}
    for task in (*TASKS, CONTINUED):
        tuned[task], encs[task] = B.load_mllm(dirs[task])
    reference = B.sentence_embeddings(base, prompter, SENTENCES)
    test = {m: data[m]["test"] for m in MODALITIES}
    mixed = mixed_examples(test, n=s.n_mixed)
    ft_acc = {t_: B.accuracy([tuned[t_]], encs[t_], t_, data[t_]["test"], prompter) for t_ in TASKS}
    ft_val = {m: B.accuracy([tuned[m]], encs[m], m, data[m]["val"], prompter) for m in MODALITIES}
    base_acc = {m: B.accuracy([base], encs[m], m, data[m]["test"], prompter) for m in MODALITIES}
    avg_tuned = {k: torch.stack([tuned[m][k] for m in MODALITIES]).mean(0) for k in base}
    text_each = {m: text_metrics(tuned[m], prompter, reference) for m in MODALITIES}
    finetuned = {
        "acc": {m: ft_acc[m] for m in MODALITIES},
        "acc_tasks": ft_acc,
        "val_acc": ft_val,
        "base_llm_acc": base_acc,
        "mixed": mixed_accuracy(lambda c: [avg_tuned, *(tuned[m] for m in c)], encs, mixed, prompter),
        "text_each": text_each,
        "text": {k: float(np.mean([text_each[m][k] for m in MODALITIES])) for k in ("cosine", "rank_corr")},
    }
    timings["eval_finetuned"] = time.perf_counter() - t
    log(f"seed {seed}: fine-tuned test accuracy " + ", ".join(f"{m} {a:.3f}" for m, a in ft_acc.items()))

    # --- every variant: choose on validation, then measure on test
    rows: dict[str, dict] = {}
    t = time.perf_counter()
    for variant in s.variants:
        row_file = work / f"seed{seed}" / "rows" / f"{_slug(variant)}.json"
        if row_file.is_file():  # a finished variant of an interrupted run (same settings only)
            saved = json.loads(row_file.read_text())
            if saved.get("settings_key") == s.key() and (work / f"seed{seed}" / "merged" / _slug(variant)).is_dir():
                rows[variant] = saved["row"]
                continue
        t0 = time.perf_counter()
        chosen, candidates, out = select(variant, dirs, data, ft_val, prompter, s, seed, work)
        select_s = time.perf_counter() - t0
        weights, enc_ckpt, density = checkpoint_weights(out)
        routed = not MASKS[options_for(variant, s, seed, chosen).mask].single_model_output
        acc = accuracies(weights, enc_ckpt, MODALITIES, data, "test", prompter)
        row = {
            "chosen": chosen,
            "candidates": candidates,
            "acc": acc,
            "retention": {m: acc[m] / ft_acc[m] if ft_acc[m] else 0.0 for m in MODALITIES},
            "mixed": mixed_accuracy(lambda c, w=weights: [w[MEAN], *(w[m] for m in c)], enc_ckpt, mixed, prompter),
            "routed": routed,
            "text": text_metrics(weights[MEAN], prompter, reference),
            "rel_l1": {m: rel_l1(weights[m], tuned[m], base) for m in MODALITIES},
            "density": density,
            "bytes": dir_bytes(out),
            "select_seconds": select_s,
        }
        if routed:
            row["mixed_text_tau"] = mixed_accuracy(
                lambda c, w=weights: [w[TAU], *(w[m] for m in c)], enc_ckpt, mixed, prompter
            )
        rows[variant] = row
        row_file.parent.mkdir(parents=True, exist_ok=True)
        row_file.write_text(json.dumps({"settings_key": s.key(), "row": row}))
        log(
            f"seed {seed}: {variant:22s} chose {chosen} | test "
            + " ".join(f"{m} {acc[m]:.3f}" for m in MODALITIES)
            + f" | mixed {np.mean(list(row['mixed'].values())):.3f} | {select_s:.0f} s"
        )
    timings["select_and_eval"] = time.perf_counter() - t

    import extras  # the four new tables (Table 3, Fig. 5, adapters, mask statistics)

    mmer_variant = "ties/mmer" if "ties/mmer" in rows else None
    t = time.perf_counter()
    stats = extras.mask_statistics(tuned, base, work / f"seed{seed}" / "merged", rows, MODALITIES)
    timings["mask_statistics"] = time.perf_counter() - t
    t = time.perf_counter()
    forgetting = (
        extras.forgetting(dirs, data, tuned, encs, ft_acc, prompter, work / f"seed{seed}", mmer_variant)
        if mmer_variant
        else {}
    )
    timings["forgetting"] = time.perf_counter() - t
    t = time.perf_counter()
    growth = extras.growth(dirs, data, ft_acc, prompter, s, seed, work, rows)
    timings["growth"] = time.perf_counter() - t
    t = time.perf_counter()
    adapters = extras.adapters(dirs, data, ft_acc, prompter, rows, base)
    timings["adapters"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    result = {
        "seed": seed,
        "settings_key": s.key(),
        "finetuned": finetuned,
        "base_text": text_metrics(base, prompter, reference),
        "rows": rows,
        "mask_statistics": stats,
        "forgetting": forgetting,
        "growth": growth,
        "adapters": adapters,
        "n_test": {t_: int(len(data[t_]["test"].y)) for t_ in TASKS},
        "n_val": {t_: int(len(data[t_]["val"].y)) for t_ in TASKS},
        "n_train": {t_: int(len(data[t_]["train"].y)) for t_ in TASKS},
        "n_mixed": {"-".join(SHORT[m] for m in c): sum(len(b["answer"]) for b in v) for c, v in mixed.items()},
        "timings_s": timings,
    }
    cache.write_text(json.dumps(result, indent=1))
    log(f"seed {seed}: done in {timings['total']:.0f} s")
    return result
