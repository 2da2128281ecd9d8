"""Storage as a measured choice: τ* stored exact, as int8 or as int4 codes with per-group scales, on the mini
paper's trained models.

For MMER (and TALL and EMR, for the bytes beside them) this merges the cached fine-tuned MLLMs of ``run.py``
with each ``tau_storage``, then reports per modality: test accuracy and retention against the fine-tuned model,
the rebuild error of θ̂ᵢ against the same merge stored exact (max / mean absolute, and relative to the
modality's merged delta ‖θ̂ᵢ − θ_base‖₁), τ*'s own dequantisation error (and its largest ratio to half a group's
scale, the bound FORMAT.md promises), and the checkpoint's bytes per LLM parameter beside keeping every
fine-tuned model whole. The masks are made from the exact τ* (storage only), so the exact and quantised
checkpoints share every mask bit; the script checks that too.

``python examples/mini_paper/storage.py`` (after ``run.py`` has trained and cached the models) writes
``results/storage/results.{md,json}``; ``--render`` rewrites the markdown from the JSON. Reads ``.cache/full``
and the study's model and data code; changes nothing there.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mini_model as B  # noqa: E402
from mini_data import MODALITIES, load_all  # noqa: E402

import mmer  # noqa: E402
from mmer.checkpoint import quant  # noqa: E402
from mmer.io.reader import CheckpointReader  # noqa: E402
from mmer.route.weights import DeviceWeights  # noqa: E402

PARTS = ("base", "tau_star", "masks", "components")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def variants(group_size: int) -> dict[str, dict]:
    """Label → merge options. MMER as the study runs it (per-tensor trim); TALL and EMR for their bytes."""
    mmer_options = {"method": "ties", "mask": "mmer", "trim_scope": "per-tensor"}
    out = {}
    for method, options in (
        ("MMER", mmer_options),
        ("TALL", {"method": "task_arithmetic", "mask": "tall"}),
        ("EMR", {"method": "emr", "mask": "emr"}),
    ):
        out[f"{method} exact"] = options
        out[f"{method} int8 G={group_size}"] = {**options, "tau_storage": "int8", "tau_group_size": group_size}
        out[f"{method} int4 G={group_size}"] = {**options, "tau_storage": "int4", "tau_group_size": group_size}
    out[f"MMER int4 G={group_size // 4}"] = {**mmer_options, "tau_storage": "int4", "tau_group_size": group_size // 4}
    return out


def part_bytes(path: Path) -> dict[str, int]:
    sizes = dict.fromkeys((*PARTS, "other"), 0)
    for file in path.rglob("*"):
        if file.is_file():
            top = file.relative_to(path).parts[0]
            sizes[top if top in PARTS else "other"] += file.stat().st_size
    return sizes


def rebuilt(ckpt) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, B.Encoder]]:
    """Each modality's LLM as the router's weights give it (θ_base + sᵢ·mᵢ∘τ*), and its encoder."""
    dw = DeviceWeights(ckpt, ckpt.modalities, torch.device("cpu"))
    names = [s.name for s in ckpt.slots]
    weights = {m: {n: dw.full(m, n).float() for n in names} for m in ckpt.modalities}
    encoders = {}
    for m in ckpt.modalities:
        reader = ckpt.component_reader(m)
        encoders[m] = B.Encoder.from_components({k: reader.get(k) for k in reader.tensors})
    return weights, encoders


def tau_error(exact, q) -> dict[str, float]:
    """τ*'s dequantisation error over every merged tensor, and its largest ratio to half its group's scale."""
    encoding = q.tau_star_encoding
    reader = CheckpointReader(q.path / q.manifest.tau_star_dir)
    diff_sum = norm = worst = ratio = 0.0
    count = 0
    for slot in q.merged_slots:
        tau, back = exact.tau_star(slot.name).float(), q.tau_star(slot.name).float()
        diff = (back - tau).abs()
        cols = slot.shape[-1] if slot.shape else 1
        scales = reader.get(slot.name + quant.SCALES_SUFFIX)
        scales = scales.reshape(-1, scales.shape[-1])
        half = scales.repeat_interleave(encoding.group_size, dim=-1)[:, :cols].reshape(tau.shape) / 2
        diff_sum += float(diff.sum())
        norm += float(tau.abs().sum())
        worst = max(worst, float(diff.max()))
        ratio = max(ratio, float((diff / half).max()))
        count += tau.numel()
    reader.close()
    return {"max_abs": worst, "mean_abs": diff_sum / count, "rel_l1": diff_sum / norm, "max_over_half_scale": ratio}


def rebuild_error(weights_q, weights_exact, base) -> dict[str, dict[str, float]]:
    out = {}
    for m, state in weights_q.items():
        diff = {n: (state[n] - weights_exact[m][n]).abs() for n in state}
        numel = sum(d.numel() for d in diff.values())
        delta = sum(float((weights_exact[m][n] - base[n]).abs().sum()) for n in state)
        out[m] = {
            "max_abs": max(float(d.max()) for d in diff.values()),
            "mean_abs": sum(float(d.sum()) for d in diff.values()) / numel,
            "rel_to_delta": sum(float(d.sum()) for d in diff.values()) / delta,
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "full", help="run.py's cache")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "storage")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", action="store_true", help="only rewrite results.md from results.json")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="which seed's models run.py trained (<workdir>/seed<S>/models); the single-seed layout of earlier "
        "run.py versions (<workdir>/models) is read when that folder is absent",
    )
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads((args.results / "results.json").read_text())
        (args.results / "results.md").write_text(render_markdown(report))
        return report
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    models_dir = args.workdir / f"seed{args.seed}" / "models"
    if not models_dir.is_dir():
        models_dir = args.workdir / "models"
    models = {name: models_dir / name for name in ("base", *MODALITIES)}
    missing = [str(p) for p in models.values() if not (p / "model.safetensors").is_file()]
    if missing:
        raise SystemExit(f"no trained model at {missing[0]}: run `python examples/mini_paper/run.py` first")
    data = load_all(args.workdir / "data", tiny=False)
    prompter = B.Prompter(B.load_tokenizer())
    base, _ = B.load_mllm(models["base"])
    tuned_acc, whole_bytes = {}, 0
    for m in MODALITIES:
        llm, encoder = B.load_mllm(models[m])
        tuned_acc[m] = B.accuracy([llm], encoder, m, data[m][1], prompter)
        whole_bytes += sum(t.nbytes for t in llm.values())
    params = sum(t.numel() for t in base.values())
    log("fine-tuned accuracy: " + ", ".join(f"{m} {a:.4f}" for m, a in tuned_acc.items()))

    specs = tuple(mmer.ModelSpec(str(models[m]), modality=m) for m in MODALITIES)
    rows: dict[str, dict] = {}
    exact_weights: dict[str, dict] = {}
    for label, options in variants(args.group_size).items():
        method, storage = label.split(" ", 1)
        out = args.workdir / "storage" / label.replace(" ", "_").replace("=", "")
        t0 = time.perf_counter()
        recipe = mmer.Recipe(
            mmer.ModelSpec(str(models["base"])), specs, mmer.MergeOptions(hash_inputs=False, **options)
        )
        mmer.run_merge(recipe, out, overwrite=True)
        seconds = time.perf_counter() - t0
        sizes = part_bytes(out)
        with mmer.load_decoupled(out) as ckpt:
            weights, encoders = rebuilt(ckpt)
            accs = {m: B.accuracy([weights[m]], encoders[m], m, data[m][1], prompter) for m in MODALITIES}
            row = {
                "method": method,
                "storage": storage,
                "acc": accs,
                "retention": {m: accs[m] / tuned_acc[m] for m in MODALITIES},
                "bytes": sizes,
                "llm_bytes_per_param": (sizes["base"] + sizes["tau_star"] + sizes["masks"]) / params,
                "tau_bytes_per_param": sizes["tau_star"] / params,
                "merge_seconds": seconds,
            }
            if storage == "exact":
                exact_weights[method] = weights
            else:
                with mmer.load_decoupled(args.workdir / "storage" / f"{method}_exact") as exact:
                    row["tau_error"] = tau_error(exact, ckpt)
                    same = all(
                        torch.equal(exact.mask_file(m).packed(s.name), ckpt.mask_file(m).packed(s.name))
                        for m in MODALITIES
                        for s in ckpt.merged_slots
                    )
                row["masks_equal_exact"] = same
                row["rebuild_error"] = rebuild_error(weights, exact_weights[method], base)
        rows[label] = row
        log(
            f"{label:18s} retention "
            + " ".join(f"{m} {row['retention'][m]:.4f}" for m in MODALITIES)
            + f" | LLM {row['llm_bytes_per_param']:.3f} B/param (τ* {row['tau_bytes_per_param']:.3f})"
            + f" | {seconds:.0f} s"
        )
    report = {
        "command": "python examples/mini_paper/storage.py",
        "group_size": args.group_size,
        "llm_parameters": params,
        "llm_dtype": str(next(iter(base.values())).dtype).removeprefix("torch."),
        "finetuned_acc": tuned_acc,
        "whole_models_bytes_per_param": whole_bytes / params,
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "machine": f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}",
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.results / "results.md").write_text(render_markdown(report))
    log(f"done in {report['seconds']:.0f} s; {args.results}")
    return report


def render_markdown(r: dict) -> str:
    short = {"digits": "I", "speech": "A", "points": "P"}
    lines = [
        "# τ* storage on the mini paper's models",
        "",
        f"`{r['command']}` — {r['llm_parameters'] / 1e6:.1f} M LLM parameters in {r['llm_dtype']}, "
        f"3 modalities; {r['machine']}; {r['seconds'] / 60:.1f} min on a shared machine under heavy load "
        "(merge times are not comparable across rows).",
        "",
        "Bytes per LLM parameter count base + τ* + masks as stored (components are the same in every row). "
        "Rebuild error: θ̂ᵢ against the same method's exact checkpoint, max |Δ| and ‖Δ‖₁ / ‖θ̂ᵢ − θ_base‖₁, "
        "worst modality. τ* bound: max |deq − τ*| / (s/2) over every entry: 1 by construction, up to float32 "
        "rounding of x / s and q·s (at most 1 + 4·qmax·2⁻²⁴).",
        "",
        "| method | τ* storage | retention I / A / P | B/param (LLM) | τ* B/param | rebuild max abs | rebuild rel | "
        "τ* rel ℓ1 | τ* bound | masks = exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"].values():
        ret = " / ".join(f"{100 * row['retention'][m]:.2f}" for m in short)
        err = row.get("rebuild_error")
        tau = row.get("tau_error")
        errors = "— | — | — | — | —"
        if err:
            worst = max(e["max_abs"] for e in err.values()), max(e["rel_to_delta"] for e in err.values())
            same = "yes" if row["masks_equal_exact"] else "NO"
            errors = (
                f"{worst[0]:.2e} | {worst[1]:.2%} | {tau['rel_l1']:.2%} | {tau['max_over_half_scale']:.6f} | {same}"
            )
        lines.append(
            f"| {row['method']} | {row['storage']} | {ret} % | {row['llm_bytes_per_param']:.3f} | "
            f"{row['tau_bytes_per_param']:.3f} | " + f"{errors} |"
        )
    lines += [
        f"| every fine-tuned model kept whole | — | 100 / 100 / 100 % | {r['whole_models_bytes_per_param']:.3f} | "
        "— | 0 | 0 | — | — | — |",
        "",
        "Fine-tuned accuracy: " + ", ".join(f"{m} {a:.4f}" for m, a in r["finetuned_acc"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
