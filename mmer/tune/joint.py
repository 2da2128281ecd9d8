"""Joint tuning for expansion mode: the λ vector (with K and α) chosen as a whole by a score of mixed prompts.

In expansion mode every text token runs on θ_base + m̄∘τ*, m̄ the mean of all the modalities' masks (MMER
(arXiv 2505.17110) §3.2, Eq. 7; docs/method.md §4), so one λᵢ changes every other modality's prompts through
their text tokens: the per-modality search (:func:`mmer.tune.run_tune`), which holds the others at the
recipe's values, can miss the vector a mixed-prompt score prefers. Here each candidate is a whole vector,
rebuilt as the decoupled checkpoint ``mmer merge`` writes for it and served by the per-token router
(:class:`mmer.route.Router`, ``expansion()``), and scored by the caller's function on the caller's validation
data; which vectors are scored, and in what order, is :mod:`mmer.tune.joint_search`'s.

A candidate is merged only when the score asks for its checkpoint, router or expansion model (a score that is a
pure function of the values costs nothing), in whichever worker scores it, into a scratch directory removed
once it is scored; the base is stored by reference, so a candidate writes τ*, the masks and the components.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmer.config import Recipe
from mmer.errors import ConfigError
from mmer.merge.methods import METHODS
from mmer.plan import build_plan, resolve_variant
from mmer.progress import NULL_PROGRESS, ProgressSink
from mmer.tune.backends import run_candidates
from mmer.tune.joint_report import JointReport, JointResult, joint_flat_axes
from mmer.tune.joint_search import DEFAULT_BUDGET, Axis, Vector, joint_search, snap
from mmer.tune.requests import check_request, checked_validation, recipe_grids
from mmer.tune.scores import BUILTIN_SCORES, make_scorer

if TYPE_CHECKING:
    from mmer.route.expansion import ExpansionModel
    from mmer.route.router import Router

CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class JointCandidate:
    """One whole vector (every modality's λ, K and α): what a joint score function receives.

    Attributes:
        values: λ by modality, every modality of the merge (those not tuned keep the recipe's; ``None`` for
            all when the mask rule has no λ, e.g. a baseline's ``none``, whose K and α alone are searched).
        k: the candidate K of the trim.
        alpha: the candidate α scaling τ*.
        validation: the file or directory the caller named as validation data (``--validation``), untouched:
            the score reads it; ``None`` when none was named.
        order: the candidate's place in the search order (0 first).
        recipe: the merge this candidate is (internal: the tuned recipe with these values).
        scratch: where its checkpoint is written when asked for (internal).
    """

    values: tuple[tuple[str, float | None], ...]
    k: float
    alpha: float
    validation: str | None
    order: int
    recipe: Recipe
    scratch: str

    @property
    def lambdas(self) -> dict[str, float | None]:
        """λ by modality."""
        return dict(self.values)

    @property
    def source_dirs(self) -> dict[str, Path]:
        """Each fine-tuned model's directory (its processor, tokenizer and config files), by modality; a Hub id is
        its local snapshot."""
        from mmer.io.resolve import resolve_model

        return {m.modality: resolve_model(m.model, m.revision).path for m in self.recipe.models}  # type: ignore[misc]

    @property
    def directory(self) -> Path:
        return Path(self.scratch) / CHECKPOINT_DIR

    def checkpoint(self) -> Path:
        """The decoupled checkpoint ``mmer merge`` writes for this candidate's recipe (merged on first call)."""
        from mmer.checkpoint.manifest import MANIFEST_NAME
        from mmer.pipeline import run_merge

        if not (self.directory / MANIFEST_NAME).is_file():
            Path(self.scratch).mkdir(parents=True, exist_ok=True)
            run_merge(self.recipe, self.directory, overwrite=True)
        return self.directory

    def router(self, device: str | None = None, **kwargs: Any) -> Router:
        """A :class:`mmer.route.Router` over this candidate's checkpoint (``kwargs`` as ``from_pretrained``'s);
        close it when done. A merge without masks (mask ``none``) has no router: its :meth:`checkpoint` is one
        plain Hugging Face model, for ``from_pretrained``."""
        from mmer.route.router import Router

        return Router.from_pretrained(self.checkpoint(), device, **kwargs)

    def expansion(
        self,
        device: str | None = None,
        *,
        cache_modality_weights: bool = True,
        route_norms: bool = True,
        **kwargs: Any,
    ) -> ExpansionModel:
        """The per-token router of this candidate (``router(...).expansion()``): mixed prompts, text tokens on
        θ_base + m̄∘τ*; close it with ``.router.close()``."""
        return self.router(device, **kwargs).expansion(
            cache_modality_weights=cache_modality_weights, route_norms=route_norms
        )

    def release(self) -> None:
        """Remove the candidate's checkpoint once it is scored (called by the backend, not by the score)."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    def fields(self) -> dict[str, Any]:
        return {"order": self.order, "k": self.k, "alpha": self.alpha, "lambda": self.lambdas}

    def __repr__(self) -> str:
        lams = "".join(f"{m}={v:g}, " for m, v in self.values if v is not None)
        return f"JointCandidate(#{self.order}: {'λ ' if lams else ''}{lams}K={self.k:g}, α={self.alpha:g})"


def run_joint_tune(
    recipe: Recipe | None = None,
    *,
    checkpoint: str | Path | None = None,
    sources: Mapping[str, str | Path] | None = None,
    score: str | Callable[[JointCandidate], Any],
    lambdas: Sequence[float] | None = None,
    ks: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    modalities: Sequence[str] | None = None,
    search: str = "auto",
    budget: int = DEFAULT_BUDGET,
    validation: str | Path | None = None,
    jobs: int = 1,
    backend: str = "auto",
    ray_address: str | None = None,
    workdir: str | Path | None = None,
    device: str | None = None,
    check_sources: bool = True,
    progress: ProgressSink | None = None,
) -> JointReport:
    """Choose every tuned modality's λ together (and K over ``ks``, α over ``alphas``) maximising ``score``.

    Args:
        recipe, checkpoint, sources, lambdas, ks, alphas, modalities, jobs, backend, ray_address, workdir,
            device, check_sources, progress: as for :func:`mmer.tune.run_tune`.
        score: ``module:function``, ``path/file.py:function`` or a callable taking a :class:`JointCandidate`
            and returning a number (or a mapping with ``score``); higher is better. It should run mixed
            prompts of the validation split through ``candidate.expansion()``. The built-in proxies score one
            modality's model alone and are refused here.
        search: ``grid`` (the whole product of the grids), ``coordinate`` (coordinate ascent from the recipe's
            values), or ``auto``: the grid while it fits ``budget``.
        budget: the most candidates scored (each is a merge when the score asks for its model).
        validation: the caller's validation data, handed to the score as ``candidate.validation``; it must
            exist (tune never reads it).

    A merge whose mask rule has no λ (a baseline's ``none``, EMR) is searched over K and α alone, by the same
    rule on the same validation data: every method's hyper-parameters chosen the same way.
    """
    started = time.perf_counter()
    progress = progress or NULL_PROGRESS
    if not callable(score) and score in BUILTIN_SCORES:
        raise ConfigError(
            f"score {score} measures one modality's model alone: it cannot score a λ vector in expansion mode",
            key="score",
            hint="give your own score (--score my_eval.py:score) that runs mixed prompts through "
            "candidate.expansion(), or tune without --joint",
        )
    lambda_grid_given = lambdas is not None
    lambdas, backend = check_request(lambdas, jobs, backend)
    scorer = make_scorer(score)
    validation = checked_validation(validation, scorer.name)
    grids = recipe_grids(recipe, checkpoint, sources, device, check_sources, ks, alphas, modalities, False)
    mask = grids.read_recipe.options.mask
    if not grids.tuned and lambda_grid_given:
        raise ConfigError(
            f"mask rule {mask!r} has no λ: the λ grid has no effect",
            key="lambdas",
            hint="leave out --lambdas; K (--ks) and α (--alphas) are what this merge can tune",
        )
    if not grids.tuned and len(grids.ks) == 1 and len(grids.alphas) == 1:
        raise ConfigError(
            f"nothing to search: mask rule {mask!r} has no λ and one K and one α were given",
            key="ks",
            hint="give a grid: --ks 0.6,0.8,1.0 and/or --alphas 0.8,1.0,1.2",
        )
    read = replace(grids.read_recipe, options=replace(grids.read_recipe.options, hash_inputs=False))
    with build_plan(read) as plan:  # every model opened and checked against the base before any score runs
        plan_warnings = list(plan.warnings)
    variant = resolve_variant(read)
    names = [m.modality for m in read.models]
    now = dict(zip(names, variant.lambdas, strict=True))  # None for every model when the rule has no λ
    axes = [
        Axis("K", tuple(grids.ks), snap(grids.ks, read.options.k)),
        Axis("α", tuple(grids.alphas), snap(grids.alphas, grids.alpha_now)),
        *(Axis(m, tuple(lambdas), snap(lambdas, now[m])) for m in grids.tuned),  # type: ignore[arg-type]
    ]
    if backend == "auto":
        backend = "serial" if jobs == 1 else "process"
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="mmer-tune-joint-", dir=None if workdir is None else str(workdir)))
    rows: list[dict[str, Any]] = []

    def candidate(vector: Vector, order: int) -> JointCandidate:
        k, alpha, *tuned = vector
        values = {**now, **dict(zip(grids.tuned, tuned, strict=True))}
        models = tuple(replace(m, lambda_=values[m.modality]) if m.modality in grids.tuned else m for m in read.models)
        method = METHODS[read.options.method]
        options = replace(read.options, k=k, base_storage="reference")
        if "alpha" in method.accepts:
            options = replace(options, alpha=alpha)
        return JointCandidate(
            tuple((m, values[m]) for m in names),  # type: ignore[misc]
            k,
            alpha,
            None if validation is None else str(validation),
            order,
            replace(read, models=models, options=options),
            str(scratch / f"candidate_{order:04d}"),
        )

    def score_batch(batch: list[Vector]) -> list[float]:
        candidates = [candidate(v, len(rows) + i) for i, v in enumerate(batch)]
        results = run_candidates(candidates, scorer, backend, jobs, ray_address, progress)  # type: ignore[arg-type]
        rows.extend(results)
        return [r["score"] for r in results]

    try:
        searched = joint_search(axes, score_batch, search, budget)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = [
        JointResult(
            r["order"], r["k"], r["alpha"], r["lambda"], r["score"], r.get("details", {}), r.get("seconds", 0.0)
        )
        for r in rows
    ]
    best = results[searched.best]
    report = JointReport(
        score=scorer.name,
        description=f"{scorer.name} (the caller's score "
        + ("of mixed prompts through the per-token router)" if grids.tuned else "of each merged model)"),
        modalities=list(grids.tuned),
        lambdas=list(lambdas),
        ks=list(grids.ks),
        alphas=list(grids.alphas),
        method=searched.method,
        budget=budget,
        rounds=searched.rounds,
        stopped=searched.stopped,
        results=results,
        best=best,
        current_k=read.options.k,
        current_alpha=grids.alpha_now,
        current_lambdas={m: now[m] for m in grids.tuned},
        start={axis.name: axis.start for axis in axes},
        validation=None if validation is None else str(validation),
        recipe=grids.spec_recipe,
        backend=backend,
        jobs=jobs,
    )
    scores = dict(zip(searched.order, searched.scores, strict=True))
    report.warnings = [*plan_warnings, *joint_flat_axes(axes, scores)]
    if searched.stopped == "budget":
        report.warnings.append(
            f"--budget: the search stopped after {budget} candidates before it converged, so the chosen vector is "
            "the best scored, not a coordinate-wise optimum; raise --budget to let it finish"
        )
    report.seconds = time.perf_counter() - started
    return report
