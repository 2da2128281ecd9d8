"""The joint search's order: every point of the grid's product, or coordinate ascent within a budget.

In expansion mode the λᵢ are coupled (text tokens run on θ_base + m̄∘τ*, m̄ the mean of every modality's mask,
MMER (arXiv 2505.17110) §3.2, Eq. 7), so a score of mixed prompts is a function of the whole vector (K, α, λ₁…λₙ)
and the per-modality search's |Λ|·n candidates no longer find its maximum. The full product is |Λ|ⁿ (times the
K and α grids) and each candidate is a merge, so it is searched whole only while it fits the budget; beyond,
coordinate ascent from the recipe's own values: one axis at a time, every value of its grid with the others
held, move to the best if it beats the current point, until a whole round moves nothing or the budget is spent.

Both are deterministic: the order depends on the grids, the start and the scores alone, never on timing (a
batch is scored in parallel but read back in its order), and ties go to the point closest to the start, then to
the one scored first, so a flat score leaves the recipe as it was.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mmer.errors import ConfigError

Vector = tuple[float, ...]  # one value per axis, in the axes' order
SEARCHES = ("auto", "grid", "coordinate")
DEFAULT_BUDGET = 32  # the paper's 5-value λ grid over two modalities (25 merges) fits; three (125) do not


@dataclass(frozen=True)
class Axis:
    """One coordinate of the joint search: its name in reports, its grid and the recipe's value (the start)."""

    name: str  # "K", "α" or a modality's name (its λ)
    values: tuple[float, ...]  # sorted, distinct
    start: float  # a value of ``values``: the grid value closest to the recipe's


@dataclass
class Searched:
    """Every scored vector in the order it was scored, the chosen one, and why the search stopped."""

    method: str  # "grid" or "coordinate"
    budget: int
    order: list[Vector] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    rounds: int = 0  # coordinate ascent: rounds begun (the last one moved nothing, unless the budget ended it)
    stopped: str = ""  # "grid complete", "converged" or "budget"
    best: int = 0  # index into ``order``


def snap(values: Sequence[float], value: float) -> float:
    """The grid value closest to ``value`` (the smaller on a tie): where a search starts from the recipe's."""
    return min(values, key=lambda v: (round(abs(v - value), 12), v))  # 0.9 − 0.6 and 1.2 − 0.9 are a tie


def product_size(axes: Sequence[Axis]) -> int:
    size = 1
    for axis in axes:
        size *= len(axis.values)
    return size


def search_method(axes: Sequence[Axis], search: str, budget: int) -> str:
    """``grid`` while the product fits the budget (``auto``), else ``coordinate``; an explicit grid that does not
    fit is refused rather than cut short (a partial product has no meaning)."""
    if search not in SEARCHES:
        raise ConfigError(
            f"search {search!r} is not one of {', '.join(SEARCHES)}", key="search", hint="auto, grid or coordinate"
        )
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"budget {budget!r} is not a positive whole number", key="budget", hint="e.g. --budget 32")
    size = product_size(axes)
    if search == "grid" and size > budget:
        raise ConfigError(
            f"the grid's product has {size} candidates, over the budget of {budget} merges",
            key="budget",
            hint=f"pass --budget {size}, shrink the grids, or use --search coordinate",
        )
    if search == "auto":
        return "grid" if size <= budget else "coordinate"
    return search


def _distance(axes: Sequence[Axis], vector: Vector) -> float:
    """How far ``vector`` is from the start, each axis in units of its grid's span (K, α and λ differ in scale)."""
    total = 0.0
    for axis, v in zip(axes, vector, strict=True):
        span = axis.values[-1] - axis.values[0]
        total += abs(v - axis.start) / (span if span > 0 else 1.0)
    return round(total, 12)  # equal distances compare equal whatever the rounding of the subtractions


def joint_search(
    axes: Sequence[Axis],
    score: Callable[[list[Vector]], list[float]],
    search: str = "auto",
    budget: int = DEFAULT_BUDGET,
) -> Searched:
    """Search the axes' product for the best-scoring vector (higher is better), never scoring more than ``budget``.

    ``score`` receives a batch of vectors (in order; the caller may score them in parallel) and returns their
    scores in the same order. No vector is scored twice.
    """
    method = search_method(axes, search, budget)
    out = Searched(method, budget)
    scored: dict[Vector, float] = {}

    def run(batch: list[Vector]) -> None:
        batch = [v for v in dict.fromkeys(batch) if v not in scored]
        if not batch:
            return
        values = score(batch)
        for vector, value in zip(batch, values, strict=True):
            scored[vector] = value
            out.order.append(vector)
            out.scores.append(value)

    if method == "grid":
        run(list(itertools.product(*(axis.values for axis in axes))))
        out.stopped = "grid complete"
    else:
        current: Vector = tuple(axis.start for axis in axes)
        run([current])
        out.stopped = "converged"
        while True:
            out.rounds += 1
            moved = False
            for i, axis in enumerate(axes):
                if len(axis.values) < 2:
                    continue
                # nearest grid neighbours first (the smaller of two), so a budget that ends mid-axis has tried the
                # neighbourhood; counted in grid steps, so no float rounding decides the order
                at = axis.values.index(current[i])
                near = sorted(axis.values, key=lambda v, at=at: (abs(axis.values.index(v) - at), v))
                line = [current[:i] + (v,) + current[i + 1 :] for v in near]
                todo = [v for v in line if v not in scored]
                room = budget - len(scored)
                run(todo[:room])
                tried = [v for v in line if v in scored]
                best = max(tried, key=lambda v: (scored[v], -_distance(axes, v), -out.order.index(v)))
                if scored[best] > scored[current]:
                    current, moved = best, True
                if len(todo) > room:  # a vector it needed was not scored: the budget, not the scores, ended it
                    out.stopped = "budget"
                    break
            if out.stopped == "budget" or not moved:
                break
    out.best = max(range(len(out.order)), key=lambda j: (out.scores[j], -_distance(axes, out.order[j]), -j))
    return out
