"""Aggregate the seeds (mean, standard deviation, range of every number) and write the tables and figure."""

from __future__ import annotations

import numpy as np


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": len(a),
    }


def _merge(trees: list):
    """Mean/std/min/max at every numeric leaf present in every seed's tree (lists and strings are dropped)."""
    first = trees[0]
    if isinstance(first, bool):
        return first
    if isinstance(first, (int, float)):
        return _stats([float(t) for t in trees])
    if isinstance(first, dict):
        out = {}
        for k in first:
            if all(isinstance(t, dict) and k in t for t in trees):
                v = _merge([t[k] for t in trees])
                if v is not None:
                    out[k] = v
        return out
    return None


def aggregate(per_seed: list[dict]) -> dict:
    keys = ("finetuned", "base_text", "rows", "mask_statistics", "forgetting", "growth", "adapters")
    out = {k: _merge([r[k] for r in per_seed]) for k in keys}
    out["chosen"] = {v: [r["rows"][v]["chosen"] for r in per_seed] for v in per_seed[0]["rows"]}
    out["n_test"], out["n_val"], out["n_train"] = per_seed[0]["n_test"], per_seed[0]["n_val"], per_seed[0]["n_train"]
    out["n_mixed"] = per_seed[0]["n_mixed"]
    return out


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
    "ties/sign_only": "MMER mask, sign test only (Table 5)",
    "ties/magnitude_only": "MMER mask, magnitude test only (Table 5)",
}
MODALITIES = ("digits", "speech", "points")
MB = 1e6


def pm(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` of one aggregated number (std over seeds, ddof 1)."""
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def rng(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{stat['min'] * scale:.{digits}f}–{stat['max'] * scale:.{digits}f}"


def _mean_of(d: dict) -> float:
    return float(np.mean([v["mean"] for v in d.values()]))


def _avg_stat(per_seed: list[dict], path) -> dict:
    """mean/std over seeds of a per-seed average (e.g. each seed's mean retention over the modalities)."""
    vals = []
    for r in per_seed:
        node = r
        for k in path:
            node = node[k]
        vals.append(float(np.mean(list(node.values()))))
    return _stats(vals)


def _opts(chosen: dict) -> str:
    if not chosen:
        return "—"
    names = {"k": "K", "alpha": "α", "lambda_": "λ"}
    return ", ".join(f"{names.get(k, k)} {v}" for k, v in chosen.items())


def render_markdown(r: dict) -> str:
    rows, ft, per = r["rows"], r["finetuned"], r["per_seed"]
    variants = list(rows)
    n = len(r["seeds"])
    st = r["settings"]
    tr = st["train"]
    lines = [
        f"# MMER in miniature: results ({r['mode']}, {n} seed{'s' if n != 1 else ''})",
        "",
        f"Command: `{r['command']}` — this invocation {r['wall_seconds'] / 60:.1f} min ({r['machine']}); each "
        "seed's own run (stages in the last table; a stage reused from the cache counts ~0): "
        + ", ".join(f"seed {k} {v['total'] / 60:.0f} min" for k, v in r["seed_seconds"].items())
        + ".",
        f"Seeds {', '.join(map(str, r['seeds']))}: every number is the mean over the seeds ± its standard deviation "
        "(ddof 1); `results.json` also holds each seed's value and the range.",
        "Examples per task (train / validation / test): "
        + ", ".join(f"{t} {r['n_train'][t]} / {r['n_val'][t]} / {r['n_test'][t]}" for t in r["n_test"])
        + f"; mixed zero-shot: {', '.join(f'{k} {v}' for k, v in r['n_mixed'].items())} questions (4 options).",
        f"Training: stage 1 {tr['align_steps']} steps, stage 2 {tr['steps']} steps, batch {tr['batch']}, "
        f"LR {tr['lr_llm']:g} (LLM) / {tr['lr_encoder']:g} (encoder); LoRA rank {st['lora_rank']}, LR "
        f"{tr['lr_lora']:g}; Table 3's further fine-tuning {st['continue_steps']} steps. Trim scope: "
        f"{r['trim_scope']}.",
        "",
        "## Retention (like the paper's Table 2): test accuracy, % (retention vs. the fine-tuned MLLM, %)",
        "",
        "Options chosen on the validation split (per seed, in seed order); no test example is read to choose.",
        "",
        "| method | chosen on validation | digits | speech | points | avg acc | avg retention "
        "| rebuild error ‖θ̂ᵢ−θᵢ‖₁/‖τᵢ‖₁ | mask density |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    acc_avg = _avg_stat(per, ("finetuned", "acc"))
    lines.append(
        "| Fine-tuned MLLMs (reference, not a bound) | — | "
        + " | ".join(pm(ft["acc"][m]) for m in MODALITIES)
        + f" | {pm(acc_avg)} | 100 | 0 | |"
    )
    base_avg = _avg_stat(per, ("finetuned", "base_llm_acc"))
    lines.append(
        "| Base LLM with each fine-tuned encoder (τ = 0) | — | "
        + " | ".join(pm(ft["base_llm_acc"][m]) for m in MODALITIES)
        + f" | {pm(base_avg)} | | | 0 % |"
    )
    ranked = sorted(variants, key=lambda v: -_avg_stat(per, ("rows", v, "retention"))["mean"])
    for v in variants:
        row = rows[v]
        name = NAMES.get(v, v)
        if v == ranked[0]:
            name = f"**{name}**"
        chosen = "; ".join(_opts(c) for c in r["chosen"][v])
        dens = ", ".join(f"{100 * d['mean']:.0f} %" for d in row["density"].values()) if row["density"] else "—"
        lines.append(
            f"| {name} | {chosen} | "
            + " | ".join(f"{pm(row['acc'][m])} ({100 * row['retention'][m]['mean']:.1f})" for m in MODALITIES)
            + f" | {pm(_avg_stat(per, ('rows', v, 'acc')))}"
            + f" | {pm(_avg_stat(per, ('rows', v, 'retention')))}"
            + f" | {_mean_of(row['rel_l1']):.3f} | {dens} |"
        )
    lines += [
        "",
        "Ranking by mean retention: "
        + " > ".join(NAMES.get(v, v) for v in ranked)
        + ". Range over seeds of the mean retention: "
        + ", ".join(f"{NAMES.get(v, v)} {rng(_avg_stat(per, ('rows', v, 'retention')))}" for v in ranked)
        + ".",
    ]
    combos = list(ft["mixed"])
    lines += [
        "",
        "## Expansion (like Table 1): zero-shot mixed-modality accuracy, %",
        "",
        "I = digit image, A = spoken word, P = point cloud; one sequence holds every entity of the column, then a "
        "question about one of them, 4 options (chance 25 %). Mask methods: per-token routing (each entity's tokens "
        "through θ_base + mᵢ∘τ*, text through θ_base + m̄∘τ*); the others: their one merged model. The fine-tuned "
        "row routes each entity through its own fine-tuned LLM and text through their average.",
        "",
        "| method | " + " | ".join(combos) + " | avg |",
        "|---|" + "---|" * (len(combos) + 1),
    ]
    lines.append(
        "| Fine-tuned MLLMs, routed | "
        + " | ".join(pm(ft["mixed"][c]) for c in combos)
        + f" | {pm(_avg_stat(per, ('finetuned', 'mixed')))} |"
    )
    for v in variants:
        lines.append(
            f"| {NAMES.get(v, v)} | "
            + " | ".join(pm(rows[v]["mixed"][c]) for c in combos)
            + f" | {pm(_avg_stat(per, ('rows', v, 'mixed')))} |"
        )
    diag = [v for v in variants if "mixed_text_tau" in rows[v]]
    if diag:
        lines += [
            "",
            "Diagnostic (not the paper's routing): the same, with text tokens through θ_base + τ* "
            "instead of θ_base + m̄∘τ*:",
            "",
            "| method | " + " | ".join(combos) + " | avg |",
            "|---|" + "---|" * (len(combos) + 1),
        ]
        for v in diag:
            lines.append(
                f"| {NAMES.get(v, v)} | "
                + " | ".join(pm(rows[v]["mixed_text_tau"][c]) for c in combos)
                + f" | {pm(_avg_stat(per, ('rows', v, 'mixed_text_tau')))} |"
            )
    lines += [
        "",
        "## Text-only ability: sentence embeddings of 24 fixed sentences vs. the base's",
        "",
        "| model | cosine to base | rank corr. with base |",
        "|---|---|---|",
    ]
    for m in MODALITIES:
        t = ft["text_each"][m]
        lines.append(f"| Fine-tuned {m} MLLM | {pm(t['cosine'], 1, 3)} | {pm(t['rank_corr'], 1, 3)} |")
    for v in variants:
        t = rows[v]["text"]
        lines.append(f"| {NAMES.get(v, v)} | {pm(t['cosine'], 1, 3)} | {pm(t['rank_corr'], 1, 3)} |")
    lines += _forgetting(r) + _growth(r) + _adapters(r) + _mask_stats(r)
    stages = list(next(iter(r["seed_seconds"].values())))
    lines += ["", "## Wall time per seed (s)", "", "| seed | " + " | ".join(stages) + " |"]
    lines.append("|---|" + "---|" * len(stages))
    for seed, t in r["seed_seconds"].items():
        lines.append(f"| {seed} | " + " | ".join(f"{v:.0f}" for v in t.values()) + " |")
    lines.append("")
    return "\n".join(lines)


def _forgetting(r: dict) -> list[str]:
    f = r.get("forgetting") or {}
    if not f:
        return []
    acc = f["acc"]
    cols = ["digits", "speech", "points", "numbers"]
    names = {
        "speech_before": "speech MLLM",
        "speech_after": "speech MLLM fine-tuned further on numbers",
        "mmer_before_add": "MMER checkpoint of digits + speech + points",
        "mmer_after_add": "the same after `mmer add` of the further-tuned MLLM (task speech_numbers)",
    }
    sources = sorted({s for run in r["per_seed"] for s in run["forgetting"]["add_sources"].values()})
    out = [
        "",
        "## Forgetting and `mmer add` (like Table 3): test accuracy, %",
        "",
        "The speech MLLM is fine-tuned further on a new task, spoken digit words (`numbers`, answers `zero`…`nine`), "
        "starting from its own weights and encoder. Its old task (speech) is measured before and after; then the "
        "further-tuned MLLM is added to MMER's three-modality checkpoint with `mmer.add_models` (each old task's "
        f"τᵢ from its original model: {', '.join(sources)}), and every task is measured again through its own mask "
        "(numbers through the new task's mask and encoder).",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for key, name in names.items():
        row = acc[key]
        out.append(f"| {name} | " + " | ".join(pm(row[c]) if c in row else "—" for c in cols) + " |")
    return out


def _growth(r: dict) -> list[str]:
    g = r.get("growth") or {}
    if not g or not g.get("points"):
        return []
    points = g["points"]
    methods = list(next(iter(points.values()))["methods"])
    tasks = r["per_seed"][0]["growth"]["tasks"]
    out = [
        "",
        "## Growth (like Fig. 5): mean retention over the merged tasks, %, and bytes on disk, MB",
        "",
        f"The first N of {', '.join(tasks)} merged, each method at the options the validation split chose for it "
        "(N = 3 is the retention table's merge). Bytes: every file needed to serve the N tasks: the output "
        "directory (merged LLM or τ* + masks, the N encoders, tokenizer files) plus the base LLM for the mask methods "
        "(they store it by reference); keeping every model whole: the N fine-tuned MLLMs' weight files.",
        "",
        "| N | keep every model whole | " + " | ".join(NAMES.get(m, m) for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for n, p in points.items():
        cells = []
        for m in methods:
            q = p["methods"][m]
            cells.append(f"{pm(q['mean_retention'])} ({q['bytes']['mean'] / MB:.0f} MB)")
        out.append(f"| {n} | 100 ({p['whole_bytes']['mean'] / MB:.0f} MB) | " + " | ".join(cells) + " |")
    return out


def _adapters(r: dict) -> list[str]:
    a = r.get("adapters") or {}
    if not a:
        return []
    lo = a["lora"]
    out = [
        "",
        "## Adapters: LoRA per modality against MMER (retention vs. the fully fine-tuned MLLMs, %; bytes, MB)",
        "",
        "Each modality's MLLM trained again from the base with the same seed, data and steps, but with LoRA (peft) "
        "on every Linear of the 6 layers and the answer layer trained whole, embeddings and LayerNorms frozen. "
        "Serving the three modalities then needs the base plus three adapters and three encoders.",
        "",
        "| how the three modalities are kept | digits | speech | points | mean retention | bytes |",
        "|---|---|---|---|---|---|",
        f"| every fine-tuned MLLM whole | 100 | 100 | 100 | 100 | {a['whole_bytes']['mean'] / MB:.1f} |",
    ]
    if "mmer_total_bytes" in a:
        out.append(
            "| MMER checkpoint + base | "
            + " | ".join(pm(a["mmer_retention"][m]) for m in MODALITIES)
            + f" | {pm(a['mmer_mean_retention'])} | {a['mmer_total_bytes']['mean'] / MB:.1f} |"
        )
    out.append(
        f"| LoRA adapters (rank {r['settings']['lora_rank']}) + encoders + base | "
        + " | ".join(pm(lo[m]["retention"]) for m in MODALITIES)
        + f" | {pm(a['lora_mean_retention'])} | {a['lora_total_bytes']['mean'] / MB:.1f} |"
    )
    out += [
        "",
        "Adapter files: "
        + ", ".join(f"{m} {lo[m]['adapter_bytes']['mean'] / MB:.2f} MB" for m in MODALITIES)
        + f"; base LLM {a['base_bytes']['mean'] / MB:.1f} MB. LoRA test accuracy: "
        + ", ".join(f"{m} {pm(lo[m]['acc'])}" for m in MODALITIES)
        + ".",
    ]
    return out


def _mask_stats(r: dict) -> list[str]:
    ms = r.get("mask_statistics") or {}
    if not ms:
        return []
    ft = r["finetuned"]
    out = [
        "",
        "## Mask density beside each task vector's size and sign conflicts (MMER, options chosen on validation)",
        "",
        "τᵢ = θᵢ − θ_base over the LLM. *moved*: share of the LLM's entries τᵢ changes; *mean |τᵢ|*: over those; "
        "*sign conflict*: among the entries τᵢ moves where the other modalities' sum Σ_{j≠i}τⱼ is nonzero, the share "
        "where it has the opposite sign; *density*: share of τ*'s entries MMER's mask keeps; *kept ‖τᵢ‖₁*: share of "
        "τᵢ's ℓ1 mass under the mask; *base-LLM acc*: the modality's fine-tuned encoder on the unmodified base LLM.",
        "",
        "| modality | ‖τᵢ‖₂ | mean abs τᵢ (×1e-4) | moved | sign conflict | MMER density | kept ‖τᵢ‖₁ "
        "| base-LLM acc | fine-tuned acc | MMER retention |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in MODALITIES:
        s = ms[m]
        cells = [
            pm(s["tau_l2"], 1, 2),
            pm(s["tau_mean_abs_moved"], 1e4, 2),
            pm(s["tau_moved_share"]) + " %",
            pm(s["sign_conflict"]) + " %",
            (pm(s["mmer_density"]) + " %") if "mmer_density" in s else "—",
            (pm(s["mmer_kept_l1_share"]) + " %") if "mmer_kept_l1_share" in s else "—",
            pm(ft["base_llm_acc"][m]),
            pm(ft["acc"][m]),
            pm(s["mmer_retention"]) if "mmer_retention" in s else "—",
        ]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def render_png(r: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = r["per_seed"]
    variants = list(r["rows"])
    names = [NAMES.get(v, v) for v in variants]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    y = np.arange(len(variants))
    ret = [_avg_stat(per, ("rows", v, "retention")) for v in variants]
    axes[0].barh(y, [100 * s["mean"] for s in ret], xerr=[100 * s["std"] for s in ret], color="tab:blue")
    axes[0].set_xlim(min(100 * s["min"] for s in ret) - 5, 101)
    axes[0].set_title("Mean retention of single-modality accuracy (%)")
    mix = [_avg_stat(per, ("rows", v, "mixed")) for v in variants]
    axes[1].barh(y, [100 * s["mean"] for s in mix], xerr=[100 * s["std"] for s in mix], color="tab:orange")
    ftm = _avg_stat(per, ("finetuned", "mixed"))
    axes[1].axvline(100 * ftm["mean"], color="k", ls="--", lw=0.8, label="fine-tuned, routed")
    axes[1].axvline(25, color="grey", ls=":", lw=0.8, label="chance")
    axes[1].set_title("Zero-shot mixed-modality accuracy (%)")
    axes[1].legend(fontsize=7)
    for ax in axes[:2]:
        ax.set_yticks(y)
        ax.set_yticklabels(names if ax is axes[0] else [], fontsize=8)
        ax.invert_yaxis()
    g = r.get("growth") or {}
    if g.get("points"):
        ns = [int(n) for n in g["points"]]
        for m in next(iter(g["points"].values()))["methods"]:
            stats = [g["points"][str(n)]["methods"][m]["mean_retention"] for n in ns]
            axes[2].errorbar(
                ns,
                [100 * s["mean"] for s in stats],
                yerr=[100 * s["std"] for s in stats],
                marker="o",
                capsize=3,
                label=f"{NAMES.get(m, m)} ({g['points'][str(ns[-1])]['methods'][m]['bytes']['mean'] / 1e6:.0f} MB at "
                f"N={ns[-1]})",
            )
        whole = g["points"][str(ns[-1])]["whole_bytes"]["mean"] / 1e6
        axes[2].axhline(100, color="k", lw=0.8, label=f"every model whole ({whole:.0f} MB at N={ns[-1]})")
        axes[2].set_xticks(ns)
        axes[2].set_xlabel("number of merged MLLMs")
        axes[2].set_title("Retention as the number of merged models grows (%)")
        axes[2].legend(fontsize=7)
    fig.suptitle(f"MMER in miniature ({r['mode']}, mean ± std over {len(r['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
