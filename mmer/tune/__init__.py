"""Tune λ per modality, and optionally K, against a score (MMER picks λ on a validation set; docs/method.md §7).

The paper chooses α and each λᵢ "by validation-set accuracy" and never describes the validation set. This
module makes the search explicit and cheap:

- **λᵢ alone.** Modality i's rebuilt model θ̂ᵢ = θ_base + mᵢ∘τ* depends on λ only through its own mask mᵢ (Eq.
  3), and τ* does not depend on any λ. So each λᵢ is tuned on its own, |Λ| candidates per modality rather than
  |Λ|ⁿ, and every λ reuses the same τ*: no candidate re-merges. Given a decoupled checkpoint, its τ* itself is
  reused for its own K.
- **K** changes every τᵢ's trim and so τ*: each K of the grid is merged once (in memory, all K together in one
  shared streaming pass, τ* kept in a scratch directory when candidates need it), then its λ candidates reuse
  it. The chosen K maximises the mean over modalities of each modality's best score at that K.

Scores (higher is better):

- ``recon``: −‖θ̂ᵢ − θᵢ‖₁ / ‖τᵢ‖₁, the relative ℓ1 reconstruction error of ``mmer compare``, training-free, for
  every candidate in the same streaming pass that computes τ* (no per-candidate work at all). Note that Eq. 3 at
  λ = 1 is the ℓ1-optimal mask per entry (Eq. 2), so this proxy mostly confirms λ ≈ 1; it is informative
  for K, and as a sanity check.
- ``logits``: −KL(p_θᵢ ‖ p_θ̂ᵢ), the mean next-token KL divergence of the rebuilt LLM from the original one on
  probe inputs the caller gives (token ids or text), plus top-1 agreement in the details. The LLM alone is run
  (a causal LM built from the base's config), so probes are text.
- ``module:function`` (or ``path/to/file.py:function``, or a Python callable): the caller's own score,
  e.g. accuracy on a held-out split. It is called with one :class:`Candidate` and returns a number, or a
  mapping with a ``score`` number and any other values to keep as details. A candidate gives the rebuilt
  model three ways: :meth:`Candidate.state_dict` (LLM tensors by canonical name), :meth:`Candidate.causal_lm`
  (a transformers causal LM of the LLM), :meth:`Candidate.save_pretrained` (the whole multimodal model in its
  source's layout, components and processor files included, for any evaluation harness's ``from_pretrained``).

**Jointly** (:func:`run_joint_tune`, ``mmer tune --joint``): in expansion mode the text tokens run on the mean
mask m̄, which couples every λᵢ, so the λ vector (with K and α) is searched as a whole, each candidate a merge
served by the per-token router and scored by the caller's function of mixed prompts on the caller's validation
data: the grid's product while it fits a budget, else coordinate ascent (:mod:`mmer.tune.joint`).

Per-candidate scores (``logits`` and callables) run in parallel: ``jobs`` workers as processes (the default for
jobs > 1; each sets torch to its share of the cores), threads, or Ray tasks (``backend="ray"``: the local
machine by default, a cluster with ``ray_address``; every worker must see the same paths). ``recon`` needs no
workers: its cost is the reads, shared by every candidate.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmer.config import Recipe
from mmer.errors import ConfigError
from mmer.plan import build_plan
from mmer.progress import NULL_PROGRESS, ProgressSink
from mmer.tune.backends import BACKENDS, run_candidates
from mmer.tune.candidates import Candidate, CandidateInputs
from mmer.tune.errors import TuneError
from mmer.tune.joint import JointCandidate, run_joint_tune
from mmer.tune.joint_report import JointReport, JointResult
from mmer.tune.joint_search import DEFAULT_BUDGET, SEARCHES
from mmer.tune.probes import load_probes
from mmer.tune.report import (
    TUNE_REPORT_FORMAT,
    TUNED_RECIPE_SIGNATURE,
    TuneReport,
    TuneResult,
    check_outputs,
    tune_report_written_by_mmer,
    write_outputs,
    write_plot,
)
from mmer.tune.requests import check_request, checked_validation, recipe_grids
from mmer.tune.scores import (
    BUILTIN_SCORES,
    Scorer,
    evaluate,
    load_callable,
    logit_agreement,
    make_scorer,
    write_references,
)
from mmer.tune.search import DEFAULT_KS, DEFAULT_LAMBDAS, choose, flat_axes
from mmer.tune.sweep import sweep

__all__ = [
    "BACKENDS",
    "BUILTIN_SCORES",
    "DEFAULT_BUDGET",
    "DEFAULT_KS",
    "DEFAULT_LAMBDAS",
    "TUNED_RECIPE_SIGNATURE",
    "TUNE_REPORT_FORMAT",
    "Candidate",
    "CandidateInputs",
    "JointCandidate",
    "JointReport",
    "JointResult",
    "SEARCHES",
    "Scorer",
    "TuneError",
    "TuneReport",
    "TuneResult",
    "check_outputs",
    "evaluate",
    "load_callable",
    "load_probes",
    "logit_agreement",
    "run_joint_tune",
    "run_tune",
    "tune_report_written_by_mmer",
    "write_outputs",
    "write_plot",
]


def run_tune(
    recipe: Recipe | None = None,
    *,
    checkpoint: str | Path | None = None,
    sources: Mapping[str, str | Path] | None = None,
    score: str | Callable[[Candidate], Any] = "recon",
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    ks: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    modalities: Sequence[str] | None = None,
    probes: str | Path | Mapping[str, str | Path] | None = None,
    validation: str | Path | None = None,
    jobs: int = 1,
    backend: str = "auto",
    ray_address: str | None = None,
    workdir: str | Path | None = None,
    device: str | None = None,
    check_sources: bool = True,
    progress: ProgressSink | None = None,
) -> TuneReport:
    """Search λ for each modality (and K over ``ks``, α over ``alphas``) maximising ``score``; see the module
    docstring.

    Args:
        recipe: the merge to tune (base, models, options), as for ``mmer merge``. Or, instead:
        checkpoint: a decoupled checkpoint: its recipe (options and original models, which tune needs: τᵢ is
            not stored) is tuned and its τ* reused for its own K.
        sources: with ``checkpoint``, where an original model is now, by modality, if not where recorded.
        score: ``recon``, ``logits``, ``module:function``, ``path/file.py:function`` or a callable taking a
            :class:`Candidate` and returning a number (or a mapping with ``score``); higher is better.
        lambdas: the λ grid, tried for every tuned modality.
        ks: the K grid (default: only the recipe's K, i.e. no K search).
        alphas: the α grid, the scale on τ* (default: only the recipe's α); every (K, α) pair is one merge.
        modalities: which modalities to tune (default: all); the others keep their λ.
        probes: for ``logits``: one probe file for every modality, or a file per modality.
        validation: for the caller's score: its validation data, handed to it as ``candidate.validation`` (it
            must exist; tune never reads it).
        jobs: workers for per-candidate scores.
        backend: ``auto`` (serial for one job, else processes), ``serial``, ``thread``, ``process`` or ``ray``.
        ray_address: a Ray cluster to use with ``backend="ray"`` (default: start a local one, or use the one
            already initialised in this process).
        workdir: where scratch τ* copies and reference logits go, in a temporary subdirectory removed at the
            end (so a candidate of another K than the checkpoint's can be rebuilt only while it is scored).
        device: where the arithmetic runs (default: the recipe's device).
        check_sources: with ``checkpoint``, check each original against the sha256 its manifest recorded.
        progress: receives the streaming passes and the candidates.
    """
    started = time.perf_counter()
    progress = progress or NULL_PROGRESS
    lambdas, backend = check_request(lambdas, jobs, backend)
    scorer = make_scorer(score)
    if scorer.name == "logits" and probes is None:
        raise ConfigError(
            "score logits needs probe inputs",
            key="probes",
            hint="pass --probes probes.jsonl (one list of token ids or one text per line)",
        )
    validation = checked_validation(validation, scorer.name)
    grids = recipe_grids(recipe, checkpoint, sources, device, check_sources, ks, alphas, modalities)
    read_recipe, spec_recipe, reuse = grids.read_recipe, grids.spec_recipe, grids.reuse
    options = read_recipe.options
    alpha_now, points, tuned = grids.alpha_now, grids.points, grids.tuned
    names = [m.modality for m in read_recipe.models]
    if backend == "auto":
        backend = "serial" if jobs == 1 or not scorer.per_candidate else "process"

    plan = build_plan(read_recipe)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="mmer-tune-", dir=None if workdir is None else str(workdir)))
    try:
        reused = None if reuse is None else (reuse[0], (reuse[1], alpha_now))
        prepared = sweep(plan, points, lambdas, tuned, scorer, reused, scratch, progress)
        current = {m: plan.lambda_for(m) for m in names}
        candidates = (
            [
                Candidate(m, lam, k, a, prepared.inputs[(m, (k, a))], validation)
                for m in tuned
                for k, a in points
                for lam in lambdas
            ]
            if scorer.per_candidate
            else []
        )
        if scorer.name == "logits":
            scorer = replace(scorer, references=write_references(tuned, probes, prepared.inputs, scratch, progress))
        results = (
            prepared.recon
            if not scorer.per_candidate
            else run_candidates(candidates, scorer, backend, jobs, ray_address, progress)
        )
    finally:
        plan.close()
        shutil.rmtree(scratch, ignore_errors=True)
    report = choose(results, scorer, tuned, lambdas, points, (options.k, alpha_now), current, spec_recipe)
    report.tau_star_reused = reused[1] if reused is not None and reused[1] in points else None
    report.backend, report.jobs = backend, jobs
    report.warnings = [*plan.warnings, *prepared.warnings, *flat_axes(report, prepared.untrimmed)]
    report.seconds = time.perf_counter() - started
    return report
