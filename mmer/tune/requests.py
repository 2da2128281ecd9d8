"""What a tune asks for, checked before any weight is read: the grids, the workers, the recipe and which of its
modalities are tuned. One place for both searches (per modality and joint), so they refuse the same requests
with the same words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmer.config import Recipe
from mmer.errors import ConfigError
from mmer.merge.masks import MASKS
from mmer.merge.methods import METHODS
from mmer.tune.backends import BACKENDS
from mmer.tune.candidates import Point
from mmer.tune.errors import refused
from mmer.tune.inputs import tune_inputs
from mmer.tune.scores import BUILTIN_SCORES
from mmer.tune.search import DEFAULT_LAMBDAS, grid


@dataclass(frozen=True)
class Grids:
    read_recipe: Recipe  # the recipe to read the models from
    spec_recipe: Recipe  # the recipe to write back (a checkpoint's models pinned)
    reuse: tuple[str, float] | None  # (τ* directory, its K): a checkpoint's τ* to reuse
    ks: list[float]
    alphas: list[float]
    alpha_now: float  # the recipe's α, its method's default resolved
    tuned: list[str]  # the modalities tuned, in the order asked

    @property
    def points(self) -> list[Point]:
        return [(k, a) for k in self.ks for a in self.alphas]


def check_request(lambdas: Sequence[float] | None, jobs: int, backend: str) -> tuple[list[float], str]:
    """The λ grid, ``jobs`` and ``backend``: what can be refused before anything is opened."""
    lambdas = grid(
        DEFAULT_LAMBDAS if lambdas is None else lambdas,
        "lambdas",
        lambda v: math.isfinite(v) and v >= 0,
        "λ must be a finite number ≥ 0",
    )
    if jobs < 1:
        raise ConfigError(f"jobs = {jobs}", key="jobs", hint="jobs ≥ 1")
    if backend not in BACKENDS:
        raise ConfigError(
            f"backend {backend!r} is not one of {', '.join(BACKENDS)}",
            key="backend",
            hint="serial, thread, process or ray",
        )
    return lambdas, backend


def recipe_grids(
    recipe: Recipe | None,
    checkpoint: str | Path | None,
    sources: Mapping[str, str | Path] | None,
    device: str | None,
    check_sources: bool,
    ks: Sequence[float] | None,
    alphas: Sequence[float] | None,
    modalities: Sequence[str] | None,
    need_lambda: bool = True,
) -> Grids:
    """The recipe tuned (or a checkpoint's, its originals found), and the K, α grids and modalities it allows.

    ``need_lambda=False`` (the joint search, which merges every candidate whole) accepts a mask rule without a
    λ to tune (a baseline's ``none``, EMR's rescaled masks): then no modality is tuned, only K and α."""
    read_recipe, spec_recipe, reuse = tune_inputs(recipe, checkpoint, sources, device, check_sources)
    options = read_recipe.options
    if need_lambda and not has_lambda(options.mask):
        raise ConfigError(
            f"mask rule {options.mask!r} has no λ to tune",
            key="mask",
            hint="tune the mmer (or tall) mask rule; emr is tuning-free and none has no masks (tune their K and α "
            "with --joint)",
        )
    ks = grid(ks if ks is not None else [options.k], "ks", lambda v: 0 < v <= 1, "K is the fraction kept, in (0, 1]")
    if ks != [options.k] and not METHODS[options.method].uses_trim:
        raise ConfigError(
            f"method {options.method} does not trim: K has no effect", key="ks", hint="tune K with method ties"
        )
    own = [m.modality for m in read_recipe.models if m.k is not None]
    if ks != [options.k] and own:
        raise ConfigError(
            f"{', '.join(own)} {'has its' if len(own) == 1 else 'have their'} own K (k: in the model's spec), "
            "which the K grid would not change",
            key="ks",
            hint="search K without per-model k:, or leave out --ks to tune λ and α at the models' own K",
        )
    method = METHODS[options.method]
    alpha_now = options.alpha if options.alpha is not None else method.default_alpha
    alphas = grid(
        alphas if alphas is not None else [alpha_now],
        "alphas",
        lambda v: math.isfinite(v) and v > 0,
        "α scales τ*: a finite number > 0",
    )
    if alphas != [alpha_now] and "alpha" not in method.accepts:
        raise ConfigError(
            f"method {options.method} has no α: the α grid has no effect",
            key="alphas",
            hint=f"tune α with one of {', '.join(sorted(m for m, d in METHODS.items() if 'alpha' in d.accepts))}",
        )
    names = [m.modality for m in read_recipe.models]
    if not has_lambda(options.mask):
        if modalities:
            raise ConfigError(
                f"mask rule {options.mask!r} has no λ: there is no modality's λ to tune",
                key="modality",
                hint="leave out --modality; K (--ks) and α (--alphas) are what this merge can tune",
            )
        return Grids(read_recipe, spec_recipe, reuse, ks, alphas, alpha_now, [])  # type: ignore[arg-type]
    tuned = list(dict.fromkeys(modalities or names))
    for name in tuned:
        if name not in names:
            raise ConfigError(
                f"modality {name!r} is not in the recipe",
                key="modality",
                hint=f"its modalities are: {', '.join(names)}",
            )
    return Grids(read_recipe, spec_recipe, reuse, ks, alphas, alpha_now, tuned)  # type: ignore[arg-type]


def has_lambda(mask: str) -> bool:
    """Whether the mask rule's masks move with a λ (EMR's are tuning-free: its rescaler undoes any λ)."""
    rule = MASKS.get(mask)
    return rule is not None and "lambda" in rule.accepts and not rule.rescaled


def checked_validation(validation: str | Path | None, score: str) -> str | None:
    """The caller's validation data as an absolute path for their score (workers may run elsewhere); tune never
    reads it, so it only has to exist, and only a score of the caller's own can use it."""
    if validation is None:
        return None
    if score in BUILTIN_SCORES:
        raise ConfigError(
            f"--validation is handed to your own score; {score} does not read it",
            key="validation",
            hint="give --score my_eval.py:score, or leave out --validation",
        )
    if not Path(validation).exists():
        raise refused(validation, "no such validation data", key="validation", hint="check the path")
    return str(Path(validation).resolve())
