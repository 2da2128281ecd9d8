"""A tune's result: every candidate's score and the chosen values, written as JSON, as a recipe for
``mmer merge --recipe`` and as a plot; each file replaces only one an earlier tune wrote.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmer.config import Recipe
from mmer.errors import OutputExistsError
from mmer.io.report_files import check_png, check_report_file, save_figure, text_written_by, write_report_file
from mmer.tune.errors import refused
from mmer.version import __version__

TUNE_REPORT_FORMAT = "mmer-tune/1"
JOINT_TUNE_REPORT_FORMAT = "mmer-tune-joint/1"  # a joint tune's tune.json (mmer.tune.joint_report)
TUNED_RECIPE_FIRST_WORDS = "# λ per modality and K chosen by `mmer tune`"
TUNED_RECIPE_SIGNATURE = text_written_by(TUNED_RECIPE_FIRST_WORDS)


def tune_report_written_by_mmer(head: bytes) -> bool:
    """tune.json carries its format tag first (the per-modality or the joint one); reports written before the tag
    began with the score."""
    return head.startswith(
        (
            f'{{\n  "format": "{TUNE_REPORT_FORMAT}"'.encode(),
            f'{{\n  "format": "{JOINT_TUNE_REPORT_FORMAT}"'.encode(),
            b'{\n  "score": ',
        )
    )


def chosen_recipe(recipe: Recipe, lambdas: dict[str, float], k: float, alpha: float, write_alpha: bool) -> Recipe:
    """``recipe`` with the chosen K, each tuned modality's chosen λ and (``write_alpha``) the chosen α."""
    models = tuple(replace(m, lambda_=lambdas[m.modality]) if m.modality in lambdas else m for m in recipe.models)
    options = replace(recipe.options, k=k)
    if write_alpha:
        options = replace(options, alpha=alpha)
    return Recipe(recipe.base, models, options)


def write_tuned_recipe(path: str | Path, recipe: Recipe, how: str) -> Path:
    """The tuned recipe under the header that marks it as mmer's (``how``: how it was chosen), so that a rerun
    may overwrite it and nothing else."""
    path = Path(path)
    header = f"{TUNED_RECIPE_FIRST_WORDS} {__version__} ({how}).\n"
    data = (header + f"# Merge with: mmer merge --recipe {path.name} -o merged/\n" + recipe.to_yaml()).encode("utf-8")
    return write_report_file(path, data, TUNED_RECIPE_SIGNATURE, "tuned recipe")


def write_tune_json(path: str | Path, report_format: str, fields: dict[str, Any]) -> Path:
    """A tune report's JSON, its format tag first."""
    data = (json.dumps({"format": report_format, **fields}, indent=2) + "\n").encode("utf-8")
    return write_report_file(path, data, tune_report_written_by_mmer, "tune report")


@dataclass
class TuneResult:
    modality: str
    k: float
    lambda_: float
    score: float
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    alpha: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "k": self.k,
            "alpha": self.alpha,
            "lambda": self.lambda_,
            "score": self.score,
            "details": self.details,
            "seconds": self.seconds,
        }


@dataclass
class TuneReport:
    """Every candidate's score and the chosen values; :meth:`tuned_recipe` applies them."""

    score: str
    description: str
    modalities: list[str]
    lambdas: list[float]
    ks: list[float]
    alphas: list[float]
    results: list[TuneResult]
    best_k: float
    best_alpha: float
    best_lambdas: dict[str, float]
    best_scores: dict[str, float]
    point_scores: dict[tuple[float, float], float]  # (K, α) → the mean over modalities of their best λ's score
    current_k: float
    current_alpha: float
    current_lambdas: dict[str, float | None]
    recipe: Recipe
    tau_star_reused: tuple[float, float] | None = None  # the (K, α) whose τ* was read from the checkpoint
    backend: str = "serial"
    jobs: int = 1
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def k_scores(self) -> dict[float, float]:
        """K → its points' mean best score at the chosen α."""
        return {k: s for (k, a), s in self.point_scores.items() if a == self.best_alpha}

    @property
    def alpha_scores(self) -> dict[float, float]:
        """α → its points' mean best score at the chosen K."""
        return {a: s for (k, a), s in self.point_scores.items() if k == self.best_k}

    def table(self, modality: str, k: float, alpha: float | None = None) -> dict[float, TuneResult]:
        """λ → the result of one modality at one K (and α: the chosen one by default)."""
        alpha = self.best_alpha if alpha is None else alpha
        return {r.lambda_: r for r in self.results if r.modality == modality and r.k == k and r.alpha == alpha}

    def tuned_recipe(self) -> Recipe:
        """The input recipe with the chosen K (and α, when α was searched) and each tuned modality's chosen λ:
        ``mmer merge`` it."""
        return chosen_recipe(
            self.recipe,
            self.best_lambdas,
            self.best_k,
            self.best_alpha,
            len(self.alphas) > 1 or self.best_alpha != self.current_alpha,
        )

    def write_recipe(self, path: str | Path) -> Path:
        return write_tuned_recipe(path, self.tuned_recipe(), f"score: {self.score}, {self.description}")

    def write_json(self, path: str | Path) -> Path:
        return write_tune_json(path, TUNE_REPORT_FORMAT, self.to_dict())

    def write_plot(self, png: str | Path) -> Path:
        return write_plot(self, png)

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "description": self.description,
            "higher_is_better": True,
            "modalities": self.modalities,
            "grid": {"lambda": self.lambdas, "k": self.ks, "alpha": self.alphas},
            "best": {
                "k": self.best_k,
                "alpha": self.best_alpha,
                "lambda": self.best_lambdas,
                "score": self.best_scores,
                "k_scores": {f"{k:g}": v for k, v in self.k_scores.items()},
                "alpha_scores": {f"{a:g}": v for a, v in self.alpha_scores.items()},
            },
            "current": {"k": self.current_k, "alpha": self.current_alpha, "lambda": self.current_lambdas},
            "tau_star_reused_for_k": None if self.tau_star_reused is None else self.tau_star_reused[0],
            "tau_star_reused_for_alpha": None if self.tau_star_reused is None else self.tau_star_reused[1],
            "results": [r.to_dict() for r in self.results],
            "tuned_recipe": self.tuned_recipe().to_dict(),
            "backend": self.backend,
            "jobs": self.jobs,
            "seconds": self.seconds,
            "warnings": self.warnings,
        }


def write_plot(report: TuneReport, png: str | Path) -> Path:
    """Score vs λ, one panel per modality, one line per (K, α); the chosen (λ, K, α) is starred."""
    from mmer.inspect import _pyplot

    plt = _pyplot()
    n = len(report.modalities)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), constrained_layout=True, squeeze=False)
    for ax, modality in zip(axes[0], report.modalities, strict=True):
        for k, alpha in report.point_scores:
            rows = sorted(report.table(modality, k, alpha).values(), key=lambda r: r.lambda_)
            label = f"K = {k:g}" + (f", α = {alpha:g}" if len(report.alphas) > 1 else "")
            ax.plot([r.lambda_ for r in rows], [r.score for r in rows], marker="o", label=label)
        best = report.table(modality, report.best_k).get(report.best_lambdas[modality])
        if best is not None:
            ax.plot(
                [best.lambda_],
                [best.score],
                marker="*",
                markersize=16,
                color="black",
                linestyle="none",
                label=f"chosen λ = {best.lambda_:g}",
            )
        ax.set_title(modality)
        ax.set_xlabel("λ")
        ax.set_ylabel(f"score: {report.score}")
        ax.legend(fontsize=7)
    fig.suptitle(f"mmer tune: {report.description} (higher is better)", fontsize=9)
    try:
        return save_figure(fig, png, dpi=120)
    finally:
        plt.close(fig)


def check_outputs(output: str | Path, recipe: str | Path | None = None, overwrite: bool = False) -> None:
    """Before the search: the report files may be written, and replace only what an earlier tune wrote there.

    As for every mmer output (``mmer.io.outputs.check_target``), an existing one is replaced only with
    ``overwrite``: a second tune into the same directory must not silently discard the first one's results.
    """
    output = Path(output)
    if os.path.lexists(output) and (output.is_symlink() or not output.is_dir()):
        raise refused(output, "is not a directory", key="output", hint="choose another -o")
    files = [output / "tune.json", output / "tune.png"] if output.is_dir() else []
    if output.is_dir():
        check_report_file(output / "tune.json", tune_report_written_by_mmer, "tune report")
        check_png(output / "tune.png")
    if recipe is not None:
        check_report_file(recipe, TUNED_RECIPE_SIGNATURE, "tuned recipe")
        files.append(Path(recipe))
    existing = [f for f in files if os.path.lexists(f)]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{existing[0]}: already exists (an earlier mmer tune wrote it)",
            file=str(existing[0]),
            key="recipe" if existing[0] == (Path(recipe) if recipe is not None else None) else "output",
            hint="choose another output path or pass --overwrite to replace it",
        )


def write_outputs(
    report: Any, output: str | Path, recipe: str | Path | None = None, overwrite: bool = False
) -> dict[str, Path | None]:
    """tune.json and tune.png in ``output`` (created if need be) and, when asked, the tuned recipe: ``report`` is
    a :class:`TuneReport` or a joint one (:class:`mmer.tune.joint_report.JointReport`), which write themselves."""
    check_outputs(output, recipe, overwrite)
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise refused(output, f"cannot create it ({err.strerror})", key="output", hint="choose another -o") from None
    return {
        "json": report.write_json(output / "tune.json"),
        "png": report.write_plot(output / "tune.png"),
        "recipe": None if recipe is None else report.write_recipe(recipe),
    }
