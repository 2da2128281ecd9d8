"""Everything the terminal sees: rich progress bars with ETA, tables, errors, and --json output.

The only module that imports rich; the library reports through :class:`mmer.progress.ProgressSink`. Rich reads
``[...]`` as markup, so every string that comes from outside (paths, tensor and module names, messages) is
escaped or printed with ``markup=False``: a path holding ``[/x]`` would otherwise crash the print.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from mmer.errors import MmerError
from mmer.progress import ProgressSink, human_bytes

# Outside a terminal (a pipe, a file, a CI log) rich assumes 80 columns and squeezes tables, cutting paths short
# with an ellipsis; such output is read whole (grep, a log viewer), so it is as wide as its lines unless
# COLUMNS says otherwise. Cells holding paths fold rather than truncate whatever the width.
PIPE_WIDTH = 4096


class _Console(Console):
    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal and not self._environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


err_console = _Console(stderr=True)
out_console = _Console()


class _AmountColumn(ProgressColumn):
    """Bytes as sizes (``1.2/3.4 MB``), any other unit as a count of it (``120/500 steps``)."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn()

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "B")
        if unit == "B":
            return self._bytes.render(task)
        total = "?" if task.total is None else f"{task.total:,.0f}"
        return Text(f"{task.completed:,.0f}/{total} {unit}", style="progress.download")


class _SpeedColumn(ProgressColumn):
    """Bytes per second as a size, any other unit per second as a rate of it (``3.1 steps/s``)."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "B")
        if unit == "B":
            return self._bytes.render(task)
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{speed:.3g} {unit}/s", style="progress.data.speed")


class RichProgress(ProgressSink):
    """Progress bars on stderr (so --json on stdout stays clean), sized in bytes for a meaningful ETA; stages
    counted in another unit (training steps, candidates) show counts of it, never bytes."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description:<22}"),
            BarColumn(),
            _AmountColumn(),
            _SpeedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
            disable=not enabled,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, stage: str, total: float, unit: str = "B") -> None:
        plural = unit if unit == "B" or unit.endswith("s") else unit + "s"  # "step" counts as "12/40 steps"
        self._tasks[stage] = self._progress.add_task(stage, total=max(total, 1), unit=plural)

    def advance(self, stage: str, amount: float) -> None:
        if stage in self._tasks:
            self._progress.advance(self._tasks[stage], amount)

    def end(self, stage: str) -> None:
        task = self._tasks.pop(stage, None)
        if task is not None:
            self._progress.update(task, completed=self._progress.tasks[task].total)

    def note(self, message: str) -> None:
        if self.enabled:
            err_console.print(message, markup=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_error(err: MmerError, as_json: bool) -> None:
    if as_json:
        print_json({"ok": False, **err.to_dict()})
        return
    where = [
        f"{label} {value}"
        for label, value in (("file", err.file), ("tensor", err.tensor), ("key", err.key))
        if value and str(value) not in err.message
    ]
    message = err.message + (f" ({', '.join(where)})" if where else "")
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    if err.hint:
        err_console.print(f"[yellow]fix:[/] {escape(err.hint)}", highlight=False)


def print_plan(plan: dict[str, Any]) -> None:
    table = Table(title="merge plan", show_lines=False)
    for col in ("role", "model", "layout", "λ", "components", "private LLM tensors"):
        table.add_column(col, overflow="fold" if col in ("model", "private LLM tensors") else "ellipsis")
    base = plan["base"]
    table.add_row("base", escape(str(base["model"])), base["layout"], "", "", "")
    for m in plan["models"]:
        table.add_row(
            m["modality"],
            escape(str(m["model"])),
            m["layout"],
            "-" if m["lambda"] is None else f"{m['lambda']:g}",
            str(m["component_tensors"]),
            escape(", ".join(m["private_tensors"])) or "-",
        )
    out_console.print(table)
    slots = plan["slots"]
    out_console.print(
        f"LLM tensors: {slots['total']} ({slots['merged']} merged, {slots['merged_parameters']:,} parameters)"
    )
    for name, reason in plan["not_merged"].items():
        out_console.print(f"  not merged: {name} ({reason})", markup=False)
    print_estimate(plan["estimate"], out_console)
    opts = plan["options"]
    out_console.print(
        "options: " + ", ".join(f"{k}={v}" for k, v in opts.items() if k not in ("hash_inputs",)),
        highlight=False,
        markup=False,
    )
    for key, what in (("k", "K"), ("dare", "DARE p")):  # each model's own, where they differ
        own = [f"{m['modality']}={m[key]:g}" for m in plan["models"] if key in m]
        if own:
            out_console.print(f"per-model {what}: {', '.join(own)}", highlight=False, markup=False)


def print_estimate(estimate: dict[str, Any] | None, console: Console = err_console) -> None:
    if not estimate:
        return
    console.print(
        f"memory estimate: peak ≈ {human_bytes(estimate['peak_bytes'])} (largest tensor {estimate['largest_slot']}); "
        f"reads {human_bytes(estimate['input_bytes'])}, writes ≈ {human_bytes(estimate['output_bytes'])}",
        highlight=False,
    )


def print_warnings(warnings: list[str]) -> None:
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)


def print_merge_report(report: dict[str, Any]) -> None:
    table = Table(title=f"merged into {escape(str(report['output']))}")
    for col in ("modality", "λ", "mask density", "kept / total", "trim threshold", "mean |τ|"):
        table.add_column(col, justify="right" if col != "modality" else "left")
    for m in report["modalities"]:
        thr = m["trim_threshold"]
        table.add_row(
            m["modality"],
            "-" if m["lambda"] is None else f"{m['lambda']:g}",
            f"{m['density']:.2%}",
            f"{m['kept']:,} / {m['total']:,}",
            "-" if thr is None else f"{thr:.3g}",
            f"{m['mean_abs_delta']:.3g}",
        )
    out_console.print(table)
    secs = report["seconds"]
    out_console.print(
        f"done in {secs.get('total', 0):.1f} s, peak RSS {human_bytes(report['peak_rss_bytes'])}", highlight=False
    )


def print_mask_stats(stats: dict[str, Any], modules: list[str], rows: list[str]) -> None:
    names = list(stats["modalities"])
    overall = Table(title=f"masks of {escape(str(stats['path']))}")
    for col in ("modality", "density", "kept / total"):
        overall.add_column(col, justify="left" if col == "modality" else "right")
    for name, m in stats["modalities"].items():
        overall.add_row(name, f"{m['density']:.2%}", f"{m['kept']:,} / {m['total']:,}")
    out_console.print(overall)
    for title, key, labels in (
        ("density per module type", "by_module", modules),
        ("density per layer", "by_layer", rows),
    ):
        table = Table(title=title)
        table.add_column("module" if key == "by_module" else "layer")
        for name in names:
            table.add_column(name, justify="right")
        for label in labels:
            cells = []
            for name in names:
                count = stats["modalities"][name][key].get(label)
                cells.append("" if count is None else f"{count['density']:.1%}")
            table.add_row(escape(label), *cells)
        out_console.print(table)
    if stats["overlaps"]:
        pairs = Table(title="pairwise overlap")
        for col in ("a", "b", "kept by both", "jaccard", "share of a in b", "share of b in a"):
            pairs.add_column(col, justify="right" if col not in ("a", "b") else "left")
        for o in stats["overlaps"]:
            pairs.add_row(
                o["a"],
                o["b"],
                f"{o['both']:,}",
                f"{o['jaccard']:.1%}",
                f"{o['share_of_a_in_b']:.1%}",
                f"{o['share_of_b_in_a']:.1%}",
            )
        out_console.print(pairs)


def print_compare(report: dict[str, Any]) -> None:
    table = Table(title="reconstruction error ‖θ̂ᵢ − θᵢ‖₁ / ‖τᵢ‖₁ (mask density)")
    table.add_column("variant")
    for modality in report["modalities"]:
        table.add_column(modality, justify="right")
    for v in report["variants"]:
        cells = []
        for modality in report["modalities"]:
            r = v["modalities"][modality]
            scale = "" if r["scale"] == 1.0 else f", s={r['scale']:.3g}"
            cells.append(f"{r['rel_l1']:.4f} ({r['density']:.1%}{scale})")
        table.add_row(escape(v["variant"]), *cells)
    out_console.print(table)
    out_console.print(f"{len(report['variants'])} variants in {report['seconds']:.1f} s", highlight=False)


def print_verify(report: dict[str, Any]) -> None:
    for problem in report["problems"]:
        err_console.print(f"[red]✗[/] {escape(problem)}", highlight=False)
    for note in report.get("notes", []):  # what could not be checked: said, never passed off as checked
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    for modality, r in report["reconstruction"].items():
        out_console.print(
            f"{modality}: rebuilt LLM is {r['rel_l1']:.4f} of its task vector away from the source "
            f"(max |Δ| {r['max_abs']:.3g}); private rows {'equal' if r['private_rows_equal'] else 'DIFFER'}",
            highlight=False,
        )
        if "buckets" in r:  # where every source tensor went (--json lists each one)
            counts = ", ".join(f"{n} {bucket}" for bucket, n in r["buckets"].items())
            dropped = [f"{k} ({t['reason']})" for k, t in r["tensors"].items() if t["bucket"] == "dropped"]
            out_console.print(
                f"{modality}: {len(r['tensors'])} source tensors accounted for: {counts}"
                + (f"; dropped: {', '.join(dropped)}" if dropped else ""),
                highlight=False,
                markup=False,
            )
    status = "[green]ok[/]" if report["ok"] else f"[red]{len(report['problems'])} problem(s)[/]"
    counts = f"{report['files_checked']} files, {report['masks_checked']} masks checked"
    if report.get("tau_star_checked"):
        counts += f", {report['tau_star_checked']} quantised τ* tensors checked"
    out_console.print(f"{escape(report['path'])}: {status} ({counts})")
