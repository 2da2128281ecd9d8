"""A joint tune's result: every candidate vector in the order it was scored, the chosen one and how the search
ended; written as JSON, a recipe for ``mmer merge --recipe`` and a plot, as the per-modality report is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmer.config import Recipe
from mmer.io.report_files import save_figure
from mmer.tune.joint_search import Axis, Vector
from mmer.tune.report import (
    JOINT_TUNE_REPORT_FORMAT,
    chosen_recipe,
    write_tune_json,
    write_tuned_recipe,
)
from mmer.tune.search import flat_along


@dataclass
class JointResult:
    order: int  # its place in the search order
    k: float
    alpha: float
    lambdas: dict[str, float | None]  # every modality's λ (the untuned keep the recipe's; None: the rule has none)
    score: float
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "k": self.k,
            "alpha": self.alpha,
            "lambda": self.lambdas,
            "score": self.score,
            "details": self.details,
            "seconds": self.seconds,
        }


@dataclass
class JointReport:
    """Every candidate vector's score, in search order, and the chosen one; :meth:`tuned_recipe` applies it."""

    score: str
    description: str
    modalities: list[str]  # the modalities whose λ was searched
    lambdas: list[float]
    ks: list[float]
    alphas: list[float]
    method: str  # "grid" or "coordinate"
    budget: int
    rounds: int
    stopped: str
    results: list[JointResult]  # in the order scored
    best: JointResult
    current_k: float
    current_alpha: float
    current_lambdas: dict[str, float | None]
    start: dict[str, float]  # the axes' starting values (the recipe's, snapped to the grids)
    validation: str | None
    recipe: Recipe
    backend: str = "serial"
    jobs: int = 1
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def best_lambdas(self) -> dict[str, float]:
        return {m: self.best.lambdas[m] for m in self.modalities}  # type: ignore[misc]

    def tuned_recipe(self) -> Recipe:
        """The input recipe with the chosen vector: ``mmer merge`` it."""
        return chosen_recipe(
            self.recipe,
            self.best_lambdas,
            self.best.k,
            self.best.alpha,
            len(self.alphas) > 1 or self.best.alpha != self.current_alpha,
        )

    def write_recipe(self, path: str | Path) -> Path:
        how = f"jointly, {self.method} search; score: {self.description}"
        return write_tuned_recipe(path, self.tuned_recipe(), how)

    def write_json(self, path: str | Path) -> Path:
        return write_tune_json(path, JOINT_TUNE_REPORT_FORMAT, self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": "joint",
            "score": self.score,
            "description": self.description,
            "higher_is_better": True,
            "modalities": self.modalities,
            "grid": {"lambda": self.lambdas, "k": self.ks, "alpha": self.alphas},
            "search": {
                "method": self.method,
                "budget": self.budget,
                "scored": len(self.results),
                "rounds": self.rounds,
                "stopped": self.stopped,
                "start": self.start,
            },
            "best": {
                "order": self.best.order,
                "k": self.best.k,
                "alpha": self.best.alpha,
                "lambda": self.best_lambdas,
                "score": self.best.score,
            },
            "current": {"k": self.current_k, "alpha": self.current_alpha, "lambda": self.current_lambdas},
            "validation": self.validation,
            "results": [r.to_dict() for r in self.results],
            "tuned_recipe": self.tuned_recipe().to_dict(),
            "backend": self.backend,
            "jobs": self.jobs,
            "seconds": self.seconds,
            "warnings": self.warnings,
        }

    def write_plot(self, png: str | Path) -> Path:
        """The score in search order (the best so far as a line), and per searched axis the best score seen at
        each of its values; the chosen candidate starred."""
        from mmer.inspect import _pyplot

        plt = _pyplot()
        axes_shown = [("K", self.ks, lambda r: r.k), ("α", self.alphas, lambda r: r.alpha)]
        axes_shown = [a for a in axes_shown if len(a[1]) > 1]
        axes_shown += [(m, self.lambdas, lambda r, m=m: r.lambdas[m]) for m in self.modalities]
        n = 1 + len(axes_shown)
        fig, panels = plt.subplots(1, n, figsize=(4.2 * n, 3.6), constrained_layout=True, squeeze=False)
        order = [r.order for r in self.results]
        scores = [r.score for r in self.results]
        running = [max(scores[: i + 1]) for i in range(len(scores))]
        first = panels[0][0]
        first.plot(order, scores, marker="o", linestyle="none", label="candidate")
        first.plot(order, running, label="best so far")
        first.plot([self.best.order], [self.best.score], marker="*", markersize=16, color="black", linestyle="none")
        first.set_title(f"{self.method} search")
        first.set_xlabel("search order")
        first.set_ylabel(f"score: {self.score}")
        first.legend(fontsize=7)
        for panel, (name, values, of) in zip(panels[0][1:], axes_shown, strict=True):
            seen = {v: max((r.score for r in self.results if of(r) == v), default=None) for v in values}
            xs = [v for v in values if seen[v] is not None]
            panel.plot(xs, [seen[v] for v in xs], marker="o")
            panel.plot([of(self.best)], [self.best.score], marker="*", markersize=16, color="black", linestyle="none")
            panel.set_title(f"λ of {name}" if name not in ("K", "α") else name)
            panel.set_xlabel(name if name in ("K", "α") else "λ")
            panel.set_ylabel("best score seen")
        fig.suptitle(f"mmer tune --joint: {self.description} (higher is better)", fontsize=9)
        try:
            return save_figure(fig, png, dpi=120)
        finally:
            plt.close(fig)


def joint_flat_axes(axes: Sequence[Axis], scores: dict[Vector, float]) -> list[str]:
    """A sentence for each axis along which no compared score moved: its choice says nothing about the models
    (ties go to the start, the recipe's value), as :func:`mmer.tune.search.flat_axes` says of the per-modality
    grids."""
    out = []
    for i, axis in enumerate(axes):
        if len(axis.values) < 2 or not flat_along(scores, i):
            continue
        flag = {"K": "--ks", "α": "--alphas"}.get(axis.name, "--lambdas")
        what = axis.name if axis.name in ("K", "α") else f"λ of {axis.name}"
        tried = sorted({v[i] for v in scores})
        out.append(
            f"{flag}: every {what} the search compared ({', '.join(f'{v:g}' for v in tried)}) scored the same, so "
            f"the choice of {what} is only the tie-break (the value closest to the recipe's)"
        )
    return out
