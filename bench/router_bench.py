#!/usr/bin/env python
"""Router benchmark: switch latency, routed versus plain forward time, and expansion mode's cache trade-off.

    python bench/router_bench.py                          # CPU, a small Qwen2-shaped LLM (< 3 min on 2 cores)
    python bench/router_bench.py --device cuda --preset 7b  # a 7B-shaped LLM (Llama-2-7B dims) in bf16
    python bench/router_bench.py --device cuda --device-map auto  # the LLM spread with accelerate
    python bench/router_bench.py --preset tinyllama --repeats 3    # 1.1 B, bf16, on CPU (see bench/README.md)

It writes (once, cached under bench/.cache/) a decoupled checkpoint with random weights straight in the
format of FORMAT.md: a Qwen2-architecture base LLM of the preset's shape, τ*, a vision mask (30 % density) and
an audio mask (5 %), and two modalities whose components are a small llava-hf CLIP tower (224-pixel images,
256 image tokens) and a small Qwen2-Audio encoder (50 audio tokens) with 2 and 1 private vocabulary rows.
Random weights are fine here: the timings depend on shapes, not values. (A 7B *merge* would need three
fine-tuned copies on disk; writing the checkpoint directly needs one base and one τ*.)

Then, in this process, on ``--device``:

* ``floor``      the memory floor of a switch: one streaming pass over the bytes a switch must move, for every
                 merged tensor (read θ_base, τ* and the packed mask, write the live weight), on buffers of the
                 same shapes and dtypes on the same device, with the same threads. Every row's ``× floor`` is
                 its time over this one: how far the router is from what the memory allows;
* ``load``       ``Router.from_pretrained``: θ_base, τ*, packed masks, components onto the device, against
                 reading the same files from a warm page cache;
* ``switch``     ``router.switch`` vision ↔ audio (rebuild from θ_base of every tensor whose mask differs),
                 against the alternative of reloading a rebuilt checkpoint (``from_pretrained``, the same
                 model ``mmer reconstruct`` writes);
* ``forward``    one forward pass of the vision prompt through the plain reloaded transformers model, and
                 through the router (vision already active; and right after audio was active);
* ``expansion``  one forward pass of a mixed prompt (text, image, text, audio, text) with per-token weights,
                 modality weights cached versus rebuilt per layer, against the same-length pass on text
                 weights with routing off; with the bytes each mode adds (and CUDA peak memory on a GPU).

Median of ``--repeats`` timed runs after one warm-up. ``--skip reload forward expansion`` leaves groups out (the
1.1 B preset's forwards take minutes on a small CPU; ``reload`` is the reconstruct-and-reload comparison).
Prints one table and writes bench/results/router_bench.json and .md (``router_bench_<device>_<preset>`` for any
other device or preset, ``_<tag>`` added with ``--tag``). The load row is broken into the steps
``Router.load_seconds`` reports, beside a fresh-memory reference (the page faults of the live weights).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from machine_info import cpu_name

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "router"
RESULTS = HERE / "results"
BUILDER_VERSION = 1  # bump when the synthetic checkpoint changes, so stale caches are rebuilt
PRESETS: dict[str, dict[str, int]] = {
    # ~59 M parameters: quick on a laptop CPU, big enough that the LLM, not Python, dominates.
    "small": {"hidden": 512, "intermediate": 1408, "layers": 8, "heads": 8, "kv_heads": 8, "vocab": 32000},
    # Llama-2-7B / Vicuna-7B dimensions (6.7 B parameters), the paper's base LLM.
    "7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 32000},
    # TinyLlama-1.1B dimensions (merge_speed.py's workload): big enough that Python overhead hides nothing.
    "tinyllama": {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 32000},
}
PRESET_DTYPE = {"tinyllama": "bfloat16"}  # others: float32 on CPU, bfloat16 on a GPU
GROUPS = ("reload", "forward", "expansion")  # what --skip can leave out (load, floor and switch always run)
DENSITY = {"vision": 0.30, "audio": 0.05}  # Fig. 4a reports image 34.1 %, audio 2.2 %
PRIVATE_ROWS = {"vision": 2, "audio": 1}
GB = 1e9


# =========================================================================================== the checkpoint
def text_config(shape: dict[str, int], dtype: torch.dtype, extra_vocab: int = 0) -> Any:
    # A Qwen2 config object, not mmer.synthetic's Llama config.json: real LLaVA / Qwen2-Audio classes wrap it.
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"] + extra_vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype=str(dtype).removeprefix("torch."),
    )


def modality_config(modality: str, shape: dict[str, int], dtype: torch.dtype) -> Any:
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2AudioConfig

    text = text_config(shape, dtype, PRIVATE_ROWS[modality])
    if modality == "vision":
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=224,
                patch_size=14,
            ),
            text_config=text,
            image_token_index=shape["vocab"],
            projector_hidden_act="gelu",
        )
        config.architectures = ["LlavaForConditionalGeneration"]
    else:
        config = Qwen2AudioConfig(
            audio_config={
                "d_model": 64,
                "encoder_layers": 1,
                "encoder_attention_heads": 2,
                "encoder_ffn_dim": 128,
                "num_mel_bins": 16,
                "max_source_positions": 100,
            },
            text_config=text.to_dict(),
            audio_token_index=shape["vocab"],
        )
        config.architectures = ["Qwen2AudioForConditionalGeneration"]
    config.torch_dtype = str(dtype).removeprefix("torch.")
    return config


def meta_state(config: Any, cls_name: str) -> dict[str, torch.Tensor]:
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = getattr(transformers, cls_name)._from_config(config)
    return dict(model.state_dict())


def write_checkpoint(
    directory: Path, shape: dict[str, int], dtype: torch.dtype, seed: int = 0, device: torch.device | None = None
) -> None:
    """A decoupled checkpoint with random weights, written tensor by tensor (FORMAT.md, format 1.0).

    On a CUDA ``device`` the LLM's random tensors are drawn there (a 7B checkpoint in about a minute rather than
    several on the CPU's one-threaded generator); their values then differ from a CPU build's, which no timing
    depends on.
    """
    from mmer.checkpoint import bits
    from mmer.checkpoint.decoupled import PRIVATE_FILE, mask_metadata
    from mmer.checkpoint.manifest import Manifest, ModalityRecord, PrivateRecord, SlotRecord, SourceRecord
    from mmer.io.layouts import detect_layout
    from mmer.io.reader import DTYPE_NAMES
    from mmer.io.writer import PlannedTensor, ShardedWriter, StagedOutput, write_tensors

    g = torch.Generator().manual_seed(seed)
    draw = device if device is not None and device.type == "cuda" else torch.device("cpu")
    gd = g if draw.type == "cpu" else torch.Generator(device=draw).manual_seed(seed)  # a CPU build: as before
    base_cfg = text_config(shape, dtype)
    base_cfg.architectures = ["Qwen2ForCausalLM"]
    llm = meta_state(base_cfg, "Qwen2ForCausalLM")
    dname = DTYPE_NAMES[dtype]
    shard = 5 * 1024**3
    with StagedOutput(directory, overwrite=True) as out:
        for sub in ("base", "tau_star", "masks"):
            (out / sub).mkdir()
        base_cfg.save_pretrained(out / "base")
        base_w = ShardedWriter(out / "base", [PlannedTensor(n, dtype, tuple(t.shape)) for n, t in llm.items()], shard)
        tau_w = ShardedWriter(
            out / "tau_star",
            [PlannedTensor(n, dtype, tuple(t.shape)) for n, t in llm.items()],
            shard,
            metadata={"format": "mmer-tau-star/1"},
        )
        shapes = {n: list(t.shape) for n, t in llm.items()}
        mask_w = {
            m: ShardedWriter(
                out / "masks",
                [PlannedTensor(n, torch.uint8, (bits.packed_size(t.numel()),)) for n, t in llm.items()],
                1 << 62,
                prefix=m,
                metadata=mask_metadata(shapes),
            )
            for m in DENSITY
        }
        kept = dict.fromkeys(DENSITY, 0)
        for name, meta in llm.items():
            if name.endswith("norm.weight"):
                base = torch.ones(meta.shape)
            else:
                base = torch.randn(meta.shape, generator=gd, device=draw) * 0.02
            base_w.write(name, base.to(dtype).cpu())
            tau_w.write(name, (torch.randn(meta.shape, generator=gd, device=draw) * 0.002).to(dtype).cpu())
            for m, density in DENSITY.items():
                packed = bits.pack(torch.rand(meta.shape, generator=gd, device=draw) < density).cpu()
                kept[m] += bits.popcount(packed)
                mask_w[m].write(name, packed)
        for w in (base_w, tau_w, *mask_w.values()):
            w.close()

        modalities = {}
        for m in DENSITY:
            cls_name = "LlavaForConditionalGeneration" if m == "vision" else "Qwen2AudioForConditionalGeneration"
            config = modality_config(m, shape, dtype)
            state = meta_state(config, cls_name)
            layout = detect_layout(set(state), cls_name)
            comp_dir = out / "components" / m
            comp_dir.mkdir(parents=True)
            config.save_pretrained(comp_dir)
            # Stored like transformers saves these classes (llava-hf legacy names: no leading "model.").
            components = {
                n.removeprefix("model."): (torch.randn(t.shape, generator=g) * 0.02).to(dtype)
                for n, t in state.items()
                if layout.to_canonical(n) is None
            }
            write_tensors(comp_dir, components, shard)
            rows = PRIVATE_ROWS[m]
            private = {
                n: (torch.randn(rows, shape["hidden"], generator=g) * 0.02).to(dtype)
                for n in ("model.embed_tokens.weight", "lm_head.weight")
            }
            write_tensors(comp_dir, private, shard, prefix=PRIVATE_FILE.removesuffix(".safetensors"))
            source = SourceRecord(
                model=f"synthetic-{m}",
                revision=None,
                commit=None,
                layout="hf_legacy",
                dtype=dname,
                config=config.model_type,
                files={},
            )
            modalities[m] = ModalityRecord(
                name=m,
                source=source,
                lambda_=0.9,
                mask_file=f"masks/{m}.safetensors",
                component_dir=f"components/{m}",
                kept=kept[m],
                total=sum(t.numel() for t in llm.values()),
                llm_keys={n: "language_model." + n for n in llm},
                component_tensors=sorted(components),
                private=[PrivateRecord(n, shape["vocab"], [rows, shape["hidden"]]) for n in private],
                vocab_size=shape["vocab"] + rows,
            )
        manifest = Manifest(
            mmer_version="bench",
            options={"synthetic": True},
            base=SourceRecord(
                model="synthetic-base",
                revision=None,
                commit=None,
                layout="causal_lm",
                dtype=dname,
                config="qwen2",
                files={},
            ),
            base_storage="copy",
            base_dir="base",
            tau_star_dir="tau_star",
            tau_star_dtype=dname,
            slots=[SlotRecord(n, list(t.shape), dname, True) for n, t in llm.items()],
            modalities=modalities,
        )
        manifest.write(out)
        (out / "builder.json").write_text(json.dumps({"version": BUILDER_VERSION, "shape": shape, "dtype": dname}))


def checkpoint_dir(shape: dict[str, int], dtype: torch.dtype) -> Path:
    tag = "-".join(f"{k[0]}{v}" for k, v in shape.items())
    return CACHE / f"qwen2-{tag}-{str(dtype).removeprefix('torch.')}"


def ensure_checkpoint(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> tuple[Path, float]:
    directory = checkpoint_dir(shape, dtype)
    marker = directory / "builder.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == BUILDER_VERSION:
        return directory, 0.0
    started = time.perf_counter()
    write_checkpoint(directory, shape, dtype, device=device)
    return directory, time.perf_counter() - started


# ================================================================================================ inputs
def vision_inputs(vocab: int, dtype: torch.dtype, device: torch.device, text: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, text), generator=g)
    ids = torch.cat([ids[:, : text // 2], torch.full((1, 256), vocab), ids[:, text // 2 :]], dim=1)
    return {"input_ids": ids.to(device), "pixel_values": torch.randn(1, 3, 224, 224, generator=g).to(device, dtype)}


def audio_inputs(vocab: int, dtype: torch.dtype, device: torch.device, text: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (1, text), generator=g)
    ids = torch.cat([ids[:, : text // 2], torch.full((1, 50), vocab), ids[:, text // 2 :]], dim=1)
    return {
        "input_ids": ids.to(device),
        "input_features": torch.randn(1, 16, 200, generator=g).to(device, dtype),
        "feature_attention_mask": torch.ones(1, 200, dtype=torch.long, device=device),
    }


# ================================================================================================ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Stats = dict[str, float]


def _stats(wall: list[float], cpu: list[float]) -> Stats:
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "max_s": max(wall),
        "cpu_median_s": statistics.median(cpu),
        "cpu_min_s": min(cpu),
    }


def once(fn: Callable[[], Any], device: torch.device) -> Stats:
    """Wall and CPU time of one call (for things done once: loading, writing)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return _stats([time.perf_counter() - wall], [time.process_time() - cpu])


def timed_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, Stats]:
    """Wall and CPU time of each contender, median of ``repeats`` after one warm-up.

    The contenders run in turn within each repeat, so that load from other processes (or clock drift) hits
    them alike. CPU time (this process, all threads) is reported too: on a shared CPU it is the steadier
    measure of work, and the CPU ratios use it. What a contender returns is freed after its clock stops (a
    loaded router's 2 GB of live weights take a while to unmap, which is no part of loading it).
    """
    for fn in fns.values():
        fn()
    sync(device)
    gc.collect()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            kept = fn()
            sync(device)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
            del kept
            gc.collect()
    return {n: _stats(wall[n], cpu[n]) for n in fns}


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> Stats:
    return timed_interleaved({"fn": fn}, device, repeats)["fn"]


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """CUDA memory allocated at the peak of ``fn`` above what was allocated before it (None on the CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


# ================================================================================================= floors
INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class SwitchFloor:
    """The least memory traffic a switch to a modality must cause, as one timed pass on buffers of its own.

    For every merged tensor (a slot with τ*): read θ_base, τ* and the modality's packed mask, write the live
    weight, each of the slot's size and dtype on ``device``. The pass is ``live = θ_base XOR τ*`` on the bytes
    viewed as integers (no float conversion, so nothing but the memory limits it; torch runs it on the same
    intra-op threads as the switch) plus a copy of the packed mask (read it, and write the same few bytes to a
    scratch buffer: 1/16 of the traffic for bf16, 1/32 for float32). A switch cannot move fewer bytes unless it
    skips tensors or entries whose masks agree; this synthetic checkpoint's masks are independent.

    Each role (θ_base, τ*, live, mask, scratch) is a ring of at most ``RING_BYTES``, the slots laid out one after
    the other and wrapping to its start: the same traffic as separate tensors, in memory the router does not
    need twice (a 7B router and its floor fit an 80 GB GPU), and far larger than any cache, so no tensor finds
    the bytes of the one before it cached.
    """

    RING_BYTES = 2 << 30

    def __init__(self, slots: list[dict[str, Any]], device: torch.device) -> None:
        from mmer.checkpoint import bits
        from mmer.io.reader import DTYPE_NAMES

        dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items()}
        sizes = []  # (value bytes, packed mask bytes, the integer type of the slot's element size)
        for slot in slots:
            if slot.get("merged", True):
                dtype = dtypes[slot["dtype"]]
                numel = math.prod(slot["shape"])
                sizes.append((numel * dtype.itemsize, bits.packed_size(numel), INT_OF_SIZE[dtype.itemsize]))
        value_ring = min(self.RING_BYTES, sum(v for v, _, _ in sizes))
        mask_ring = min(self.RING_BYTES, sum(m for _, m, _ in sizes))

        def ring(nbytes: int) -> torch.Tensor:
            # Random bytes, not empty or constant ones: every page is written here (the timed pass faults none in)
            # and no two pages are alike (nothing a host could merge or compress makes the floor cheaper).
            return torch.empty(nbytes, dtype=torch.uint8, device=device).random_()

        base, tau, live = ring(value_ring), ring(value_ring), ring(value_ring)
        mask, scratch = ring(mask_ring), ring(mask_ring)
        self.parts: list[tuple[torch.Tensor, ...]] = []
        at_value = at_mask = 0
        for value_bytes, mask_bytes, as_int in sizes:
            at_value = 0 if at_value + value_bytes > value_ring else at_value
            at_mask = 0 if at_mask + mask_bytes > mask_ring else at_mask
            values = slice(at_value, at_value + value_bytes)
            masks = slice(at_mask, at_mask + mask_bytes)
            self.parts.append(
                (
                    base[values].view(as_int),
                    tau[values].view(as_int),
                    mask[masks],
                    live[values].view(as_int),
                    scratch[masks],
                )
            )
            # the next slot starts on a 64-byte boundary, as an allocator would place a tensor
            at_value += -(-value_bytes // 64) * 64
            at_mask += -(-mask_bytes // 64) * 64
        self.read_bytes = sum(b.nbytes + t.nbytes + m.nbytes for b, t, m, _, _ in self.parts)
        self.write_bytes = sum(live.nbytes for _, _, _, live, _ in self.parts)
        self.scratch_bytes = sum(s.nbytes for *_, s in self.parts)
        self.held_bytes = 3 * value_ring + 2 * mask_ring

    def __call__(self) -> None:
        for base, tau, mask, live, scratch in self.parts:
            torch.bitwise_xor(base, tau, out=live)
            scratch.copy_(mask)

    @property
    def nbytes(self) -> int:
        """Bytes a switch must move: read θ_base, τ*, mask; write the live weight."""
        return self.read_bytes + self.write_bytes


def read_files(directory: Path) -> Callable[[], int]:
    """Reading every file under ``directory`` into one reused buffer: what a load from a warm page cache costs."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    buffer = bytearray(1 << 26)
    view = memoryview(buffer)

    def read() -> int:
        total = 0
        for file in files:
            with open(file, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    total += n
        return total

    return read


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3,
        "threads": torch.get_num_threads(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ================================================================================================== runs
def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from mmer.route.reconstruct import reconstruct_modality
    from mmer.route.router import Router

    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = dict(PRESETS[args.preset])
    for key in ("hidden", "intermediate", "layers"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    path, build_s = ensure_checkpoint(shape, dtype, device)
    slots = json.loads((path / "mmer_manifest.json").read_text())["slots"]
    params = sum(math.prod(s["shape"]) for s in slots)
    print(
        f"router benchmark: {args.preset} ({params / 1e9:.2f} B LLM parameters, {args.dtype}) on {device}, "
        f"median of {args.repeats}; checkpoint {path.relative_to(HERE.parent)}"
        + (f" written in {build_s:.0f} s" if build_s else " (cached)"),
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    args.commit = git_commit()  # at the start: the code this process imports, whatever changes during the run

    use_cpu_time = device.type == "cpu"
    key = "cpu_median_s" if use_cpu_time else "median_s"
    floor: dict[str, Stats] = {}

    def row(
        group: str, what: str, stats: Stats, ref: Stats | None = None, note: str = "", nbytes: int | None = None
    ) -> None:
        ratio = None if ref is None or not ref[key] else stats[key] / ref[key]
        to_floor = stats[key] / floor["switch"][key] if floor.get("switch") and floor["switch"][key] else None
        rows.append(
            {
                "group": group,
                "what": what,
                "seconds": stats["median_s"],
                "cpu_seconds": stats["cpu_median_s"],
                "min_seconds": stats["min_s"],
                "ratio": ratio,
                "floor_ratio": to_floor,
                "floor_ratio_wall": stats["median_s"] / floor["switch"]["median_s"] if floor.get("switch") else None,
                "note": note,
                "bytes": nbytes,
            }
        )
        r = "" if ratio is None else f"  ×{ratio:.2f}"
        f = "" if to_floor is None else f"  {to_floor:.1f}× floor"
        print(
            f"  {group:9s} {what:56s} {stats['median_s'] * 1e3:9.1f} ms (cpu {stats['cpu_median_s'] * 1e3:9.1f})"
            f"{r}{f}  {note}",
            flush=True,
        )

    box: dict[str, Any] = {}
    placement: dict[str, Any] = {"device_map": args.device_map} if args.device_map else {"device": device}
    # The first load in a process also imports transformers' model code and numba's cached kernels: reported
    # apart, since a server pays it once; the load row is a warm process's, interleaved with reading the files.
    first_load_t = once(lambda: box.setdefault("router", Router.from_pretrained(path, **placement)), device)
    router = box.pop("router")
    held = router.nbytes()
    read = read_files(path)
    read_bytes = read()

    steps: list[tuple[dict[str, float], dict[str, float]]] = []  # each load's Router.load_seconds, CPU too

    def load_again() -> Router:
        loaded = Router.from_pretrained(path, **placement)
        steps.append((loaded.load_seconds, loaded.load_cpu_seconds))
        loaded.close()  # the files; the router itself is freed once the timing has stopped
        return loaded

    contenders: dict[str, Callable[[], Any]] = {"read": read, "load": load_again}
    if device.type == "cpu" and args.device_map is None:
        # The pages a load's first switch faults in: the live weights are memory this process never touched, which
        # reading the files into one reused buffer never pays for. Allocated as the router allocates them.
        from mmer.route import arena

        contenders["fresh"] = lambda: arena.allocate([((held["live"],), torch.uint8)])[0].fill_(1)
    loads = timed_interleaved(contenders, device, args.repeats)
    read_t, load_t = loads["read"], loads["load"]
    step_rows = load_steps(steps[1:])  # the first call was the warm-up

    # ---- the memory floor, interleaved with the switch it bounds
    floor_pass = SwitchFloor(slots, device)
    order = iter(["audio", "vision"] * (args.repeats + 2))
    both = timed_interleaved({"floor": floor_pass, "switch": lambda: router.switch(next(order))}, device, args.repeats)
    switch = both["switch"]
    # A floor is the least the pass took: its fastest run (wall and CPU time), so a busy moment cannot lower a ratio.
    fastest = both["floor"]
    floor["switch"] = {**fastest, "median_s": fastest["min_s"], "cpu_median_s": fastest["cpu_min_s"]}
    rate = floor_pass.nbytes / floor["switch"]["median_s"] / GB
    floor_info = {
        "read_bytes": floor_pass.read_bytes,
        "write_bytes": floor_pass.write_bytes,
        "scratch_bytes": floor_pass.scratch_bytes,
        "held_bytes": floor_pass.held_bytes,
        "tensors": len(floor_pass.parts),
        "gb_per_s": rate,
        "stats": floor["switch"],
    }
    floor_pass = None  # free its buffers before the models below
    row(
        "floor",
        "memory floor of a switch: read θ_base, τ*, mask; write live (fastest run)",
        floor["switch"],
        note=f"{floor_info['tensors']} tensors, "
        f"{floor_info['read_bytes'] / GB:.2f} GB read + {floor_info['write_bytes'] / GB:.2f} GB written, "
        f"{rate:.1f} GB/s",
        nbytes=floor_info["read_bytes"] + floor_info["write_bytes"],
    )
    row(
        "load",
        "read the checkpoint's files (warm page cache)",
        read_t,
        note=f"{read_bytes / GB:.2f} GB, {read_bytes / read_t['median_s'] / GB:.1f} GB/s",
        nbytes=read_bytes,
    )
    row(
        "load",
        "Router.from_pretrained",
        load_t,
        read_t,
        note=f"× = this / reading its files (wall: {load_t['median_s'] / read_t['median_s']:.2f}); "
        + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in held.items()),
    )
    for step, stats, note in step_rows:
        row("load", f"↳ {step}", stats, read_t, note=note)
    if "fresh" in loads:
        row(
            "load",
            "fresh memory the size of the live weights: allocate, write once",
            loads["fresh"],
            read_t,
            note=f"{held['live'] / GB:.2f} GB; the page faults a load's first switch takes (in its ↳ row)",
        )
    row(
        "load",
        "Router.from_pretrained, first in the process",
        first_load_t,
        read_t,
        note="× = this / reading its files; includes importing transformers' model code and numba's kernels",
    )

    # ---- switch latency, against reloading a rebuilt checkpoint
    row(
        "switch",
        "router.switch (vision <-> audio), rebuild from θ_base",
        switch,
        floor["switch"],
        note=f"{router.last_switch_rebuilt} tensors rebuilt; × = this / the floor",
    )
    rebuilt_dir = CACHE / "out" / f"{path.name}-vision"

    def reload() -> torch.nn.Module:
        return LlavaForConditionalGeneration.from_pretrained(rebuilt_dir, dtype=dtype).to(device).eval()

    if "reload" not in args.skip or "forward" not in args.skip:  # the forward rows compare with it
        shutil.rmtree(rebuilt_dir, ignore_errors=True)
        reconstruct_t = once(partial(reconstruct_modality, path, "vision", rebuilt_dir), device)
    if "reload" not in args.skip:
        row("switch", "mmer reconstruct to disk (once per modality)", reconstruct_t)
        reload_t = timed(reload, device, args.repeats)
        row(
            "switch",
            "alternative: from_pretrained of the rebuilt model",
            reload_t,
            switch,
            note="× = this / router.switch; warm page cache",
        )
        if device.type == "cpu":
            # On the CPU, from_pretrained leaves the weights in safetensors' file mapping: the row above maps them and
            # reads nothing until the first forward faults each page in. Reading every weight once makes it a load.
            def reload_read() -> torch.nn.Module:
                model = reload()
                for param in model.parameters():
                    param.data = param.data.clone()
                return model

            row(
                "switch",
                "alternative: the same, every weight read once (copied out of the map)",
                timed(reload_read, device, args.repeats),
                switch,
                note="× = this / router.switch; warm page cache",
            )
    if "forward" in args.skip and "expansion" in args.skip:
        return result(args, shape, params, held, floor_info, load_before, rows)

    # ---- routed versus plain forward (interleaved)
    v_in = vision_inputs(shape["vocab"], dtype, device)
    a_in = audio_inputs(shape["vocab"], dtype, device)
    if "forward" not in args.skip:
        forward_rows(args, router, reload(), v_in, device, row)
    if "expansion" not in args.skip:
        expansion_rows(args, router, shape, v_in, a_in, device, row)
    return result(args, shape, params, held, floor_info, load_before, rows)


LOAD_STEPS = {  # Router.load_seconds' steps, as the table names them
    "open": "open: manifest and every header read and validated",
    "map": "map θ_base, τ*, masks; allocate the live weights",
    "models": "build and bind each modality's transformers model",
    "packs": "extension packs",
    "first switch": "first switch: write every live weight, gather the overflow maxima",
    "check": "overflow proof of the tensors no rebuild covered",
}


def load_steps(steps: list[tuple[dict[str, float], dict[str, float]]]) -> list[tuple[str, Stats, str]]:
    """Median wall and CPU time of each step of ``Router.from_pretrained`` over the timed loads."""
    out = []
    for step in steps[0][0] if steps else {}:
        wall = [w[step] for w, _ in steps]
        cpu = [c[step] for _, c in steps]
        out.append((LOAD_STEPS.get(step, step), _stats(wall, cpu), "× = this / reading its files"))
    return out


def forward_rows(
    args: argparse.Namespace, router: Any, plain: Any, v_in: dict, device: torch.device, row: Any
) -> None:
    """Routed versus plain forward, interleaved (``plain`` is freed before returning)."""

    def away_and_back() -> Any:
        router.switch("audio")
        return router(**v_in, modality="vision")

    router.switch("vision")
    with torch.no_grad():
        forward = timed_interleaved(
            {
                "plain": partial(plain, **v_in),
                "routed": partial(router, **v_in, modality="vision"),  # "away_and_back" leaves vision active
                "switching": away_and_back,
            },
            device,
            args.repeats,
        )
    plain = None  # free it before expansion mode
    tokens = v_in["input_ids"].shape[1]
    row("forward", f"plain transformers model, vision prompt ({tokens} tokens)", forward["plain"])
    row("forward", "router, modality already active", forward["routed"], forward["plain"])
    row(
        "forward",
        "router, after the other modality was active",
        forward["switching"],
        forward["plain"],
        note="switch to audio and back (2 switches), then the forward",
    )


def expansion_rows(
    args: argparse.Namespace,
    router: Any,
    shape: dict[str, int],
    v_in: dict,
    a_in: dict,
    device: torch.device,
    row: Any,
) -> None:
    """Expansion mode: per-token weights, cached versus rebuilt per layer, interleaved."""
    from mmer.route.weights import MEAN

    to_text = iter([MEAN, "vision"] * (args.repeats + 2))
    mean_t = timed(lambda: router.switch(next(to_text)), device, args.repeats)
    row(
        "expansion",
        "router.switch to/from the text weights θ_base + m̄∘τ*",
        mean_t,
        note="once per expansion call after a retention call",
    )
    built: dict[str, Any] = {}
    for label, cache in (("cached", True), ("rebuilt", False)):
        built[label + "_s"] = once(
            lambda c=cache, k=label: built.setdefault(k, router.expansion(cache_modality_weights=c)), device
        )["median_s"]
    cached, rebuilt = built["cached"], built["rebuilt"]
    mixed = cached.embed(
        [
            torch.randint(0, shape["vocab"], (1, 16)).to(device),
            ("vision", v_in),
            torch.randint(0, shape["vocab"], (1, 8)).to(device),
            ("audio", a_in),
            torch.randint(0, shape["vocab"], (1, 8)).to(device),
        ]
    )
    n = mixed.token_modality.shape[1]
    expansion_t = timed_interleaved(
        {
            "text": partial(cached, inputs_embeds=mixed.inputs_embeds),
            "cached": partial(cached, mixed),
            "rebuilt": partial(rebuilt, mixed),
        },
        device,
        args.repeats,
    )
    row("expansion", f"text weights for every token, routing off ({n} tokens)", expansion_t["text"])
    for label, model, what in (("cached", cached, "cached"), ("rebuilt", rebuilt, "rebuilt per layer")):
        cache_bytes = model.nbytes()["modality_cache"]
        peak = peak_bytes(partial(model, mixed), device)
        note = f"built in {built[label + '_s']:.1f} s; modality weight cache {cache_bytes / GB:.2f} GB" + (
            "" if peak is None else f"; forward peak {peak / GB:.2f} GB above the weights"
        )
        row(
            "expansion",
            f"mixed prompt, per-token weights, {what}",
            expansion_t[label],
            expansion_t["text"],
            note=note,
            nbytes=cache_bytes,
        )


def result(
    args: argparse.Namespace,
    shape: dict[str, int],
    params: int,
    held: dict[str, int],
    floor: dict[str, Any],
    load_before: float,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "benchmark": "router_bench",
        "argv": sys.argv[1:],
        "args": {
            "device": args.device,
            "device_map": args.device_map,
            "preset": args.preset,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "skip": args.skip,
        },
        "commit": args.commit,
        "shape": shape,
        "llm_parameters": params,
        "router_bytes": held,
        "switch_floor": floor,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "rows": rows,
    }


def git_commit() -> str | None:
    """The checked-out commit (with ``+dirty`` when tracked files differ from it): what the figures are for."""
    import subprocess

    try:
        run_git = partial(subprocess.run, cwd=HERE, capture_output=True, text=True, check=True)
        commit = run_git(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run_git(["git", "status", "--porcelain", "--untracked-files=no", "--", "../mmer"]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def markdown(result: dict[str, Any]) -> str:
    s, m, f = result["shape"], result["machine"], result["switch_floor"]
    time_kind = "CPU time" if result["args"]["device"].startswith("cpu") else "wall time"
    lines = [
        f"# Router benchmark ({result['args']['preset']}, {result['args']['dtype']}, {result['args']['device']})",
        "",
        f"LLM: Qwen2 architecture, hidden {s['hidden']}, intermediate {s['intermediate']}, {s['layers']} layers, "
        f"{s['heads']} heads ({s['kv_heads']} key/value), vocab {s['vocab']} "
        f"({result['llm_parameters'] / 1e9:.2f} B parameters); masks vision {DENSITY['vision']:.0%}, audio "
        f"{DENSITY['audio']:.0%}. Median of {result['args']['repeats']} runs after one warm-up. mmer at "
        f"{result.get('commit') or 'an unknown commit'}. Machine: {m.get('gpu', 'no GPU')}; "
        f"{m.get('cpu', 'CPU')}, {m['cores']} cores, {m.get('memory_gib', 0):.1f} GiB RAM; torch {m['torch']} "
        f"({m['threads']} threads), transformers {m.get('transformers')}; {result['date']}. 1-minute load average "
        f"{result['load_average_before']:.1f} before, {result['load_average_after']:.1f} after "
        f"({m['cores']} cores): above the core count, other processes shared the CPU and times are inflated.",
        "",
        f"**Memory floor of a switch**: {f['read_bytes'] / GB:.2f} GB read (θ_base, τ* and one packed mask of the "
        f"{f['tensors']} merged tensors) + {f['write_bytes'] / GB:.2f} GB written (the live weights) in "
        f"{f['stats']['median_s'] * 1e3:.1f} ms ({f['gb_per_s']:.1f} GB/s; the fastest of its runs), on buffers of "
        "its own on the same device, with the same threads, interleaved with the switches it bounds. `× floor` is "
        f"every row's {time_kind} over the floor's.",
        "",
        "| group | measure | wall | CPU time | × baseline | × floor | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        to_floor = "" if r.get("floor_ratio") is None else f"{r['floor_ratio']:.1f}"
        lines.append(
            f"| {r['group']} | {r['what']} | {r['seconds'] * 1e3:.1f} ms | {r['cpu_seconds'] * 1e3:.1f} ms "
            f"| {ratio} | {to_floor} | {r['note']} |"
        )
    skipped = result["args"].get("skip") or []
    lines += [
        "",
        "Baselines (× baseline column): the switch against its memory floor, `Router.from_pretrained` against "
        "reading its files from a warm page cache, the reload row against `router.switch`, `forward` rows against "
        "the plain transformers model, `expansion` rows against the same sequence on the text weights with routing "
        "off. Ratios use CPU time on the CPU (the process's own work, steady when other processes share the cores) "
        "and wall time on a GPU. CPU time counts every thread, so it exceeds wall time when torch runs in parallel.",
    ]
    if skipped:
        lines += ["", f"Not measured in this run (`--skip`): {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--device-map",
        choices=("auto", "balanced", "balanced_low_0", "sequential"),
        help="spread the router's LLM with accelerate (Router.from_pretrained(device_map=...)); --device is then "
        "where the inputs and the comparison model go",
    )
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="LLM shape (default small)")
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32 / bfloat16 (default: bf16 for tinyllama and on a GPU, else float32)",
    )
    parser.add_argument("--hidden", type=int, help="override the preset's hidden size")
    parser.add_argument("--intermediate", type=int, help="override the preset's MLP size")
    parser.add_argument("--layers", type=int, help="override the preset's depth")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measure (default 5)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the .json and .md go")
    parser.add_argument("--tag", help="added to the results' file names (a partial run beside a full one)")
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=GROUPS, help="leave these groups out (load, floor, switch always run)"
    )
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = PRESET_DTYPE.get(args.preset, "bfloat16" if args.device.startswith("cuda") else "float32")
    started = time.perf_counter()
    result = run(args)
    result["total_seconds"] = time.perf_counter() - started
    args.results.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" and args.preset == "small" else f"_{args.device.split(':')[0]}_{args.preset}"
    suffix += f"_map-{args.device_map}" if args.device_map else ""
    suffix += f"_{args.tag}" if args.tag else ""
    (args.results / f"router_bench{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / f"router_bench{suffix}.md").write_text(markdown(result))
    print(f"wrote {args.results / f'router_bench{suffix}.json'} and .md in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
