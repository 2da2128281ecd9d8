"""What each modality's mask kept, and where: densities by layer and module, and overlaps between modalities.

Reads only the manifest and the packed mask files (no weights), and counts bits on the packed bytes, so
inspecting a 7B checkpoint takes seconds and little memory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from mmer.checkpoint import bits
from mmer.checkpoint.decoupled import DecoupledCheckpoint, load_decoupled
from mmer.io.layouts import MODULE_TYPES, layer_index, module_type
from mmer.io.report_files import save_figure


def row_label(canonical: str) -> str:
    """Heatmap row of a tensor: its decoder layer number, ``embed`` before them, ``head`` after them."""
    layer = layer_index(canonical)
    if layer is not None:
        return str(layer)
    return "embed" if "embed_tokens" in canonical else "head"


@dataclass
class Count:
    kept: int = 0
    total: int = 0

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "total": self.total, "density": self.density}


@dataclass
class Overlap:
    a: str
    b: str
    both: int
    either: int
    kept_a: int
    kept_b: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "both": self.both,
            "either": self.either,
            "jaccard": self.both / self.either if self.either else 0.0,
            "share_of_a_in_b": self.both / self.kept_a if self.kept_a else 0.0,
            "share_of_b_in_a": self.both / self.kept_b if self.kept_b else 0.0,
        }


@dataclass
class MaskStats:
    """Mask statistics of a decoupled checkpoint."""

    path: str
    modalities: list[str]
    overall: dict[str, Count]
    by_module: dict[str, dict[str, Count]]  # modality → module type → count
    by_layer: dict[str, dict[str, Count]]  # modality → row label → count
    grid: dict[str, dict[tuple[str, str], Count]]  # modality → (row, module) → count
    rows: list[str]
    modules: list[str]
    overlaps: list[Overlap] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "modalities": {
                m: {
                    **self.overall[m].to_dict(),
                    "by_module": {k: v.to_dict() for k, v in self.by_module[m].items()},
                    "by_layer": {k: v.to_dict() for k, v in self.by_layer[m].items()},
                }
                for m in self.modalities
            },
            "overlaps": [o.to_dict() for o in self.overlaps],
        }


def inspect_masks(path: str | Path, revision: str | None = None) -> MaskStats:
    """Count, on packed bits, how much of τ* each modality keeps per layer, per module, and jointly.

    ``path`` is a checkpoint directory or a Hub id (at ``revision``), as for :func:`mmer.load_decoupled`.
    """
    path = Path(path)
    # the one validated way in: sidecar, schema, files inside the checkpoint
    with load_decoupled(path, revision) as ckpt:
        return _inspect(ckpt)


def _inspect(ckpt: DecoupledCheckpoint) -> MaskStats:
    path, manifest = ckpt.path, ckpt.manifest
    modalities = list(manifest.modalities)
    files = {m: ckpt.mask_file(m) for m in modalities}
    overall = {m: Count() for m in modalities}
    by_module: dict[str, dict[str, Count]] = {m: defaultdict(Count) for m in modalities}
    by_layer: dict[str, dict[str, Count]] = {m: defaultdict(Count) for m in modalities}
    grid: dict[str, dict[tuple[str, str], Count]] = {m: defaultdict(Count) for m in modalities}
    pair_counts = {pair: [0, 0] for pair in combinations(modalities, 2)}
    rows: list[str] = []
    modules_seen: set[str] = set()
    for slot in manifest.slots:
        if not slot.merged:
            continue
        row, module = row_label(slot.name), module_type(slot.name)
        if row not in rows:
            rows.append(row)
        modules_seen.add(module)
        packed = {m: files[m].packed(slot.name) for m in modalities}
        numel = 1
        for d in slot.shape:
            numel *= d
        for m in modalities:
            kept = bits.popcount(packed[m])
            for count in (overall[m], by_module[m][module], by_layer[m][row], grid[m][(row, module)]):
                count.kept += kept
                count.total += numel
        for (a, b), acc in pair_counts.items():
            acc[0] += bits.popcount_and(packed[a], packed[b])
            acc[1] += bits.popcount_or(packed[a], packed[b])
    overlaps = [
        Overlap(a, b, both, either, overall[a].kept, overall[b].kept) for (a, b), (both, either) in pair_counts.items()
    ]
    ordered_rows = (
        (["embed"] if "embed" in rows else [])
        + sorted((r for r in rows if r.isdigit()), key=int)
        + (["head"] if "head" in rows else [])
    )
    modules = [m for m in MODULE_TYPES if m in modules_seen]
    return MaskStats(
        str(path),
        modalities,
        overall,
        {m: dict(v) for m, v in by_module.items()},
        {m: dict(v) for m, v in by_layer.items()},
        {m: dict(v) for m, v in grid.items()},
        ordered_rows,
        modules,
        overlaps,
    )


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend; matplotlib is the optional ``plot`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        from mmer.errors import MmerError

        raise MmerError(f"drawing needs matplotlib ({err})", hint="pip install 'mmer-merge[plot]'") from None
    return plt


def write_heatmap(stats: MaskStats, png: str | Path) -> Path:
    """One panel per modality: rows are layers (embed … head), columns module types, colour the density."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # matplotlib is an optional extra
        from mmer.errors import MmerError

        raise MmerError(
            f"drawing the heatmap needs matplotlib ({err})", hint="pip install 'mmer-merge[plot]'"
        ) from None
    import numpy as np

    n = len(stats.modalities)
    fig_h = max(3.0, 0.22 * len(stats.rows) + 1.5)
    fig, axes = plt.subplots(1, n, figsize=(2.2 + 2.6 * n, fig_h), squeeze=False, constrained_layout=True)
    image = None
    for ax, modality in zip(axes[0], stats.modalities, strict=True):
        data = np.full((len(stats.rows), len(stats.modules)), np.nan)
        for i, row in enumerate(stats.rows):
            for j, module in enumerate(stats.modules):
                count = stats.grid[modality].get((row, module))
                if count is not None and count.total:
                    data[i, j] = count.density
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(f"{modality}\n{stats.overall[modality].density:.1%} kept", fontsize=9)
        ax.set_xticks(range(len(stats.modules)), stats.modules, rotation=60, fontsize=7)
        ax.set_yticks(range(len(stats.rows)), stats.rows, fontsize=6)
        ax.set_xlabel("module")
    axes[0][0].set_ylabel("layer")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="mask density", shrink=0.8)
    try:
        return save_figure(fig, png, dpi=130)
    finally:
        plt.close(fig)
