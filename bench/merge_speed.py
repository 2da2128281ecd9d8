"""Merge speed and memory: mmer's full MMER merge against the stream floor and mergekit's TIES, one table.

Workload (issue "Performance"): a TinyLlama-shaped Llama (hidden 2048, 22 layers, intermediate 5632, vocab
32000, bf16, sharded safetensors) as the base, plus three fine-tunes = base + small seeded Gaussian deltas.
Built once, deterministically, under bench/.cache/ (about 8.8 GB); no download.

``--workload realistic`` builds the same shapes with fine-tunes whose deltas look like real ones instead
(bench/workloads.py: a large share of entries exactly unchanged in bf16, heavy-tailed moves quantised to the
weights' own bf16 steps so thresholds sit in blocks of ties, untouched embedding rows).

Measured in fresh subprocesses, in rounds (each round runs every row once, so the floor and mmer alternate under
the same page cache and load), median of --repeats rounds, wall time and peak RSS of the child; the 1-minute load
average before each run is recorded beside the machine:
  floor        read every input tensor, one elementwise pass (sum of the deltas), write one model
  mmer-global  mmer merge (TIES K=0.8 global trim + MMER masks + decoupled write)
  mmer-tensor  the same with per-tensor trim
  mergekit     mergekit-yaml TIES (density 0.2, or --k; weight 1, normalize, bfloat16) from its own venv, if present

Usage:
  python bench/merge_speed.py                       # full workload (needs ~20 GB free disk)
  python bench/merge_speed.py --small               # a 4-layer, hidden-512 version for CI (seconds)
  python bench/merge_speed.py --small --workload realistic --k 0.2   # real-looking deltas, K = 0.2
  python bench/merge_speed.py --mergekit-python /path/to/venv/bin/python   # where mergekit is installed
  python bench/merge_speed.py --device cuda         # run mmer's math on a GPU
  python bench/merge_speed.py --check-floor-ratio 6 # exit 1 if mmer-global is slower than 6x the floor
  python bench/merge_speed.py --small --workload realistic --matrix   # every variant, beside floor and mergekit
  python bench/merge_speed.py --workload realistic --threads 1   # one thread per run: CPU time on a shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from machine_info import cpu_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

FULL = {"hidden": 2048, "layers": 22, "intermediate": 5632, "vocab": 32000, "heads": 32, "kv_heads": 4}
SMALL = {"hidden": 512, "layers": 4, "intermediate": 1408, "vocab": 8000, "heads": 8, "kv_heads": 2}


def llama(cfg: dict) -> dict[str, object]:
    """The benchmark's sizes as a Llama config.json; the shape rules live in mmer.synthetic with the tests' ones."""
    from mmer.synthetic import llama_config

    return llama_config(
        hidden=cfg["hidden"],
        intermediate=cfg["intermediate"],
        layers=cfg["layers"],
        heads=cfg["heads"],
        kv_heads=cfg["kv_heads"],
        vocab=cfg["vocab"],
        max_positions=2048,
        torch_dtype="bfloat16",
    )


def build(root: Path, cfg: dict, n_models: int = 3) -> list[Path]:
    """Write base + fine-tunes once (bf16, ~1 GB shards), tensor by tensor; reuse when already complete."""
    import torch
    from safetensors.torch import save_file

    from mmer.synthetic import llama_shapes

    dirs = [root / "base"] + [root / f"ft{i}" for i in range(n_models)]
    if all((d / "done").is_file() for d in dirs):
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    config = llama(cfg)
    names = llama_shapes(config)
    for m, d in enumerate(dirs):
        d.mkdir(parents=True)
        files: list[str] = []
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        names_list = list(names.items())
        for i, (name, shape) in enumerate(names_list):
            g = torch.Generator().manual_seed(1000 * i)
            base = torch.randn(shape, generator=g) * 0.02
            if m > 0:
                gd = torch.Generator().manual_seed(1000 * i + m)
                base += torch.randn(shape, generator=gd) * 0.002
            shard[name] = base.to(torch.bfloat16)
            last = i == len(names_list) - 1
            if last or sum(t.numel() for t in shard.values()) * 2 >= 1_000_000_000:
                file = f"model-{len(files) + 1:05d}.safetensors"
                save_file(shard, str(d / file), metadata={"format": "pt"})
                files.append(file)
                weight_map.update(dict.fromkeys(shard, file))
                shard = {}
        total = len(files)
        renamed = {}
        for k, old in enumerate(files):
            new = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
            (d / old).rename(d / new)
            renamed[old] = new
        index = {"metadata": {}, "weight_map": {n: renamed[f] for n, f in weight_map.items()}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        (d / "config.json").write_text(json.dumps(config))
        (d / "done").write_text("ok")
    return dirs


CHILD = {
    "floor": """
        # The stream floor, written as fast as we know how so the ratio is honest: chunked like mmer (same
        # allocator tuning), inputs unmapped after each tensor, output flushed every ~1 GB.
        import sys, torch
        from pathlib import Path
        from safetensors.torch import save_file
        from mmer.io.reader import CheckpointReader
        from mmer.runtime import reuse_freed_memory
        reuse_freed_memory()
        dirs, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
        out.mkdir(parents=True, exist_ok=True)
        readers = [CheckpointReader(d) for d in dirs]
        chunk, result, size = 1 << 20, {}, 0
        for name in readers[0].tensors:
            base = readers[0].get(name, copy=False)
            fts = [r.get(name, copy=False).reshape(-1) for r in readers[1:]]
            merged = torch.empty(base.shape, dtype=base.dtype)
            flat, src = merged.reshape(-1), base.reshape(-1)
            for s in range(0, src.numel(), chunk):
                b = src[s : s + chunk].float()
                acc = b.clone()
                for f in fts:
                    acc += f[s : s + chunk] - b
                flat[s : s + chunk] = acc
            result[name] = merged
            size += merged.numel() * merged.element_size()
            del base, fts
            for r in readers:
                r.release()
            if size > 1_000_000_000:
                save_file(result, str(out / f"{len(list(out.iterdir()))}.safetensors")); result, size = {}, 0
        if result:
            save_file(result, str(out / f"{len(list(out.iterdir()))}.safetensors"))
    """,
    "mmer": """
        import sys, mmer
        from pathlib import Path
        scope, device, k, dirs, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:-1], Path(sys.argv[-1])
        recipe = mmer.Recipe(
            mmer.ModelSpec(dirs[0]),
            tuple(mmer.ModelSpec(d, modality=f"m{i}") for i, d in enumerate(dirs[1:])),
            mmer.MergeOptions(trim_scope=scope, device=device, k=k, hash_inputs=False),
        )
        report = mmer.run_merge(recipe, out, overwrite=True)
        print("MMER_SECONDS", report.seconds)
    """,
    "mmer-options": """
        # One matrix row: any MergeOptions, given as JSON. Prints the plan's memory estimate and this process's
        # peak RSS before the merge (imports, plan), so the row's growth can be held against the estimate.
        import json, resource, sys, mmer
        from pathlib import Path
        from mmer.plan import estimate_memory
        options, dirs, out = json.loads(sys.argv[1]), sys.argv[2:-1], Path(sys.argv[-1])
        recipe = mmer.Recipe(
            mmer.ModelSpec(dirs[0]),
            tuple(mmer.ModelSpec(d, modality=f"m{i}") for i, d in enumerate(dirs[1:])),
            mmer.MergeOptions(hash_inputs=False, **options),
        )
        with mmer.build_plan(recipe) as plan:
            print("MMER_ESTIMATE", estimate_memory(plan).peak_bytes)
            print("MMER_BASELINE", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
            report = mmer.run_merge(plan, out, overwrite=True)
        print("MMER_SECONDS", report.seconds)
    """,
}

MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
rss, cpu = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
tail = {"stdout": proc.stdout[-2000:], "stderr": proc.stderr[-2000:]}
print(json.dumps({"wall": wall, "cpu": cpu, "rss": rss, "rc": proc.returncode, **tail}))
"""


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` under a tiny parent that reports its wall time, CPU time (user + system, every thread) and peak
    RSS (RUSAGE_CHILDREN). On a machine other work shares, CPU time is the steadier measure of the work done."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{result['stderr']}")
    return result


def mergekit_config(
    dirs: list[Path], path: Path, density: float = 0.2, method: str = "ties", dtype: str = "bfloat16"
) -> Path:
    params = {"weight": 1.0} if method == "task_arithmetic" else {"density": density, "weight": 1.0}
    models = [{"model": str(d), "parameters": params} for d in dirs[1:]]
    config = {
        "merge_method": method,
        "base_model": str(dirs[0]),
        "models": models,
        "parameters": {"normalize": method != "task_arithmetic"},
        "dtype": dtype,
    }
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


# The matrix (--matrix): every variant the issue names, each beside mergekit at the same kept share where mergekit
# has the method. name → (mmer options, input dtype, mergekit method or None).
MATRIX: dict[str, tuple[dict, str, str | None]] = {
    "ties/mmer K0.8 global": ({"k": 0.8}, "bfloat16", "ties"),
    "ties/mmer K0.2 global": ({"k": 0.2}, "bfloat16", "ties"),
    "ties/mmer K0.8 per-tensor": ({"k": 0.8, "trim_scope": "per-tensor"}, "bfloat16", None),
    "ties/mmer K0.2 per-tensor": ({"k": 0.2, "trim_scope": "per-tensor"}, "bfloat16", None),
    "ties+dare0.5/mmer, no trim": ({"k": 1.0, "dare": 0.5}, "bfloat16", "dare_ties"),
    "task_arithmetic/tall": ({"method": "task_arithmetic", "mask": "tall"}, "bfloat16", None),
    "emr/emr": ({"method": "emr", "mask": "emr"}, "bfloat16", None),
    "task_arithmetic/none": ({"method": "task_arithmetic", "mask": "none"}, "bfloat16", "task_arithmetic"),
    "ties/mmer K0.8 fp16 inputs": ({"k": 0.8}, "float16", "ties"),
    "ties/mmer K0.8 fp32 inputs": ({"k": 0.8}, "float32", "ties"),
}


def converted(dirs: list[Path], dtype: str) -> list[Path]:
    """The workload's models re-saved in ``dtype`` beside the originals (once; cached)."""
    if dtype == "bfloat16":
        return dirs
    import torch
    from safetensors.torch import load_file, save_file

    out = []
    for d in dirs:
        target = d.parent / f"{d.name}-{dtype}"
        if not (target / "done").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for f in d.iterdir():
                if f.suffix == ".safetensors":
                    tensors = {n: t.to(getattr(torch, dtype)) for n, t in load_file(str(f)).items()}
                    save_file(tensors, str(target / f.name), metadata={"format": "pt"})
                elif f.is_file() and f.name != "done":
                    config = f.read_text()
                    if f.name == "config.json":
                        data = json.loads(config)
                        data["torch_dtype"] = data["dtype"] = dtype
                        config = json.dumps(data)
                    (target / f.name).write_text(config)
            (target / "done").write_text("ok")
        out.append(target)
    return out


def matrix_runs(dirs: list[Path], work: Path, device: str, mk: str | None, tag: str, cache: Path) -> dict:
    """Every matrix row as a command; mergekit beside the rows it has, at the same density (K)."""
    runs = {}
    floors = {}
    for name, (options, dtype, mk_method) in MATRIX.items():
        inputs = converted(dirs, dtype)
        if dtype not in floors:
            floor = f"floor ({dtype} inputs)"
            floors[dtype] = floor
            runs[floor] = [sys.executable, "-c", textwrap.dedent(CHILD["floor"]), *map(str, inputs), str(work / "f")]
        opts = {"device": device, **options}
        runs[name] = [
            sys.executable,
            "-c",
            textwrap.dedent(CHILD["mmer-options"]),
            json.dumps(opts),
            *map(str, inputs),
            str(work / "m"),
        ]
        if mk and mk_method:
            density = options.get("k", 1.0) if mk_method != "dare_ties" else 1 - options["dare"]
            mk_name = f"mergekit {mk_method} d{density:g} ({dtype})"
            if mk_name not in runs:
                config = mergekit_config(
                    inputs, cache / f"mergekit-{tag}-{mk_method}-{density:g}-{dtype}.yml", density, mk_method, dtype
                )
                runs[mk_name] = [mk, str(config), str(work / "mk"), "--allow-crimes", "--lazy-unpickle"]
    return runs


def machine() -> dict:
    cpu = cpu_name()
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem / 1e9, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        # Other work on the machine inflates every figure: the 1-minute load average when the run started.
        "load_avg_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="4 layers, hidden 512 (for CI)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit-repeats", type=int, default=None, help="runs of mergekit (default: --repeats)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--workload",
        choices=("gaussian", "realistic"),
        default="gaussian",
        help="fine-tunes as base + dense Gaussian noise, or with deltas shaped like real ones (bench/workloads.py)",
    )
    ap.add_argument(
        "--k", type=float, default=None, help="kept share: mmer's K and mergekit's density (default: 0.8 and 0.2)"
    )
    ap.add_argument("--mergekit-python", default=None, help="python of a venv with mergekit (default: search)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="subset of: floor mmer-global mmer-tensor mergekit")
    ap.add_argument("--check-floor-ratio", type=float, default=None, help="fail if mmer-global > ratio × floor")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads every run may use (torch/OpenMP and numba); on a machine other work shares, --threads 1 "
        "makes CPU time a fair measure of each row's work (no thread pool spins waiting for a descheduled peer)",
    )
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument(
        "--matrix",
        action="store_true",
        help="every variant (K, trim scope, DARE, TALL, EMR, TA, fp16/fp32 inputs) beside the floor and mergekit",
    )
    args = ap.parse_args()

    cfg = SMALL if args.small else FULL
    machine_at_start = machine()
    tag = "small" if args.small else "tinyllama"
    workload = {"family": "gaussian"}
    if args.workload == "realistic":
        tag += "-realistic"
    t = time.perf_counter()
    if args.workload == "realistic":
        from workloads import build_realistic, describe

        from mmer.synthetic import llama_shapes

        dirs = build_realistic(args.cache / f"speed-{tag}", llama(cfg), llama_shapes(llama(cfg)))
        workload = describe(dirs)
    else:
        dirs = build(args.cache / f"speed-{tag}", cfg)
    if args.k is not None:
        tag += f"-k{args.k:g}"
    if args.threads is not None:
        tag += f"-threads{args.threads}"
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # inherited by every measured child
    k, density = (0.8, 0.2) if args.k is None else (args.k, args.k)
    print(f"workload ready in {time.perf_counter() - t:.0f} s: {dirs[0].parent}", flush=True)
    work = args.cache / f"speed-{tag}-out"
    mk_python = args.mergekit_python
    if mk_python is None:
        for candidate in (shutil.which("mergekit-yaml"), "/work/peervenv/bin/mergekit-yaml"):
            if candidate and Path(candidate).exists():
                mk_python = str(Path(candidate).parent / "python")
                break
    runs = {
        "floor": [sys.executable, "-c", textwrap.dedent(CHILD["floor"]), *map(str, dirs), str(work / "floor")],
        "mmer-global": [
            sys.executable,
            "-c",
            textwrap.dedent(CHILD["mmer"]),
            "global",
            args.device,
            str(k),
            *map(str, dirs),
            str(work / "g"),
        ],
        "mmer-tensor": [
            sys.executable,
            "-c",
            textwrap.dedent(CHILD["mmer"]),
            "per-tensor",
            args.device,
            str(k),
            *map(str, dirs),
            str(work / "t"),
        ],
    }
    if mk_python and not args.skip_mergekit:
        config = mergekit_config(dirs, args.cache / f"mergekit-{tag}.yml", density=density)
        mk = str(Path(mk_python).parent / "mergekit-yaml")
        runs["mergekit"] = [mk, str(config), str(work / "mk"), "--allow-crimes", "--lazy-unpickle"]
    if args.matrix:
        tag += "-matrix"
        mk = str(Path(mk_python).parent / "mergekit-yaml") if mk_python and not args.skip_mergekit else None
        runs = matrix_runs(dirs, work, args.device, mk, tag, args.cache)
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only}
    results: dict[str, dict] = {}
    # Rounds, not blocks: every run of a round sees the same page cache and about the same load from whatever else
    # the machine runs, so each row's median is taken under the conditions the floor's is.
    walls: dict[str, list[float]] = {name: [] for name in runs}
    rsss: dict[str, list[int]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    loads: list[float] = []
    last: dict[str, dict] = {}
    for r in range(max(args.repeats, args.mergekit_repeats or 0)):
        for name, cmd in runs.items():
            repeats = args.mergekit_repeats if name.startswith("mergekit") and args.mergekit_repeats else args.repeats
            if r >= repeats:
                continue
            shutil.rmtree(work, ignore_errors=True)
            loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
            m = last[name] = measure(cmd)
            walls[name].append(m["wall"])
            rsss[name].append(m["rss"])
            cpus[name].append(m["cpu"])
            print(
                f"{name:12s} run {r + 1}: {m['wall']:7.1f} s, CPU {m['cpu']:7.1f} s, "
                f"peak RSS {m['rss'] / 1e9:5.2f} GB",
                flush=True,
            )
    for name in runs:
        results[name] = {
            "wall_s": statistics.median(walls[name]),
            "peak_rss_gb": statistics.median(rsss[name]) / 1e9,
            "runs": walls[name],
            "cpu_s": statistics.median(cpus[name]),
            "cpu_runs": cpus[name],
        }
        printed = dict(line.split()[:2] for line in last[name]["stdout"].splitlines() if line.startswith("MMER_"))
        if "MMER_ESTIMATE" in printed:  # the last run's: the estimate and the baseline do not vary between runs
            results[name]["estimate_gb"] = int(printed["MMER_ESTIMATE"]) / 1e9
            results[name]["baseline_rss_gb"] = int(printed["MMER_BASELINE"]) / 1e9
    shutil.rmtree(work, ignore_errors=True)
    table = render_matrix(results, cfg, tag) if args.matrix else render(results, cfg, tag)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    machine_at_start["load_avg_during_runs"] = (
        {
            "min": round(min(loads), 2),
            "median": round(statistics.median(loads), 2),
            "max": round(max(loads), 2),
        }
        if loads
        else None
    )
    payload = {
        "workload": {"tag": tag, **cfg, "fine_tunes": 3, "dtype": "bfloat16", "k": k, "density": density, **workload},
        "machine": machine_at_start,
        "results": results,
    }
    suffix = "" if args.device == "cpu" else f"-{args.device.replace(':', '')}"
    (RESULTS / f"merge_speed-{tag}{suffix}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"merge_speed-{tag}{suffix}.md").write_text(
        f"# merge speed ({tag}, {args.device})\n\nMachine: {json.dumps(payload['machine'])}\n\n{table}\n"
    )
    if args.check_floor_ratio is not None and "floor" in results and "mmer-global" in results:
        ratio = results["mmer-global"]["wall_s"] / results["floor"]["wall_s"]
        if ratio > args.check_floor_ratio:
            print(f"FAIL: mmer-global takes {ratio:.2f}x the stream floor (limit {args.check_floor_ratio}x)")
            return 1
    return 0


def render_matrix(results: dict[str, dict], cfg: dict, tag: str) -> str:
    """One row per variant: against the floor of its input dtype and mergekit's same method at the same density."""
    lines = [
        f"| run ({tag}: hidden {cfg['hidden']}, {cfg['layers']} layers, 3 fine-tunes) | wall s (median) | "
        "peak RSS GB | growth over imports + plan ≤ --dry-run estimate | ÷ floor (same input dtype) | "
        "mergekit, same method and density | mergekit ÷ this |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name.startswith(("floor", "mergekit")):
            continue
        options, dtype, mk_method = MATRIX[name]
        floor = results.get(f"floor ({dtype} inputs)")
        ratio = f"{r['wall_s'] / floor['wall_s']:.2f}" if floor else "-"
        mk, versus = "-", "-"
        if mk_method:
            density = options.get("k", 1.0) if mk_method != "dare_ties" else 1 - options["dare"]
            found = results.get(f"mergekit {mk_method} d{density:g} ({dtype})")
            if found:
                mk = f"{mk_method} d={density:g}: {found['wall_s']:.1f} s, {found['peak_rss_gb']:.2f} GB"
                versus = f"{found['wall_s'] / r['wall_s']:.2f}"
        bound = "-"
        if "estimate_gb" in r:
            growth = r["peak_rss_gb"] - r["baseline_rss_gb"]
            ok = "yes" if growth <= r["estimate_gb"] else "**no**"
            bound = (
                f"{ok}: {growth:.2f} ≤ {r['estimate_gb']:.2f}"
                if ok == "yes"
                else f"{ok}: {growth:.2f} > {r['estimate_gb']:.2f}"
            )
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {bound} | {ratio} | {mk} | {versus} |")
    for name, r in results.items():
        if name.startswith("floor"):
            lines.append(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | | 1.00 | | |")
    return "\n".join(lines)


def render(results: dict[str, dict], cfg: dict, tag: str) -> str:
    floor = results.get("floor", {}).get("wall_s")
    mk = results.get("mergekit")
    lines = [
        f"| run ({tag}: hidden {cfg['hidden']}, {cfg['layers']} layers, 3 fine-tunes) | wall s (median) | "
        "peak RSS GB | ÷ floor | CPU s (median) | CPU ÷ floor's | mergekit ÷ this | RSS ÷ mergekit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    floor_cpu = results.get("floor", {}).get("cpu_s")
    for name, r in results.items():
        ratio_floor = f"{r['wall_s'] / floor:.2f}" if floor else "-"
        cpu = f"{r['cpu_s']:.1f}" if "cpu_s" in r else "-"
        ratio_cpu = f"{r['cpu_s'] / floor_cpu:.2f}" if floor_cpu and "cpu_s" in r else "-"
        speedup = f"{mk['wall_s'] / r['wall_s']:.2f}" if mk else "-"
        rss_ratio = f"{r['peak_rss_gb'] / mk['peak_rss_gb']:.2f}" if mk else "-"
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {ratio_floor} | {cpu} | {ratio_cpu} | {speedup} "
            f"| {rss_ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
