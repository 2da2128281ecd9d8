#!/usr/bin/env python
"""Peak memory and wall time of an MMER merge as the model gets deeper: mmer's streaming pipeline against
the obvious in-memory implementation and a streaming I/O floor.

    python bench/memory_vs_depth.py [--layers 4 8 16 32] [--hidden 512] [--models 3] [--repeats 3] [--device cpu]

For every depth it builds (once, cached under bench/.cache/) a Llama-shaped bf16 base and ``--models``
fine-tunes (base + small seeded Gaussian deltas), then runs three contenders, each in a fresh Python process
so its peak RSS is its own:

* ``mmer``      ``mmer.run_merge`` through the Python API (decoupled checkpoint: base copy, τ*, packed masks);
* ``in-memory`` every shard of every model loaded with ``safetensors.torch.load_file``, τᵢ flattened with
                ``torch.cat``, global ``kthvalue`` threshold, TIES on stacked tensors, MMER masks, ``save_file``;
* ``floor``     read every input tensor once, one elementwise pass (their sum), write one model-sized file.

It prints one table, and writes bench/results/memory_vs_depth.json and .md. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from machine_info import cpu_name

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
BUILDER_VERSION = 2  # bump when the synthetic models change, so stale caches are rebuilt
VOCAB = 32000
WEIGHT_STD = 0.02
DELTA_STD = 0.002  # fine-tune delta: a tenth of the weight scale, well above bf16 resolution at 0.02
K, LAMBDA = 0.8, 0.9  # mmer's defaults (paper values); the in-memory baseline uses the same
METHODS = ("mmer", "in-memory", "floor")
GB = 1e9


# ============================================================================================ model building
def intermediate_size(hidden: int) -> int:
    """≈ 2.75·H rounded to a multiple of 64 (1408 for H = 512, 2816 for 1024, TinyLlama's 5632 for 2048)."""
    return max(64, round(2.75 * hidden / 64) * 64)


def llama_config(hidden: int, layers: int) -> dict[str, Any]:
    """Multi-head attention (k/v as wide as q), ``intermediate_size(hidden)`` MLPs, the benchmark's vocabulary."""
    from mmer.synthetic import llama_config as config

    heads = max(1, hidden // 64)
    inter = intermediate_size(hidden)
    return config(
        hidden=hidden, intermediate=inter, layers=layers, heads=heads, kv_heads=heads, vocab=VOCAB, max_positions=2048,
        torch_dtype="bfloat16",
    )  # fmt: skip


def tensor_shapes(hidden: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model in file order: embeddings, layers 0..N-1, final norm, lm_head."""
    from mmer.synthetic import llama_shapes

    return list(llama_shapes(llama_config(hidden, layers)).items())


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


Shapes = list[tuple[str, tuple[int, ...]]]


def plan_shards(shapes: Shapes, shard_bytes: int) -> list[Shapes]:
    """Consecutive tensors grouped into shards of at most ``shard_bytes`` of bf16."""
    shards: list[Shapes] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = numel(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def depth_dir(args: argparse.Namespace, layers: int) -> Path:
    return CACHE / f"llama-h{args.hidden}-v{VOCAB}-s{args.shard_mb}" / f"L{layers:03d}"


def model_dirs(args: argparse.Namespace, layers: int) -> tuple[Path, list[Path]]:
    d = depth_dir(args, layers)
    return d / "base", [d / f"ft{i}" for i in range(args.models)]


def _seed(*parts: object) -> int:
    return zlib.crc32(":".join(str(p) for p in parts).encode()) & 0x7FFF_FFFF


def build_model(directory: Path, hidden: int, layers: int, shard_bytes: int, which: int | None) -> None:
    """Write the base (``which`` None) or fine-tune ``which`` = base + Gaussian delta, one tensor at a time.

    Every tensor has its own seed (model, name), so layer i is the same at every depth and a rebuild is
    bit-identical. The builder holds one shard of bf16 tensors at most.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    marker = directory / ".built.json"
    stamp = {"version": BUILDER_VERSION, "hidden": hidden, "layers": layers, "shard_bytes": shard_bytes}
    stamp["which"] = which
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    shards = plan_shards(tensor_shapes(hidden, layers), shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    base_dir = directory.parent / "base"
    weight_map, total = {}, 0
    for shard, file_name in zip(shards, names, strict=True):
        base_handle = None if which is None else safe_open(str(base_dir / file_name), framework="pt", device="cpu")
        tensors = {}
        for name, shape in shard:
            if which is None:
                g = torch.Generator().manual_seed(_seed("base", name))
                if len(shape) == 1:
                    t = torch.ones(shape)
                else:
                    t = torch.randn(shape, generator=g).mul_(WEIGHT_STD)
            else:
                g = torch.Generator().manual_seed(_seed("ft", which, name))
                t = base_handle.get_tensor(name).float().add_(torch.randn(shape, generator=g).mul_(DELTA_STD))
            tensors[name] = t.to(torch.bfloat16)
            del t
            weight_map[name] = file_name
            total += numel(shape) * 2
        save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        del tensors, base_handle
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(llama_config(hidden, layers), indent=2) + "\n")
    marker.write_text(json.dumps(stamp))


def child_build(spec: dict[str, Any]) -> dict[str, Any]:
    d = Path(spec["dir"])
    t0 = time.perf_counter()
    build_model(d / "base", spec["hidden"], spec["layers"], spec["shard_bytes"], None)
    for i in range(spec["models"]):
        build_model(d / f"ft{i}", spec["hidden"], spec["layers"], spec["shard_bytes"], i)
    return {"seconds": time.perf_counter() - t0}


# ============================================================================================ the contenders
def child_mmer(spec: dict[str, Any]) -> dict[str, Any]:
    import mmer

    t0 = time.perf_counter()
    recipe = mmer.Recipe(
        base=mmer.ModelSpec(spec["base"]),
        models=tuple(mmer.ModelSpec(p, modality=f"m{i}") for i, p in enumerate(spec["models"])),
        options=mmer.MergeOptions(hash_inputs=False, device=spec["device"], base_storage=spec["base_storage"]),
    )
    report = mmer.run_merge(recipe, spec["out"], overwrite=True)
    seconds = time.perf_counter() - t0
    return {
        "work_s": seconds,
        "mmer_code_sha256": loaded_mmer_fingerprint(),
        "stages_s": report.seconds,
        "mmer_peak_rss_bytes": report.peak_rss_bytes,
        "density": {m.name: m.density for m in report.modalities},
        "warnings": report.warnings,
    }


def loaded_mmer_fingerprint() -> str:
    """sha256 over the source of every mmer module this process imported: the code that actually ran."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(n for n in sys.modules if n == "mmer" or n.startswith("mmer.")):
        file = getattr(sys.modules[name], "__file__", None)
        if file and Path(file).is_file():
            h.update(name.encode() + b"\0" + Path(file).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _load_sharded(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    state: dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_file(directory / shard))
    return state


def child_in_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """MMER written the obvious way: every model in memory, one global kthvalue per model, stacked TIES."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    device = torch.device(spec["device"])
    base = _load_sharded(Path(spec["base"]))
    models = [_load_sharded(Path(p)) for p in spec["models"]]
    names = list(base)

    # τᵢ = θᵢ − θ_base in float32
    taus = [{n: m[n].to(device).float() - base[n].to(device).float() for n in names} for m in models]

    # Trim: keep |τᵢ| ≥ the global k-th smallest magnitude of τᵢ (TIES reference rule, k = d − ⌊d·K⌋)
    for tau in taus:
        flat = torch.cat([t.reshape(-1) for t in tau.values()]).abs()
        d = flat.numel()
        threshold = flat.kthvalue(d - int(d * K)).values
        del flat
        for t in tau.values():
            t.masked_fill_(t.abs() < threshold, 0)

    # TIES: elect sign by mass, disjoint mean; then MMER Eq. 3 masks against τ* as stored (bf16)
    tau_star: dict[str, Any] = {}
    masks: list[dict[str, Any]] = [{} for _ in models]
    for n in names:
        stack = torch.stack([tau[n] for tau in taus])
        gamma = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == gamma) & (stack != 0)
        merged = torch.where(agree, stack, torch.zeros((), device=device)).sum(0) / agree.sum(0).clamp(min=1)
        stored = merged.to(base[n].dtype)
        tau_star[n] = stored.cpu()
        s = stored.float()
        for i, tau in enumerate(taus):
            t = tau[n]
            mask = (torch.sign(t) == torch.sign(s)) & (s != 0) & (t.abs() >= (LAMBDA * 0.5) * s.abs())
            masks[i][n] = torch.from_numpy(np.packbits(mask.cpu().reshape(-1).numpy(), bitorder="little"))

    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    (out / "masks").mkdir(parents=True)
    save_file(tau_star, str(out / "tau_star.safetensors"))
    for i, m in enumerate(masks):
        save_file(m, str(out / "masks" / f"m{i}.safetensors"))
    return {"work_s": time.perf_counter() - t0}


def child_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The least a streaming merge must do: read every input tensor once, one elementwise pass, write once.

    Each tensor is read through its own short-lived ``safe_open`` (safetensors hands out views of its memory
    map, which stay resident while the handle lives), so the floor holds one slot, whatever the depth.
    """
    import torch
    from safetensors import safe_open

    t0 = time.perf_counter()
    dirs = [Path(spec["base"]), *map(Path, spec["models"])]
    weight_map = json.loads((dirs[0] / "model.safetensors.index.json").read_text())["weight_map"]

    def read(d: Path, name: str) -> torch.Tensor:
        with safe_open(str(d / weight_map[name]), framework="pt", device="cpu") as f:
            return f.get_tensor(name).float()

    # the output's header follows from the input headers, so every tensor streams straight to its offset
    header, offset = {}, 0
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(dirs[0] / shard), framework="pt", device="cpu") as f:
            for name in f.keys():
                shape = list(f.get_slice(name).get_shape())
                nbytes = numel(tuple(shape)) * 2
                header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with open(out / "sum.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in header:  # insertion order = offset order
            acc = read(dirs[0], name)
            for d in dirs[1:]:
                acc += read(d, name)
            f.write(memoryview(acc.to(torch.bfloat16).view(torch.uint8).reshape(-1).numpy()))
    return {"work_s": time.perf_counter() - t0}


def child_idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Imports only: the interpreter + torch + mmer floor under every number."""
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import mmer  # noqa: F401

    return {"work_s": 0.0}


def child_verify(spec: dict[str, Any]) -> dict[str, Any]:
    """mmer's τ* and masks must equal the in-memory baseline's, bit for bit (same K, λ, dtype rules)."""
    import torch
    from safetensors import safe_open

    import mmer

    ref = Path(spec["ref"])
    mismatches = []
    checked = 0
    with mmer.load_decoupled(spec["mmer"]) as ckpt, safe_open(str(ref / "tau_star.safetensors"), "pt") as tau:
        masks = [safe_open(str(ref / "masks" / f"m{i}.safetensors"), "pt") for i in range(spec["models"])]
        for name in tau.keys():
            if not torch.equal(ckpt.tau_star(name), tau.get_tensor(name)):
                mismatches.append(f"tau_star {name}")
            for i, m in enumerate(masks):
                if not torch.equal(ckpt.mask_file(f"m{i}").packed(name), m.get_tensor(name)):
                    mismatches.append(f"mask m{i} {name}")
            checked += 1
    return {"work_s": 0.0, "checked_tensors": checked, "mismatches": mismatches[:20], "n_mismatches": len(mismatches)}


CHILDREN = {
    "build": child_build,
    "mmer": child_mmer,
    "in-memory": child_in_memory,
    "floor": child_floor,
    "idle": child_idle,
    "verify": child_verify,
}


class RssSampler:
    """Samples /proc/self/status so the peak can be split into anonymous memory and mapped file pages."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def run_child_here(kind: str, spec: dict[str, Any]) -> None:
    import resource

    if kind == "profile":
        import cProfile
        import io
        import pstats

        import mmer  # noqa: F401  (imports are not part of the merge)

        profiler = cProfile.Profile()
        result = profiler.runcall(child_mmer, spec)
        buf = io.StringIO()
        buf.write(f"cProfile of one mmer merge: {spec['base']} + {len(spec['models'])} fine-tunes\n")
        buf.write(f"mmer stage seconds (under the profiler): {json.dumps(result['stages_s'])}\n\n")
        buf.write("== sorted by cumulative time ==\n")
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(45)
        buf.write("== sorted by own (total) time ==\n")
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(30)
        Path(spec["profile_out"]).write_text(buf.getvalue())
        result["sampled_peak"] = {}
    else:
        with RssSampler() as sampler:
            result = CHILDREN[kind](spec)
        result["sampled_peak"] = sampler.peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_rss_bytes"] = rss if sys.platform == "darwin" else rss * 1024
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


# ============================================================================================ orchestration
def spawn(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one contender in a fresh interpreter; returns its result plus the kernel's view of its peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", kind, "--_spec", json.dumps(spec)]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} child failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["process_wall_s"] = wall
    result["wait4_maxrss_bytes"] = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    result["cpu_user_s"], result["cpu_sys_s"] = usage.ru_utime, usage.ru_stime
    result["loadavg_1min_before"] = load_before
    return result


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True, check=True
        ).stdout.strip()
        return out or None
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> dict[str, Any]:
    cpu = cpu_name()
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    info = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch,safetensors,mmer;print(torch.__version__,safetensors.__version__,"
            "mmer.__version__,torch.get_num_threads())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": info[0],
        "safetensors": info[1],
        "mmer": info[2],
        "torch_threads": int(info[3]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "–"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    out = {
        "wall_s": med("work_s"),
        "wall_s_min": min(r["work_s"] for r in runs),
        "wall_s_max": max(r["work_s"] for r in runs),
        "peak_rss_bytes": med("peak_rss_bytes"),
        "peak_rss_anon_bytes": statistics.median(r["sampled_peak"]["RssAnon"] for r in runs),
        "peak_rss_file_bytes": statistics.median(r["sampled_peak"]["RssFile"] for r in runs),
        "process_wall_s": med("process_wall_s"),
        "cpu_s": statistics.median(r["cpu_user_s"] + r["cpu_sys_s"] for r in runs),
        "cpu_sys_s": med("cpu_sys_s"),
        "output_bytes": runs[-1].get("output_bytes", 0),
        "runs": runs,
    }
    if "stages_s" in runs[0]:
        out["stages_s"] = {k: statistics.median(r["stages_s"][k] for r in runs) for k in runs[0]["stages_s"]}
    return out


TABLE_HEADER = ["layers", "params", "input GB", "mmer", "in-memory", "floor", "mmer ÷ in-memory", "mmer ÷ floor"]


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One row per depth; contender cells are "wall s / peak RSS GB", ratio cells "time× / memory×"."""
    out = []
    for r in rows:
        m, i, f = (r["methods"][k] for k in METHODS)
        cell = lambda s: f"{s['wall_s']:.1f} s / {s['peak_rss_bytes'] / GB:.2f} GB"  # noqa: E731
        ratio = lambda a, b: (  # noqa: E731
            f"{fmt_ratio(a['wall_s'], b['wall_s'])} / {fmt_ratio(a['peak_rss_bytes'], b['peak_rss_bytes'])}"
        )
        out.append(
            [
                str(r["layers"]),
                f"{r['params'] / 1e6:.1f}M",
                f"{r['input_bytes'] / GB:.2f}",
                cell(m),
                cell(i),
                cell(f),
                ratio(m, i),
                ratio(m, f),
            ]
        )
    return out


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    body = table_rows(rows)
    try:
        from rich.console import Console  # noqa: TID251 (a script, not the library)
        from rich.table import Table  # noqa: TID251

        table = Table(title=title)
        for i, h in enumerate(TABLE_HEADER):
            table.add_column(h, justify="right", style="bold" if i < 3 else None)
        for row in body:
            table.add_row(*row)
        Console(width=max(140, shutil.get_terminal_size().columns)).print(table)
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(TABLE_HEADER)]
        print(title)
        print("  ".join(h.rjust(w) for h, w in zip(TABLE_HEADER, widths, strict=True)))
        for row in body:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    a = result["args"]
    src = result["mmer_source"]
    shas = src["code_sha256_of_runs"]
    code = f"code sha256 {shas[0]} in every run" if len(shas) == 1 else f"CODE CHANGED DURING THE RUN: {shas}"
    lines = [
        "# mmer: peak memory and wall time vs model depth",
        "",
        "Generated by `" + " ".join(["python bench/memory_vs_depth.py", *result["argv"]]) + f"` on {m['date']}.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, {m['os']}",
        f"- Software: Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), "
        f"safetensors {m['safetensors']}, mmer {m['mmer']} (git {src['git_commit_at_start']} at the start; "
        f"{code}); device `{a['device']}`",
        f"- Models: Llama-shaped bf16, hidden {a['hidden']}, intermediate {intermediate_size(a['hidden'])}, "
        f"vocab {VOCAB}, base + {a['models']} fine-tunes; K = {K}, λ = {LAMBDA}; mmer base_storage "
        f"`{a['base_storage']}`",
        f"- Each cell: median of {a['repeats']} runs, each in a fresh process; wall = the work inside the process "
        f"(imports excluded); peak RSS = `ru_maxrss` of that process (an idle process with torch and mmer "
        f"imported: {result['idle_rss_bytes'] / GB:.2f} GB)",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---:|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result["rows"])]
    lines += [
        "",
        f"Best of {a['repeats']} (minimum wall time and its ratio; the estimate least disturbed by other load on a "
        "shared machine):",
        "",
        "| layers | " + " | ".join(f"{k} s" for k in METHODS) + " | mmer ÷ in-memory | mmer ÷ floor |",
        "|" + "---:|" * (3 + len(METHODS)),
    ]
    for r in result["rows"]:
        best = {k: r["methods"][k]["wall_s_min"] for k in METHODS}
        lines.append(
            f"| {r['layers']} | "
            + " | ".join(f"{best[k]:.1f}" for k in METHODS)
            + f" | {fmt_ratio(best['mmer'], best['in-memory'])} | {fmt_ratio(best['mmer'], best['floor'])} |"
        )
    lines += [
        "",
        "Spread of wall time over the runs (min–max s): "
        + "; ".join(
            f"L{r['layers']}: "
            + ", ".join(
                f"{k} {r['methods'][k]['wall_s_min']:.1f}–{r['methods'][k]['wall_s_max']:.1f}" for k in METHODS
            )
            for r in result["rows"]
        )
        + f". 1-minute load average before the runs: {result['load_range'][0]:.1f}–{result['load_range'][1]:.1f} "
        f"(this machine has {m['cores']} cores).",
    ]
    lines += [
        "",
        "CPU seconds of the whole process (user + sys, of which sys; median), less sensitive than wall time to other "
        "load on the machine:",
        "",
        "| layers | " + " | ".join(METHODS) + " | mmer ÷ in-memory |",
        "|" + "---:|" * (2 + len(METHODS)),
    ]
    for r in result["rows"]:
        s = r["methods"]
        cells = [f"{s[k]['cpu_s']:.1f} ({s[k]['cpu_sys_s']:.1f})" for k in METHODS]
        ratio = fmt_ratio(s["mmer"]["cpu_s"], s["in-memory"]["cpu_s"])
        lines.append(f"| {r['layers']} | " + " | ".join(cells) + f" | {ratio} |")
    lines += [
        "",
        "Peak RSS split (median of sampled peaks, GB): anonymous memory / mapped file pages",
        "",
        "| layers | " + " | ".join(f"{k} anon | {k} file" for k in METHODS) + " |",
        "|" + "---:|" * (1 + 2 * len(METHODS)),
    ]
    for r in result["rows"]:
        cells = []
        for k in METHODS:
            s = r["methods"][k]
            cells += [f"{s['peak_rss_anon_bytes'] / GB:.2f}", f"{s['peak_rss_file_bytes'] / GB:.2f}"]
        lines.append(f"| {r['layers']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "mmer stage times (median s): "
        + "; ".join(
            f"L{r['layers']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["methods"]["mmer"]["stages_s"].items())
            for r in result["rows"]
        ),
        "",
        "Output written per run (GB): "
        + "; ".join(
            f"L{r['layers']}: " + ", ".join(f"{k} {r['methods'][k]['output_bytes'] / GB:.2f}" for k in METHODS)
            for r in result["rows"]
        ),
    ]
    if result.get("verify"):
        v = result["verify"]
        verdict = "identical" if v["n_mismatches"] == 0 else f"{v['n_mismatches']} MISMATCHES"
        lines += [
            "",
            f"Correctness check at {v['layers']} layers: mmer's τ* and masks vs the in-memory baseline's, "
            f"{v['checked_tensors']} tensors: {verdict}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", default=[4, 8, 16, 32], help="depths to measure (default 4 8 16 32)"
    )
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    parser.add_argument("--models", type=int, default=3, help="fine-tunes merged (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is reported (default 3)")
    parser.add_argument("--device", default="cpu", help="where the merge arithmetic runs (cpu, cuda)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--base-storage",
        default="copy",
        choices=("copy", "reference"),
        help="mmer's base_storage option (default copy: the base is written into the output)",
    )
    parser.add_argument("--shard-mb", type=int, default=256, help="input shard size in MB (default 256)")
    parser.add_argument("--no-verify", action="store_true", help="skip the mmer == in-memory bit-for-bit check")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the benchmark, cProfile one mmer merge at the largest depth "
        "(writes profile_mmer.txt beside the results)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the .json and .md go")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only re-render the table and the .md from a results .json written earlier",
    )
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        run_child_here(args._child, json.loads(args._spec))
        return 0

    if args.render:
        result = json.loads(args.render.read_text())
        for r in result["rows"]:
            r["methods"] = {k: summarize(v["runs"]) for k, v in r["methods"].items()}
        finish(result, args.render.parent)
        return 0

    started = time.perf_counter()
    commit = git_commit()
    layers = sorted(set(args.layers))
    shard_bytes = args.shard_mb * 1_000_000
    print(
        f"mmer memory-vs-depth benchmark: hidden {args.hidden}, layers {layers}, {args.models} fine-tunes, "
        f"{args.repeats} repeats, device {args.device}",
        flush=True,
    )
    for n in layers:
        d = depth_dir(args, n)
        res = spawn(
            "build",
            {"dir": str(d), "hidden": args.hidden, "layers": n, "models": args.models, "shard_bytes": shard_bytes},
        )
        print(f"  models for {n} layers ready in {d.relative_to(HERE.parent)} ({res['seconds']:.1f} s)", flush=True)

    os.sync()  # the models just written must not be flushed to disk while a contender is timed
    out_root = CACHE / "out"
    if args.profile:
        n = layers[-1]
        base, fts = model_dirs(args, n)
        profile_file = args.results / "profile_mmer.txt"
        args.results.mkdir(parents=True, exist_ok=True)
        res = spawn(
            "profile",
            {
                "base": str(base),
                "models": [str(p) for p in fts],
                "out": str(out_root / "mmer"),
                "device": args.device,
                "base_storage": args.base_storage,
                "profile_out": str(profile_file),
            },
        )
        shutil.rmtree(out_root / "mmer", ignore_errors=True)
        print(f"  cProfile of one mmer merge at {n} layers ({res['work_s']:.1f} s under the profiler): {profile_file}")
        return 0

    idle = spawn("idle", {})
    print(
        f"  idle process (python + torch + mmer imported): {idle['peak_rss_bytes'] / GB:.2f} GB peak RSS", flush=True
    )

    rows = []
    verify = None
    for n in layers:
        base, fts = model_dirs(args, n)
        shapes = tensor_shapes(args.hidden, n)
        params = sum(numel(s) for _, s in shapes)
        input_bytes = sum(dir_bytes(p) for p in [base, *fts])
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in args.methods}
        keep = not args.no_verify and n == layers[0] and {"mmer", "in-memory"} <= set(args.methods)
        for r in range(args.repeats):
            for kind in args.methods:  # interleaved, so drift (thermal, page cache) hits every contender alike
                out = out_root / kind
                spec = {
                    "base": str(base),
                    "models": [str(p) for p in fts],
                    "out": str(out),
                    "device": args.device,
                    "base_storage": args.base_storage,
                }
                res = spawn(kind, spec)
                res["output_bytes"] = dir_bytes(out)
                runs[kind].append(res)
                print(
                    f"  L{n} run {r + 1}/{args.repeats} {kind:9s} {res['work_s']:7.1f} s  "
                    f"peak RSS {res['peak_rss_bytes'] / GB:5.2f} GB",
                    flush=True,
                )
                if not (keep and r == args.repeats - 1 and kind != "floor"):
                    shutil.rmtree(out, ignore_errors=True)
                os.sync()  # no contender pays for the previous one's write-back
        if keep:
            verify = spawn(
                "verify", {"mmer": str(out_root / "mmer"), "ref": str(out_root / "in-memory"), "models": args.models}
            )
            verify["layers"] = n
            state = "identical" if verify["n_mismatches"] == 0 else f"{verify['n_mismatches']} MISMATCHES"
            print(f"  check: mmer vs in-memory τ* and masks at {n} layers: {state}", flush=True)
            for kind in ("mmer", "in-memory"):
                shutil.rmtree(out_root / kind, ignore_errors=True)
        rows.append(
            {
                "layers": n,
                "params": params,
                "input_bytes": input_bytes,
                "methods": {k: summarize(v) for k, v in runs.items()},
            }
        )

    fingerprints = sorted({x["mmer_code_sha256"] for r in rows for x in r["methods"].get("mmer", {}).get("runs", [])})
    if len(fingerprints) > 1:
        print(
            f"WARNING: mmer's code changed during the run ({len(fingerprints)} different versions ran); "
            "the rows do not all measure the same code",
            flush=True,
        )
    loads = [x["loadavg_1min_before"] for r in rows for v in r["methods"].values() for x in v["runs"]]
    if set(args.methods) != set(METHODS):
        print(
            json.dumps(
                {
                    r["layers"]: {k: (v["wall_s"], v["peak_rss_bytes"] / GB) for k, v in r["methods"].items()}
                    for r in rows
                }
            )
        )
        return 0

    result = {
        "benchmark": "memory_vs_depth",
        "argv": sys.argv[1:] if argv is None else argv,
        "args": {
            "layers": layers,
            "hidden": args.hidden,
            "models": args.models,
            "repeats": args.repeats,
            "device": args.device,
            "base_storage": args.base_storage,
            "shard_mb": args.shard_mb,
            "k": K,
            "lambda": LAMBDA,
        },
        "machine": machine(),
        "mmer_source": {"git_commit_at_start": commit, "code_sha256_of_runs": fingerprints},
        "idle_rss_bytes": idle["peak_rss_bytes"],
        "rows": rows,
        "load_range": [min(loads), max(loads)],
        "verify": verify,
        "total_seconds": time.perf_counter() - started,
    }
    finish(result, args.results)
    print(f"total {result['total_seconds']:.0f} s")
    return 0


def finish(result: dict[str, Any], results_dir: Path) -> None:
    """Print the table and write the .json and .md."""
    a = result["args"]
    title = (
        f"MMER merge, {a['models']} fine-tunes, hidden {a['hidden']}, bf16; median of {a['repeats']}; "
        "wall s / peak RSS GB"
    )
    print_table(result["rows"], title)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "memory_vs_depth.json").write_text(json.dumps(result, indent=2) + "\n")
    (results_dir / "memory_vs_depth.md").write_text(markdown(result))
    print(f"wrote {results_dir / 'memory_vs_depth.json'} and .md")


if __name__ == "__main__":
    sys.exit(main())
