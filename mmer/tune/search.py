"""The grids searched and the choice made from their scores: each modality's best λ at every (K, α), and the
(K, α) whose bests are best on average (docs/method.md §7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mmer.config import Recipe
from mmer.errors import ConfigError
from mmer.tune.candidates import Point
from mmer.tune.report import TuneReport, TuneResult
from mmer.tune.scores import BUILTIN_SCORES, Scorer

# The paper's sensitivity grid (docs/method.md §7): λ·50 % ∈ {15, 30, 45, 60, 75} %, and K ∈ {60, 80, 100} %.
DEFAULT_LAMBDAS = (0.3, 0.6, 0.9, 1.2, 1.5)


DEFAULT_KS = (0.6, 0.8, 1.0)


def grid(values: Sequence[float], key: str, ok: Callable[[float], bool], hint: str) -> list[float]:
    out = []
    for v in values:
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {v!r} is not a number", key=key, hint=hint) from None
        if not ok(v):
            raise ConfigError(f"{key}: {v:g} is out of range", key=key, hint=hint)
        out.append(v)
    if not out:
        raise ConfigError(f"{key}: the grid is empty", key=key, hint="give at least one value")
    return sorted(set(out))


def choose(
    rows: list[dict[str, Any]],
    scorer: Scorer,
    tuned: list[str],
    lambdas: list[float],
    points: list[Point],
    current_point: Point,
    current: dict[str, float | None],
    recipe: Recipe,
) -> TuneReport:
    """Per (modality, K, α) the best λ; (K, α) by the mean over modalities of those bests. Ties go to the value
    closest to the recipe's current one (K first, then α; then the smaller), so a flat score leaves the recipe
    as it was."""
    results = [
        TuneResult(
            r["modality"],
            r["k"],
            r["lambda"],
            r["score"],
            r.get("details", {}),
            r.get("seconds", 0.0),
            alpha=r.get("alpha", current_point[1]),
        )
        for r in rows
    ]
    by = {(r.modality, (r.k, r.alpha), r.lambda_): r for r in results}

    def best_lambda(m: str, point: Point) -> float:
        now = current.get(m)
        return max(
            lambdas,
            key=lambda lam: (by[(m, point, lam)].score, -abs(lam - (now if now is not None else lam)), -lam),
        )

    point_scores = {p: sum(by[(m, p, best_lambda(m, p))].score for m in tuned) / len(tuned) for p in points}
    current_k, current_alpha = current_point
    best_point = max(
        points,
        key=lambda p: (point_scores[p], -abs(p[0] - current_k), -abs(p[1] - current_alpha), -p[0], -p[1]),
    )
    best = {m: best_lambda(m, best_point) for m in tuned}
    return TuneReport(
        score=scorer.name,
        description=BUILTIN_SCORES.get(scorer.name, f"{scorer.name} (the caller's score)"),
        modalities=tuned,
        lambdas=lambdas,
        ks=sorted({k for k, _ in points}),
        alphas=sorted({a for _, a in points}),
        results=results,
        best_k=best_point[0],
        best_alpha=best_point[1],
        best_lambdas=best,
        best_scores={m: by[(m, best_point, best[m])].score for m in tuned},
        point_scores=point_scores,
        current_k=current_k,
        current_alpha=current_alpha,
        current_lambdas={m: current.get(m) for m in tuned},
        recipe=recipe,
    )


def flat_axes(report: TuneReport, untrimmed: bool = False) -> list[str]:
    """A sentence for each grid axis along which no score moved: its choice then says nothing about the models.

    Ties go to the recipe's current value (see :func:`choose`), so a flat axis silently keeps it; on synthetic
    or untouched inputs (a trim threshold of 0 makes every K merge the same τ*) the user must hear that.
    ``untrimmed``: some model's trim threshold was 0 at some K below 1, the usual reason K changes nothing.
    """
    per = {
        m: {(r.k, r.alpha, r.lambda_): r.score for r in report.results if r.modality == m} for m in report.modalities
    }
    axes = {"K": ("--ks", report.ks), "α": ("--alphas", report.alphas), "λ": ("--lambdas", report.lambdas)}
    out = []
    for index, (axis, (flag, values)) in enumerate(axes.items()):
        if len(values) < 2:
            continue
        flat = [m for m in report.modalities if flat_along(per[m], index)]
        if flat:
            grid = ", ".join(f"{v:g}" for v in values)
            out.append(
                f"{flag}: every {axis} of the grid ({grid}) scored the same for {', '.join(flat)}, so the choice "
                f"of {axis} there is only the tie-break (the value closest to the recipe's)"
                + (
                    "; a trim threshold of 0 (see above) makes every K merge the same τ*"
                    if axis == "K" and untrimmed
                    else ""
                )
            )
    return out


def flat_along(scores: dict[tuple[float, ...], float], axis: int) -> bool | None:
    """Whether the scores never moved along ``axis``: every set of scored vectors that differ on that axis alone
    scored the same. ``None`` when no two scored vectors differ on it alone (the search never compared it)."""
    lines: dict[tuple[float, ...], set[float]] = {}
    counts: dict[tuple[float, ...], int] = {}
    for vector, value in scores.items():
        rest = vector[:axis] + vector[axis + 1 :]
        lines.setdefault(rest, set()).add(value)
        counts[rest] = counts.get(rest, 0) + 1
    compared = [rest for rest, n in counts.items() if n >= 2]
    if not compared:
        return None
    return all(len(lines[rest]) == 1 for rest in compared)
