"""A mergekit config, read as the mmer recipe that computes the same merge (or refused key by key).

mergekit users arrive with a YAML of ``merge_method``, ``base_model``, ``models`` (each with ``parameters:
{weight, density}``) and top-level ``parameters`` defaults. The methods mmer has map onto its own options, read
off mergekit's ``merge_methods/generalized_task_arithmetic.py`` and ``sparsify.py``:

- ``ties``: each τᵢ trimmed per tensor to its ``max(1, ⌊density·numel⌋)`` largest magnitudes, multiplied by its
  weight, γ elected on the weighted sum with a zero sum counted as +, the agreeing weighted τᵢ summed and divided
  by the agreeing weights when ``normalize`` (its default), times ``lambda``. In mmer: ``method: ties, k: density,
  trim_scope: per-tensor, trim_count: exact, elect_on: weighted, zero_sign: positive, aggregate: mean`` (``sum``
  without ``normalize``), ``alpha: lambda``, and the weights on the model specs (TIES-Merging, arXiv 2306.01708 §3).
  Models of different densities each keep their own fraction: ``k: density`` moves onto each model spec.
- ``dare_ties``: the same with DARE's random drop (p = 1 − density, on each model spec when the densities differ)
  in place of the trim, ``normalize`` off by default (DARE, arXiv 2311.03099 §3).
- ``task_arithmetic`` / ``dare_linear``: α · Σ wᵢτᵢ (``task_arithmetic`` in mmer), or divided by Σ wᵢ when
  ``normalize`` (mmer's ``average``); ``dare_linear`` drops first (task arithmetic, arXiv 2212.04089 §2).
- ``linear``: Σ wᵢθᵢ / Σ wᵢ over the listed models, the base among them when listed with a weight; that is
  θ_base + Σ wᵢτᵢ / W with W the total weight, mmer's ``task_arithmetic`` with α = 1/W (model soups, arXiv
  2203.05482).

What mmer computes differently is said, not hidden: DARE's drops are mmer's own seeded draws, rescaled by
1/(1 − p) as in the DARE paper where mergekit rescales each tensor to its L1 norm, so a DARE merge matches
mergekit's in expectation, not draw for draw; mmer merges in float32 whatever ``dtype`` says. Anything else
(layer ``slices``, per-layer gradients, a tokenizer other than the base's, another method) is refused by name
with what to do instead: a merge mmer cannot honour is never run as a different one.

This module turns parsed YAML into an mmer recipe mapping; ``mmer.config`` checks it like any recipe, names the
modalities and resolves paths, so the one set of rules applies to both forms.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mmer.errors import ConfigError

SUPPORTED_METHODS = ("ties", "dare_ties", "task_arithmetic", "dare_linear", "linear")
# mergekit's other methods, named so that the refusal says what the method is rather than "unknown".
OTHER_MERGEKIT_METHODS = (
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "passthrough",
    "arcee_fusion",
    "nearswap",
    "ram",
    "task_adapter",
)
_RUN_WITH_MERGEKIT = "run this config with mergekit, or use one of mmer's methods: " + ", ".join(SUPPORTED_METHODS)

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
# Keys mergekit knows that mmer refuses, each with why and the fix.
REFUSED_TOP_LEVEL = {
    "slices": (
        "layer `slices` build a model from ranges of layers (a frankenmerge); mmer merges whole models fine-tuned "
        "from one base",
        "list the models under `models:` instead, or run this config with mergekit",
    ),
    "modules": (
        "per-module `modules` merge parts of a model with different recipes; mmer merges every LLM tensor alike",
        "list the models under a top-level `models:`, or run this config with mergekit",
    ),
    "tokenizer": (
        "`tokenizer` builds a new vocabulary; mmer keeps the base's tokenizer files",
        "remove `tokenizer:` (the output has the base's tokenizer), or run this config with mergekit",
    ),
    "chat_template": (
        "`chat_template` sets a template mmer does not write; the output keeps the base's tokenizer files",
        "remove `chat_template:` and edit tokenizer_config.json of the output if you need another template",
    ),
}
MODEL_KEYS = ("model", "parameters")

# mergekit's parameters per method: shared ones apply to the whole merge, per-model ones to each fine-tune.
SHARED_PARAMETERS = ("normalize", "lambda", "int8_mask", "rescale")
PER_MODEL_PARAMETERS = ("weight", "density")


@dataclass(frozen=True)
class _Method:
    """What one mergekit method does, from its registration in mergekit."""

    consensus: bool  # TIES sign election ("sum")
    sparsify: str | None  # "magnitude" (trim), "random" (DARE) or None
    normalize: bool  # default of `normalize`
    rescale: bool  # default of `rescale`
    parameters: tuple[str, ...]


_GTA = ("normalize", "lambda", "int8_mask", "rescale", "weight")
_METHODS = {
    "ties": _Method(True, "magnitude", True, False, (*_GTA, "density")),
    "dare_ties": _Method(True, "random", False, True, (*_GTA, "density")),
    "task_arithmetic": _Method(False, None, False, False, _GTA),
    "dare_linear": _Method(False, "random", False, True, (*_GTA, "density")),
    "linear": _Method(False, None, True, False, ("normalize", "weight")),
}
# Parameters mergekit accepts for a method and then never reads: refused, as mmer refuses any setting that
# changes nothing (a `density:` on task_arithmetic reads as a trim that does not happen).
_IGNORED_BY_MERGEKIT = {"task_arithmetic": ("density",)}
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


@dataclass(frozen=True)
class Translation:
    """A mergekit config as an mmer recipe mapping, with what the reader should know about the translation.

    Attributes:
        recipe: ``{"base": {...}, "models": [...], "options": {...}}`` in mmer's recipe keys; model entries
            have no ``modality`` yet (``mmer.config`` names them after the models).
        notes: where mmer's result can differ from mergekit's, one sentence each.
        output_dtype: the dtype the config asks the merged model to be stored in (``out_dtype``, else
            ``dtype``): mmer writes the base's dtype, so the two must agree (checked once the base is opened).
    """

    recipe: dict[str, Any]
    notes: tuple[str, ...] = ()
    output_dtype: str | None = None


def is_mergekit_config(data: object) -> bool:
    """A mergekit config by its shape: ``merge_method`` with ``models`` (or mergekit's ``slices``/``modules``)."""
    return isinstance(data, Mapping) and "merge_method" in data


def translate(data: Mapping[str, Any], file: str) -> Translation:
    """The mmer recipe that computes ``data``'s merge; a :class:`ConfigError` naming the key for anything else."""
    for key in data:
        if key in REFUSED_TOP_LEVEL:
            why, fix = REFUSED_TOP_LEVEL[key]
            raise ConfigError(f"{file}: mergekit key {key!r} is not supported: {why}", file=file, key=key, hint=fix)
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"{file}: unknown key {key!r} in a mergekit config", file=file, key=str(key), hint=_closest(key)
            )
    method_name = data["merge_method"]
    method = _method(method_name, file)
    _check_tokenizer(data.get("tokenizer_source"), file)
    if "models" not in data:
        raise ConfigError(
            f"{file}: a mergekit config without `models:`", file=file, key="models", hint="list the models to merge"
        )
    defaults = _parameters(data.get("parameters"), method_name, method, file, where="the top-level parameters")
    base_ref = data.get("base_model")
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise ConfigError(
            f"{file}: `models` must be a non-empty list",
            file=file,
            key="models",
            hint="list the models: `- model: org/name` with `parameters: {weight: 1.0}`",
        )
    entries = [_model_entry(m, method_name, method, file) for m in models]
    if base_ref is None:
        raise ConfigError(
            f"{file}: merge_method {method_name} without `base_model`",
            file=file,
            key="base_model",
            hint="add `base_model: <the model the others were fine-tuned from>`: mmer merges task vectors "
            "(each model minus that base)"
            + (
                "; a normalized linear merge gives the same weights whichever base is named"
                if method_name == "linear"
                else ""
            ),
        )
    base_model, base_revision = _reference(base_ref, file, "base_model")
    base_entries = [e for e in entries if (e[0], e[1]) == (base_model, base_revision)]
    finetunes = [e for e in entries if (e[0], e[1]) != (base_model, base_revision)]
    if not finetunes:
        raise ConfigError(
            f"{file}: `models` lists only the base", file=file, key="models", hint="list the fine-tuned models too"
        )
    seen: set[tuple[str, str | None]] = set()
    for model, revision, _ in finetunes:
        if (model, revision) in seen:
            raise ConfigError(
                f"{file}: model {model!r} is listed twice", file=file, key="models", hint="list each model once"
            )
        seen.add((model, revision))
    shared = {k: v for k, v in defaults.items() if k in SHARED_PARAMETERS}
    normalize = bool(shared.get("normalize", method.normalize))
    notes: list[str] = []
    settings = [_model_settings(m, {**defaults, **p}, method, file) for m, _, p in finetunes]
    per_model: list[dict[str, float]] = [{} for _ in finetunes]  # each model's own K or p, where densities differ
    weights = [w for w, _ in settings]
    options: dict[str, Any] = {"mask": "none"}
    if method_name == "linear":
        options.update(_linear(base_entries, defaults, weights, normalize, base_model, file))
    else:
        _check_rescale(shared.get("rescale", method.rescale), method_name, method, file)
        lam = _positive(shared.get("lambda", 1.0), "lambda", file)
        densities = [d for _, d in settings]
        density = densities[0] if len(set(densities)) == 1 else None  # None: each model has its own
        if method.consensus:
            options.update(
                method="ties",
                k=1.0,  # mmer's ties trims to K = 0.8 unless told; mergekit's trims only with a density < 1
                elect_on="weighted",
                zero_sign="positive",
                aggregate="mean" if normalize else "sum",
                alpha=lam,
            )
        else:
            options.update(method="average" if normalize else "task_arithmetic", alpha=lam)
        sparse = min(densities) < 1.0
        if method.sparsify == "magnitude" and sparse:
            options.update(trim_scope="per-tensor", trim_count="exact")
            if density is not None:
                options["k"] = density
            else:  # each model's own K, next to it (mmer's per-model `k`)
                per_model = [{"k": d} for d in densities]
            notes.append(
                "magnitudes tied at a tensor's trim threshold are all kept, where mergekit's argsort keeps an "
                "arbitrary subset of them"
            )
        if method.sparsify == "random" and sparse:
            if density is not None:
                options["dare"] = 1.0 - density
            else:  # each model's own p = 1 − its density (mmer's per-model `dare`)
                per_model = [{"dare": 1.0 - d} for d in densities]
            notes.append(
                "DARE's random drops are mmer's own seeded draws (dare_seed), and kept entries are scaled by "
                "1/density as in the DARE paper where mergekit rescales each tensor to its L1 norm: the merge "
                "matches mergekit's in expectation, not draw for draw"
            )
    output_dtype = _dtype(data, file)
    if output_dtype is not None and output_dtype != "float32":
        notes.append(f"mmer merges in float32 and rounds once to {output_dtype}; mergekit computes in {output_dtype}")
    recipe = {
        "base": _spec(base_model, base_revision),
        "models": [
            {**_spec(m, r), "weight": w, **own}
            for (m, r, _), (w, _), own in zip(finetunes, settings, per_model, strict=True)
        ],
        "options": options,
    }
    return Translation(recipe, tuple(notes), output_dtype)


def check_plan(recipe: Any, plan: Any) -> None:
    """Before any weight is read: a translated config's ``dtype`` must be how the opened base stores its LLM.

    ``recipe`` is an ``mmer.config.Recipe`` and ``plan`` an ``mmer.plan.MergePlan`` (this module sits below
    both, so it reads them by attribute); recipes not translated from mergekit pass.
    """
    source = getattr(recipe, "source", None)
    if source is None or source.kind != "mergekit":
        return
    dtypes = {str(i.dtype).removeprefix("torch.") for i in plan.base.llm.values() if i.dtype.is_floating_point}
    check_output_dtype(source.output_dtype, dtypes, source.file)


def check_output_dtype(translation_dtype: str | None, base_dtypes: set[str], file: str | None) -> None:
    """Refuse a ``dtype``/``out_dtype`` other than the base's: mmer stores the merged model as the base is stored.

    ``base_dtypes`` are the base LLM's floating-point tensor dtypes by name (``float32``, ``bfloat16``...).
    """
    if translation_dtype is None or not base_dtypes or base_dtypes == {translation_dtype}:
        return
    stored = "/".join(sorted(base_dtypes))
    raise ConfigError(
        f"{file}: dtype {translation_dtype} asked for, but the base stores its weights as {stored}: mmer writes the "
        f"merged model in the base's dtype",
        file=file,
        key="dtype",
        hint=f"remove `dtype`/`out_dtype` (the output is {stored}), or convert the base to {translation_dtype} first",
    )


# ------------------------------------------------------------------------------------------------- the parts


def _closest(key: object) -> str:
    known = (*TOP_LEVEL_KEYS, *REFUSED_TOP_LEVEL)
    match = difflib.get_close_matches(str(key), known, n=1)
    return f"did you mean {match[0]!r}?" if match else f"a mergekit config for mmer takes {', '.join(TOP_LEVEL_KEYS)}"


def _method(name: object, file: str) -> _Method:
    if not isinstance(name, str):
        raise ConfigError(
            f"{file}: merge_method must be a name", file=file, key="merge_method", hint=_RUN_WITH_MERGEKIT
        )
    if name in _METHODS:
        return _METHODS[name]  # type: ignore[index]
    if name in OTHER_MERGEKIT_METHODS:
        raise ConfigError(
            f"{file}: merge_method {name} is a mergekit method mmer does not have",
            file=file,
            key="merge_method",
            hint=_RUN_WITH_MERGEKIT,
        )
    match = difflib.get_close_matches(str(name), SUPPORTED_METHODS, n=1)
    raise ConfigError(
        f"{file}: unknown merge_method {name!r}",
        file=file,
        key="merge_method",
        hint=f"did you mean {match[0]!r}?" if match else _RUN_WITH_MERGEKIT,
    )


def _check_tokenizer(source: object, file: str) -> None:
    """``tokenizer_source: base`` is what mmer does anyway (the output keeps the base's tokenizer files)."""
    if source is None or source == "base":
        return
    raise ConfigError(
        f"{file}: tokenizer_source {source!r} is not supported: mmer keeps the base's tokenizer and merges the rows "
        "of the base's vocabulary",
        file=file,
        key="tokenizer_source",
        hint="remove `tokenizer_source` (or write `tokenizer_source: base`), or run this config with mergekit",
    )


def _reference(value: object, file: str, key: str) -> tuple[str, str | None]:
    """mergekit's model reference ``path[@revision]``; a ``+lora`` suffix or a mapping is refused."""
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"{file}: {key} must be a model path or Hub id, got {type(value).__name__}",
            file=file,
            key=key,
            hint="write it as a string: org/name, org/name@revision or a directory",
        )
    if "+" in value:
        raise ConfigError(
            f"{file}: {key} {value!r} applies a LoRA (`+`), which mmer does not",
            file=file,
            key=key,
            hint="merge the LoRA into its model first (peft's merge_and_unload), then name that model",
        )
    model, at, revision = value.partition("@")
    if at and (not model or not revision or "@" in revision):
        raise ConfigError(
            f"{file}: {key} {value!r} is not path@revision", file=file, key=key, hint="write org/name@revision"
        )
    return model, revision or None


def _spec(model: str, revision: str | None) -> dict[str, Any]:
    return {"model": model, **({"revision": revision} if revision else {})}


def _model_entry(entry: object, method_name: str, method: _Method, file: str) -> tuple[str, str | None, dict]:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise ConfigError(
            f"{file}: each entry of `models` is a mapping with `model:`",
            file=file,
            key="models",
            hint="write `- model: org/name` with optional `parameters: {weight: 1.0, density: 0.5}`",
        )
    for key in entry:
        if key not in MODEL_KEYS:
            raise ConfigError(
                f"{file}: unknown key {key!r} in the entry of {entry['model']!r}",
                file=file,
                key=str(key),
                hint=f"a model entry takes {', '.join(MODEL_KEYS)}",
            )
    model, revision = _reference(entry["model"], file, "model")
    parameters = _parameters(entry.get("parameters"), method_name, method, file, where=f"the parameters of {model}")
    for key in parameters:
        if key in SHARED_PARAMETERS:
            raise ConfigError(
                f"{file}: {key} is set on {model}, but it is one setting for the whole merge",
                file=file,
                key=key,
                hint=f"move `{key}` to the top-level `parameters:`",
            )
    return model, revision, parameters


def _parameters(value: object, method_name: str, method: _Method, file: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{file}: {where} must be a mapping", file=file, key="parameters", hint="write `parameters: {weight: 1.0}`"
        )
    for key, setting in value.items():
        if key not in method.parameters:
            raise ConfigError(
                f"{file}: parameter {key!r} in {where} is not one merge_method {method_name} reads",
                file=file,
                key=str(key),
                hint=f"remove it (mergekit ignores it for {method_name} too)"
                if key in _IGNORED_BY_MERGEKIT.get(method_name, ())
                else f"{method_name} takes {', '.join(method.parameters)}",
            )
        if isinstance(setting, (list, Mapping)):
            raise ConfigError(
                f"{file}: parameter {key!r} in {where} varies by layer or tensor (a gradient list or a filter): "
                "mmer uses one value for every tensor",
                file=file,
                key=str(key),
                hint=f"give {key} one number, or run this config with mergekit",
            )
        boolean = key in ("normalize", "int8_mask", "rescale")
        if boolean != isinstance(setting, bool) or not isinstance(setting, (bool, int, float)):
            raise ConfigError(
                f"{file}: parameter {key!r} in {where} must be {'true or false' if boolean else 'a number'}, "
                f"got {setting!r}",
                file=file,
                key=str(key),
                hint=f"write e.g. `{key}: {'true' if boolean else '0.5'}`",
            )
    return dict(value)


def _positive(value: float, key: str, file: str, model: str | None = None) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        whose = f" of {model}" if model else ""
        raise ConfigError(
            f"{file}: {key}{whose} = {value:g}: mmer takes only {key} > 0",
            file=file,
            key=key,
            hint="a negative or zero weight (task negation, dropping a model) has no mmer equivalent: remove the "
            "model or give it a positive weight"
            if key == "weight"
            else f"give {key} a positive number",
        )
    return value


def _model_settings(model: str, parameters: Mapping[str, Any], method: _Method, file: str) -> tuple[float, float]:
    """(weight, density) of one fine-tune, its own parameters over the top-level defaults."""
    if "weight" not in parameters:
        raise ConfigError(
            f"{file}: model {model} has no weight (mergekit requires one for this method)",
            file=file,
            key="weight",
            hint="add `parameters: {weight: 1.0}` to the model, or `weight:` under the top-level parameters",
        )
    weight = _positive(parameters["weight"], "weight", file, model)
    density = float(parameters.get("density", 1.0))
    if method.sparsify is not None and not (0.0 < density <= 1.0):
        raise ConfigError(
            f"{file}: density of {model} = {density:g} is out of range",
            file=file,
            key="density",
            hint="density is the fraction of each task vector kept, in (0, 1]",
        )
    return weight, density


def _check_rescale(rescale: bool, method_name: str, method: _Method, file: str) -> None:
    if method.sparsify == "random" and not rescale:
        raise ConfigError(
            f"{file}: rescale: false with {method_name}: mmer's DARE always rescales the kept entries by 1/density",
            file=file,
            key="rescale",
            hint="remove `rescale` (DARE as its paper defines it rescales), or run this config with mergekit",
        )
    if method.sparsify != "random" and rescale:
        raise ConfigError(
            f"{file}: rescale: true with {method_name}: mmer does not rescale trimmed task vectors to their norm",
            file=file,
            key="rescale",
            hint="remove `rescale`, or run this config with mergekit",
        )


def _linear(
    base_entries: list[tuple[str, str | None, dict]],
    defaults: Mapping[str, Any],
    weights: list[float],
    normalize: bool,
    base_model: str,
    file: str,
) -> dict[str, Any]:
    """Σ wᵢθᵢ / W over the listed models = θ_base + Σ wᵢτᵢ / W, W counting the base's weight when listed."""
    base_weight = 0.0
    if base_entries:
        parameters = {**defaults, **base_entries[0][2]}
        if "weight" not in parameters:
            raise ConfigError(
                f"{file}: the base {base_model} is listed in `models` without a weight (linear needs one)",
                file=file,
                key="weight",
                hint="give the base a weight, or leave it out of `models` (it then weighs 0)",
            )
        base_weight = _positive(parameters["weight"], "weight", file, base_model)
    total = base_weight + sum(weights)
    if normalize and not base_entries:
        return {"method": "average", "alpha": 1.0}  # Σ wᵢτᵢ / Σ wᵢ: NaiveMC with weights
    if normalize:
        return {"method": "task_arithmetic", "alpha": 1.0 / total}
    if not math.isclose(total, 1.0, rel_tol=1e-9, abs_tol=0.0):
        raise ConfigError(
            f"{file}: linear with normalize: false and weights summing to {total:g}: the result scales the base by "
            f"{total:g}, which no merge of task vectors gives",
            file=file,
            key="normalize",
            hint="remove `normalize: false`, or make the weights (the base's included) sum to 1",
        )
    return {"method": "task_arithmetic", "alpha": 1.0}


def _dtype(data: Mapping[str, Any], file: str) -> str | None:
    chosen = None
    for key in ("dtype", "out_dtype"):  # out_dtype, when given, is what the output is stored as
        value = data.get(key)
        if value is None:
            continue
        if value not in _DTYPES:
            raise ConfigError(
                f"{file}: {key} {value!r} is not a dtype mmer knows",
                file=file,
                key=key,
                hint="use float32, bfloat16 or float16",
            )
        chosen = _DTYPES[value]
    return chosen
