"""The study's four added tables, for one seed: forgetting (the paper's Table 3), growth (its Fig. 5), LoRA adapters
against MMER, and each modality's mask density beside its task vector's size and sign conflicts.

Every function reads the seed's fine-tuned models and chosen merges from ``study.run_seed`` and returns plain
numbers; nothing here chooses a hyper-parameter (the merges reuse what the validation split chose).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import mini_model as B
import numpy as np
import study as S
import torch
from mini_data import MODALITIES, TASKS

import mmer
from mmer.route.weights import DeviceWeights


def _base_bytes(dirs) -> int:
    """The base LLM's bytes: a checkpoint that stores the base by reference needs it beside itself."""
    return S.dir_bytes(dirs["base"], "*.safetensors")


# ------------------------------------------------------------------------------------------- (d) mask stats
def mask_statistics(tuned, base, merged_root: Path, rows: dict, modalities) -> dict:
    """Per modality: its task vector's size (ℓ2 norm, mean |τᵢ| over the entries it moved, share of entries it
    moved), its sign-conflict rate with the others (share of the entries it moved where Σ_{j≠i} τⱼ has the other
    sign), and what MMER's chosen mask keeps of it (density over the merged entries, share of ‖τᵢ‖₁ under the
    mask). Measured on the ``ties/mmer`` checkpoint the validation split chose."""
    out: dict = {}
    names = list(base)
    norms = dict.fromkeys(modalities, 0.0)
    l1 = dict.fromkeys(modalities, 0.0)
    moved = dict.fromkeys(modalities, 0)
    conflict = dict.fromkeys(modalities, 0)
    considered = dict.fromkeys(modalities, 0)
    total = 0
    for n in names:
        taus = {m: (tuned[m][n].float() - base[n].float()) for m in modalities}
        everyone = sum(taus.values())
        total += everyone.numel()
        for m, t in taus.items():
            others = everyone - t
            nz = t != 0
            norms[m] += float((t * t).sum())
            l1[m] += float(t.abs().sum())
            moved[m] += int(nz.sum())
            both = nz & (others != 0)
            considered[m] += int(both.sum())
            conflict[m] += int((both & (torch.sign(t) != torch.sign(others))).sum())
    for m in modalities:
        out[m] = {
            "tau_l2": norms[m] ** 0.5,
            "tau_mean_abs_moved": l1[m] / max(1, moved[m]),
            "tau_moved_share": moved[m] / total,
            "sign_conflict": conflict[m] / max(1, considered[m]),
        }
    path = merged_root / "ties__mmer"
    if "ties/mmer" in rows and path.is_dir():
        with mmer.load_decoupled(path) as ckpt:
            dw = DeviceWeights(ckpt, ckpt.modalities, torch.device("cpu"))
            kept = dict.fromkeys(modalities, 0.0)
            tau_l1 = dict.fromkeys(modalities, 0.0)
            for slot in ckpt.merged_slots:
                for m in modalities:
                    t = (tuned[m][slot.name].float() - base[slot.name].float()).abs()
                    kept[m] += float(t[dw.mask(m, slot.name)].sum())
                    tau_l1[m] += float(t.sum())
        for m in modalities:
            out[m]["mmer_density"] = rows["ties/mmer"]["density"][m]
            out[m]["mmer_kept_l1_share"] = kept[m] / max(tau_l1[m], 1e-30)
            out[m]["mmer_retention"] = rows["ties/mmer"]["retention"][m]
    return out


# ------------------------------------------------------------------------------------------- (a) forgetting
def forgetting(dirs, data, tuned, encs, ft_acc, prompter, seed_root: Path, mmer_variant: str) -> dict:
    """Table 3 in miniature. The speech MLLM is fine-tuned further on a new task (spoken digit words). Measured
    on the old tasks and the new one: the speech MLLM before, the same MLLM after (forgetting), the MMER
    checkpoint of the three original MLLMs, and that checkpoint after ``mmer.add_models`` adds the further-tuned
    MLLM as one more task (each task through its own mask)."""
    new, cont = S.NEW_TASK, S.CONTINUED
    rows = {}

    def acc(weights, enc, task):
        return B.accuracy([weights], enc, task, data[task]["test"], prompter)

    rows["speech_before"] = {"speech": ft_acc["speech"], new: acc(tuned["speech"], encs["speech"], new)}
    rows["speech_after"] = {"speech": acc(tuned[cont], encs[cont], "speech"), new: acc(tuned[cont], encs[cont], new)}
    before = seed_root / "merged" / S._slug(mmer_variant)
    weights, enc, _ = S.checkpoint_weights(before, extra=False)
    rows["mmer_before_add"] = {m: acc(weights[m], enc[m], m) for m in MODALITIES}
    after = seed_root / "merged" / (S._slug(mmer_variant) + "+add")
    t = time.perf_counter()
    report = mmer.add_models(before, [mmer.ModelSpec(str(dirs[cont]), modality=cont)], after, overwrite=True)
    add_s = time.perf_counter() - t
    weights, enc, density = S.checkpoint_weights(after, extra=False)
    rows["mmer_after_add"] = {m: acc(weights[m], enc[m], m) for m in MODALITIES}
    rows["mmer_after_add"][new] = acc(weights[cont], enc[cont], new)
    shutil.rmtree(after)
    return {
        "acc": rows,
        "reference": {**{m: ft_acc[m] for m in MODALITIES}, new: rows["speech_after"][new]},
        "add_sources": {name: old.source for name, old in report.old.items()},
        "add_seconds": add_s,
        "density_after_add": density,
    }


# ------------------------------------------------------------------------------------------- (b) growth
def growth(dirs, data, ft_acc, prompter, s, seed: int, work: Path, rows: dict) -> dict:
    """Fig. 5 in miniature: merge the first N of the five tasks (N = 2..5) with each method at the options the
    validation split chose for it on the three modalities (N = 3 is that very merge), and measure every task's
    test retention and the bytes on disk against keeping every fine-tuned MLLM whole."""
    out: dict = {"tasks": list(TASKS), "points": {}}
    whole = {t: S.dir_bytes(dirs[t], "*.safetensors") for t in TASKS}
    base_bytes = _base_bytes(dirs)
    for n in range(2, len(TASKS) + 1):
        tasks = TASKS[:n]
        point = {"whole_bytes": sum(whole[t] for t in tasks), "methods": {}}
        for variant in s.growth_methods:
            if variant not in rows:
                continue
            options = S.options_for(variant, s, seed, rows[variant]["chosen"])
            routed = rows[variant]["routed"]
            if n == len(MODALITIES):
                accs, stored = rows[variant]["acc"], rows[variant]["bytes"]
            else:
                target = work / f"seed{seed}" / "merged" / f"growth{n}.{S._slug(variant)}"
                S.merge(dirs, tasks, options, target)
                weights, enc, _ = S.checkpoint_weights(target, extra=False)
                accs = S.accuracies(weights, enc, tasks, data, "test", prompter)
                stored = S.dir_bytes(target)
                shutil.rmtree(target)
                del weights
            retention = {t: accs[t] / ft_acc[t] if ft_acc[t] else 0.0 for t in tasks}
            point["methods"][variant] = {
                "acc": dict(accs),
                "retention": retention,
                "mean_retention": float(np.mean(list(retention.values()))),
                "bytes": stored + (base_bytes if routed else 0),
            }
        out["points"][str(n)] = point
        S.log(
            f"seed {seed}: growth N={n}: "
            + ", ".join(f"{v} {p['mean_retention']:.3f}" for v, p in point["methods"].items())
        )
    return out


# ------------------------------------------------------------------------------------------- (c) adapters
def adapters(dirs, data, ft_acc, prompter, rows: dict, base) -> dict:
    """LoRA against MMER: each modality's LoRA MLLM's test accuracy (retention against its fully fine-tuned
    twin of the same seed) and the bytes of what one keeps to serve the three modalities: the base plus one
    adapter and one encoder per modality (peft's adapter file as saved)."""
    per = {}
    for m in MODALITIES:
        d = dirs["lora:" + m]
        llm, enc = B.load_mllm(d / "effective")
        acc = B.accuracy([llm], enc, m, data[m]["test"], prompter)
        enc_bytes = sum(t.numel() * t.element_size() for t in enc.component_state().values())
        per[m] = {
            "acc": acc,
            "retention": acc / ft_acc[m] if ft_acc[m] else 0.0,
            "adapter_bytes": S.dir_bytes(d / "adapter", "*.safetensors"),
            "encoder_bytes": enc_bytes,
            "adapter_params_moved": int(sum(int((llm[k] != base[k]).sum()) for k in base)),
        }
    base_bytes = _base_bytes(dirs)
    whole = sum(S.dir_bytes(dirs[m], "*.safetensors") for m in MODALITIES)
    out = {
        "lora": per,
        "lora_total_bytes": base_bytes + sum(p["adapter_bytes"] + p["encoder_bytes"] for p in per.values()),
        "lora_mean_retention": float(np.mean([p["retention"] for p in per.values()])),
        "whole_bytes": whole,
        "base_bytes": base_bytes,
    }
    if "ties/mmer" in rows:
        out["mmer_total_bytes"] = rows["ties/mmer"]["bytes"] + base_bytes
        out["mmer_mean_retention"] = float(np.mean(list(rows["ties/mmer"]["retention"].values())))
        out["mmer_retention"] = rows["ties/mmer"]["retention"]
    return out
