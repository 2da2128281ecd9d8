"""Fine-tunes whose deltas look like real ones, for the merge benchmarks and the memory-bound tests.

The first benchmark family (``merge_speed.build``) adds dense Gaussian noise to every entry: every τ entry is
non-zero, magnitudes are continuous and no two tie, so a threshold search never meets the shapes real
checkpoints have. A short fine-tune stored in bf16 differs from its base in these ways, each reproduced here:

- most updates are smaller than half a bf16 step of the weight they move, so the stored weight does not change
  at all: a large share of τ is exactly zero (chosen per model, 20-60 % by default);
- the updates that survive are heavy-tailed (Student-t with few degrees of freedom, or Laplace), not Gaussian;
- a stored move is a whole number of the weight's own bf16 steps, so |τ| takes few distinct values and any
  top-K threshold sits inside a large block of tied magnitudes;
- embedding rows of tokens the fine-tuning data never contained get no gradient and stay exactly as in the base.

Everything is seeded per (tensor, model), so a workload is rebuilt bit for bit. ``unchanged_share`` says how much
of a written model ended up exactly equal to its base, so a benchmark can record what it measured.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DeltaShape:
    """How one fine-tune moves its base: ``scale`` of the update relative to the weights' own spread, the
    tail (``"t"`` with ``df`` degrees of freedom, or ``"laplace"``), and the share of embedding rows that stay."""

    scale: float
    tail: str = "t"
    df: float = 3.0
    untouched_rows: float = 0.6


# Three fine-tunes of increasing strength: in bf16 from over half of a matrix's entries down to about a quarter
# stay unchanged, and the survivors' magnitudes fall into few values (K = 0.2 thresholds sit in large tie blocks).
REALISTIC = (
    DeltaShape(scale=0.0015, tail="t", df=3.0, untouched_rows=0.7),
    DeltaShape(scale=0.003, tail="laplace", untouched_rows=0.6),
    DeltaShape(scale=0.006, tail="t", df=4.0, untouched_rows=0.5),
)


def heavy_tailed(shape: tuple[int, ...], shape_spec: DeltaShape, g: torch.Generator) -> torch.Tensor:
    """Unit-scale draws: Student-t (a normal over the root of a scaled chi-square) or Laplace."""
    if shape_spec.tail == "laplace":
        u = torch.rand(shape, generator=g).clamp_min_(1e-12)
        sign = torch.randint(0, 2, shape, generator=g, dtype=torch.int8).float().mul_(2).sub_(1)
        return u.log_().neg_().mul_(sign)
    if shape_spec.tail == "t":
        if shape_spec.df != int(shape_spec.df):
            raise ValueError("df must be a whole number here (a sum of squared normals)")
        z = torch.randn(shape, generator=g)
        chi2 = torch.randn((*shape, int(shape_spec.df)), generator=g).square_().sum(-1)
        return z.div_(chi2.div_(shape_spec.df).sqrt_().clamp_min_(1e-6))
    raise ValueError(f"unknown tail {shape_spec.tail!r}")


def base_tensor(name: str, shape: tuple[int, ...], index: int) -> torch.Tensor:
    """The base's weight in float32: norms near 1, matrices N(0, 0.02²), seeded by position."""
    g = torch.Generator().manual_seed(1000 * index)
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def finetuned_tensor(
    name: str, base: torch.Tensor, index: int, model: int, spec: DeltaShape, dtype: torch.dtype
) -> torch.Tensor:
    """θ = round(base + δ) in ``dtype``: δ heavy-tailed at ``spec.scale`` of the tensor's spread, rows of an
    embedding the data never touched left as in the base (rounding does the rest of the zeros)."""
    g = torch.Generator().manual_seed(1000 * index + model + 1)
    spread = float(base.std()) if base.numel() > 1 and base.dim() > 1 else 0.05
    delta = heavy_tailed(tuple(base.shape), spec, g).mul_(spec.scale * spread)
    if "embed_tokens" in name and base.dim() == 2:
        rows = torch.rand(base.shape[0], generator=g) < spec.untouched_rows
        delta[rows] = 0.0
    stored_base = base.to(dtype)
    return (stored_base.float() + delta).to(dtype)


def build_realistic(
    root: Path,
    config: dict,
    shapes: dict[str, tuple[int, ...]],
    deltas: tuple[DeltaShape, ...] = REALISTIC,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 1_000_000_000,
) -> list[Path]:
    """Write base + one fine-tune per ``deltas`` entry (sharded safetensors, ``dtype``) under ``root``, tensor by
    tensor; a complete earlier build is reused. Returns the model directories, base first."""
    dirs = [root / "base"] + [root / f"ft{i}" for i in range(len(deltas))]
    if all((d / "done").is_file() for d in dirs):
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    writers = [_ShardWriter(d, shard_bytes) for d in dirs]
    stats = [[0, 0] for _ in deltas]
    for index, (name, shape) in enumerate(shapes.items()):
        base = base_tensor(name, shape, index)
        stored = base.to(dtype)
        writers[0].add(name, stored)
        for m, spec in enumerate(deltas):
            theta = finetuned_tensor(name, base, index, m, spec, dtype)
            stats[m][0] += int(torch.count_nonzero(theta.view(-1) == stored.view(-1)))
            stats[m][1] += theta.numel()
            writers[m + 1].add(name, theta)
            del theta
        del base, stored
    dtype_name = str(dtype).removeprefix("torch.")
    for m, w in enumerate(writers):
        extra = {} if m == 0 else {"unchanged_share": stats[m - 1][0] / max(stats[m - 1][1], 1)}
        w.finish({**config, "torch_dtype": dtype_name}, extra)
    return dirs


def unchanged_share(directory: Path) -> float | None:
    """The share of entries a built fine-tune left exactly as in the base (None for the base)."""
    path = directory / "done"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("unchanged_share")


class _ShardWriter:
    """Tensors into ``model-0000k-of-0000n.safetensors`` shards of about ``shard_bytes`` each, plus the index."""

    def __init__(self, directory: Path, shard_bytes: int) -> None:
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        directory.mkdir(parents=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        if sum(t.numel() * t.element_size() for t in self.pending.values()) >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        file = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.directory / file), metadata={"format": "pt"})
        self.files.append(file)
        self.weight_map.update(dict.fromkeys(self.pending, file))
        self.pending = {}

    def finish(self, config: dict, done: dict) -> None:
        self._flush()
        total = len(self.files)
        names = {old: f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k, old in enumerate(self.files)}
        for old, new in names.items():
            (self.directory / old).rename(self.directory / new)
        index = {"metadata": {}, "weight_map": {n: names[f] for n, f in self.weight_map.items()}}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index))
        (self.directory / "config.json").write_text(json.dumps(config))
        (self.directory / "done").write_text(json.dumps({"ok": True, **done}))


def describe(dirs: list[Path]) -> dict[str, object]:
    """What a benchmark records about the workload it measured."""
    return {
        "family": "realistic",
        "unchanged_share": [unchanged_share(d) for d in dirs[1:]],
        "deltas": [spec.__dict__ for spec in REALISTIC[: len(dirs) - 1]],
    }


if __name__ == "__main__":  # a quick look at what the generator makes: python bench/workloads.py
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mmer.synthetic import llama_config, llama_shapes

    cfg = llama_config(hidden=256, intermediate=704, layers=2, heads=4, kv_heads=2, vocab=4000, max_positions=256)
    with tempfile.TemporaryDirectory() as tmp:
        built = build_realistic(Path(tmp) / "w", cfg, llama_shapes(cfg))
        print(json.dumps(describe(built), indent=2))
