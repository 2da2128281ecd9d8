"""Plan a merge from headers and configs alone: open every model, split LLM from components, check that the
fine-tuned models share the base, and decide what happens to every tensor, before any weight is read.

Everything that can be wrong with the inputs is found here, so a bad merge fails in a second, not after an
hour; ``--dry-run`` prints this plan with its memory estimate.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mmer.runtime as runtime
from mmer.checkpoint import quant
from mmer.checkpoint.manifest import PrivateRecord, SourceRecord
from mmer.config import ModelSpec, Recipe, check_device_available
from mmer.errors import CheckpointFormatError, ConfigError, IncompatibleBaseError, LayoutError
from mmer.io.hashing import CHUNK_BYTES as HASH_CHUNK_BYTES
from mmer.io.layouts import Layout, canonical_order, detect_layout, is_buffer_name, is_vocab_tensor
from mmer.io.reader import DTYPE_NAMES, CheckpointReader, Sized, TensorInfo, read_json
from mmer.io.resolve import ResolvedModel, resolve_model
from mmer.merge.masks import MASK_OPTIONS, MASKS
from mmer.merge.methods import METHOD_OPTIONS, METHODS, methods_accepting
from mmer.merge.slot import Variant, per_model
from mmer.merge.trim import TENSOR_SAMPLE_ENTRIES, search_bytes, trims_each_tensor_first

# Config fields that fix the LLM's architecture: a mismatch means another base, whatever the shapes say.
STRUCTURAL_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
# Fields that differ between bases of identical shapes (Vicuna v1.1 vs v1.5: rms_norm_eps 1e-6 vs 1e-5).
NUMERIC_KEYS = ("rms_norm_eps", "rope_theta")
# Fields a fine-tune may legitimately change; a difference is reported, not refused.
SOFT_KEYS = ("max_position_embeddings", "tie_word_embeddings")
# Where most multimodal configs keep their LLM's; others nest it elsewhere (``thinker_config.text_config``,
# ``llm_cfg``), so a model's is found by its dimensions (``find_text_config``), these names only break ties.
TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")
CONFIG_SEARCH_DEPTH = 4  # levels below the root searched for the text config; real configs nest two or three


@dataclass
class SourceModel:
    """One opened input: where it is, how it stores its LLM, and which tensors are LLM or component."""

    spec: ModelSpec
    resolved: ResolvedModel
    reader: CheckpointReader
    layout: Layout
    config: dict[str, Any] | None
    llm: dict[str, TensorInfo]  # canonical name → on-disk tensor
    components: list[TensorInfo]

    @property
    def label(self) -> str:
        return self.spec.modality or "base"

    @property
    def path(self) -> Path:
        return self.resolved.path

    def text_config(self, reference: dict[str, Any] | None = None) -> dict[str, Any]:
        """The config of this model's LLM; with ``reference`` (the base's), the one with its dimensions."""
        return find_text_config(self.config or {}, reference)[1]

    def record(self, file_hashes: dict[str, str | None]) -> SourceRecord:
        dtypes = sorted({DTYPE_NAMES.get(i.dtype, str(i.dtype)) for i in self.llm.values()})
        return SourceRecord(
            model=self.resolved.hub_id or str(self.resolved.path),
            revision=self.resolved.revision,
            commit=self.resolved.commit,
            layout=self.layout.name,
            dtype="/".join(dtypes),
            config=(self.config or {}).get("model_type") if self.config else None,
            files=file_hashes,
        )


def _nested_configs(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every object in ``config`` down to ``CONFIG_SEARCH_DEPTH`` levels, root first then breadth first, each
    with its dotted key path."""
    found: list[tuple[str, dict[str, Any]]] = []
    level: list[tuple[str, dict[str, Any]]] = [("", config)]
    for depth in range(CONFIG_SEARCH_DEPTH + 1):
        found.extend(level)
        if depth == CONFIG_SEARCH_DEPTH:
            break
        level = [
            (f"{path}.{key}" if path else str(key), value)
            for path, node in level
            for key, value in node.items()
            if isinstance(value, dict)
        ]
    return found


def _llm_config(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Without a reference, or when nothing has the reference's dimensions: a known key at the root, else the
    root (never a deeper guess: a vision tower's config has an LLM's keys too)."""
    for key in TEXT_CONFIG_KEYS:
        if isinstance(config.get(key), dict):
            return key, config[key]
    return "", config


def find_text_config(config: dict[str, Any], reference: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The LLM's config inside a model's ``config.json``, wherever it is nested, and its dotted key path.

    With ``reference`` (the base's text config) it is the object whose dimensions (``STRUCTURAL_KEYS``) agree
    with the base's on at least two keys (or every one the base has, if fewer) and contradict none, the most
    agreeing first: so a text config under a key mmer has never seen is compared with the base like any other.
    When none agrees, the one under a known key (or the root) is returned, as before: comparing it with the
    base then names the dimension that differs, or finds nothing to compare, which the plan warns about.
    """
    if reference:
        known = [key for key in STRUCTURAL_KEYS if key in reference]
        needed = min(2, len(known))
        best, best_rank = None, (0, False)
        for path, node in _nested_configs(config):
            shared = [key for key in known if key in node]
            if any(node[key] != reference[key] for key in shared):
                continue
            rank = (len(shared), path.rsplit(".", 1)[-1] in TEXT_CONFIG_KEYS)
            if needed and len(shared) >= needed and rank > best_rank:
                best, best_rank = (path, node), rank
        if best is not None:
            return best
    return _llm_config(config)


def open_source(spec: ModelSpec) -> SourceModel:
    """Resolve, open and split one model (headers only)."""
    resolved = resolve_model(spec.model, spec.revision)
    reader = CheckpointReader(resolved.path)
    try:
        config_path = resolved.path / "config.json"
        config = read_json(config_path) if config_path.is_file() else None  # bounded, and a JSON object
        layout = detect_layout(set(reader.tensors), str(resolved.path), config)
    except BaseException:
        reader.close()
        raise
    llm: dict[str, TensorInfo] = {}
    components: list[TensorInfo] = []
    for key, info in reader.tensors.items():
        canonical = layout.to_canonical(key)
        if canonical is None:
            components.append(info)
        else:
            llm[canonical] = info
    return SourceModel(spec, resolved, reader, layout, config, llm, components)


@dataclass
class Slot(Sized):
    """One canonical LLM tensor of the base and what the merge does with it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    merged: bool
    reason: str | None = None


@dataclass
class MemoryEstimate:
    """Bytes the merge will touch: read, written, and held at the peak (one slot across all models)."""

    input_bytes: int
    output_bytes: int
    peak_bytes: int
    largest_slot: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "peak_bytes": self.peak_bytes,
            "largest_slot": self.largest_slot,
        }


@dataclass
class MergePlan:
    """The checked inputs and the fate of every tensor."""

    recipe: Recipe
    base: SourceModel
    models: list[SourceModel]
    slots: list[Slot]
    private: dict[str, list[PrivateRecord]]
    variant: Variant
    warnings: list[str] = field(default_factory=list)
    estimate: MemoryEstimate | None = None

    def lambda_for(self, modality: str) -> float | None:
        return self.variant.lambdas[[m.label for m in self.models].index(modality)]

    @property
    def merged_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.merged]

    @property
    def merged_numel(self) -> int:
        return sum(s.numel for s in self.merged_slots)

    def close(self) -> None:
        """Close every input's reader: a plan holds its models' files open (mapped) from ``build_plan`` on, so
        the merge and whatever reads the plan after it read the very files that were checked."""
        close_sources([self.base, *self.models])

    def __enter__(self) -> MergePlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": {"model": self.base.spec.model, "path": str(self.base.path), "layout": self.base.layout.name},
            "models": [
                {
                    "modality": m.label,
                    "model": m.spec.model,
                    "path": str(m.path),
                    "layout": m.layout.name,
                    "lambda": self.lambda_for(m.label),
                    "weight": 1.0 if m.spec.weight is None else m.spec.weight,
                    **({"k": self.variant.k_of(i)} if self.variant.model_k is not None else {}),
                    **({"dare": self.variant.dare_of(i)} if self.variant.model_dare is not None else {}),
                    "component_tensors": len(m.components),
                    "private_tensors": [p.name for p in self.private[m.label]],
                }
                for i, m in enumerate(self.models)
            ],
            "options": {**self.recipe.options.to_dict(), "alpha": self.variant.alpha},
            "variant": self.variant.label,
            "alpha": self.variant.alpha,
            "slots": {
                "total": len(self.slots),
                "merged": len(self.merged_slots),
                "merged_parameters": self.merged_numel,
            },
            "not_merged": {s.name: s.reason for s in self.slots if not s.merged},
            "estimate": self.estimate.to_dict() if self.estimate else None,
            "warnings": list(self.warnings),
        }


def check_registries(recipe: Recipe, *, shared: Collection[str] = ()) -> None:
    """Method, mask rule and device exist, they pair, and every option the recipe sets applies to them, before
    any file is opened: what each takes is declared in its registry, so this check never names a method.

    ``shared`` names options set for several variants at once (``mmer compare``), which need not apply to each.
    An option at its default never counts as set (see ``MergeOptions.non_defaults``).
    """
    options = recipe.options
    method = METHODS.get(options.method)
    if method is None:
        raise ConfigError(
            f"unknown merge method {options.method!r}", key="method", hint=f"available: {', '.join(sorted(METHODS))}"
        )
    rule = MASKS.get(options.mask)
    if rule is None:
        raise ConfigError(
            f"unknown mask rule {options.mask!r}",
            key="mask",
            hint="available: "
            + ", ".join(f"{name} (one merged model)" if MASKS[name].single_model_output else name for name in MASKS),
        )
    if rule.pairs_with is not None and method.name not in rule.pairs_with:
        raise ConfigError(
            f"mask {rule.name} with method {method.name}: {rule.pairing}",
            key="mask",
            hint=" or ".join(f"use --method {m} --mask {rule.name}" for m in sorted(rule.pairs_with)),
        )
    for option, value in set_options(recipe).items():
        if option in shared:
            continue
        if option in METHOD_OPTIONS and option not in method.accepts:
            kind, owner, reason, takers = "method", method.name, method.refusal(option), methods_accepting(option)
        elif option in MASK_OPTIONS and option not in rule.accepts:
            kind, owner, reason = "mask rule", rule.name, rule.refusal(option)
            takers = sorted(m.name for m in MASKS.values() if option in m.accepts)
        else:
            continue
        where = _OPTION_WHERE.get(option, f"--{option.replace('_', '-')} / `{option}:` from the recipe")
        raise ConfigError(
            f"{option} = {value!r} does not apply to {kind} {owner}: {reason}",
            key="weight" if option == "weights" else option,
            hint=f"remove {where}, or use a {kind} that takes it: {', '.join(takers)}",
        )
    check_device_available(options.device)


_OPTION_WHERE = {
    "weights": "`weight:` from the model specs",
    "lambda": "--lambda / --lambda-for and `lambda:` from the recipe and the model specs",
    "k": "--k / `k:` from the recipe and the model specs",
    "dare": "--dare / `dare:` from the recipe and the model specs",
}


def set_options(recipe: Recipe) -> dict[str, object]:
    """The method and mask options a recipe sets, by recipe key: those not at their default, and the models' merge
    weights (``weights``) when any is not 1.

    A model spec's own ``lambda:`` is not among them: a spec describes a model and is reused with every rule (the
    demo's audio.yaml sets one), so a rule without λ leaves it unused and the plan says so (:func:`unused_lambdas`)
    rather than refusing the merge."""
    given = {k: v for k, v in recipe.options.non_defaults().items() if k in METHOD_OPTIONS or k in MASK_OPTIONS}
    if recipe.weights is not None:
        given["weights"] = recipe.weights
    # a model's own K or p is set like the recipe's (any value: a spec's `k: 0.8` is no less a trim than `--k 0.6`)
    for option, own in (("k", [m.k for m in recipe.models]), ("dare", [m.dare for m in recipe.models])):
        if any(v is not None for v in own):
            given[option] = recipe.ks if option == "k" else recipe.dares
    return given


def unused_lambdas(recipe: Recipe) -> list[str]:
    """A warning when model specs give λ but the mask rule takes none."""
    if "lambda" in MASKS[recipe.options.mask].accepts:
        return []
    given = [f"{m.modality}={m.lambda_:g}" for m in recipe.models if m.lambda_ is not None]
    if not given:
        return []
    return [f"λ from the model specs ({', '.join(given)}) is not used: mask rule {recipe.options.mask} has no λ"]


def resolve_variant(recipe: Recipe) -> Variant:
    """The options with every default resolved: α from the method, λ, K and DARE's p from model spec, else recipe
    (else, for λ, the mask rule)."""
    options = recipe.options
    default_lambda = MASKS[options.mask].default_lambda
    k, model_k = per_model(recipe.ks, min) if recipe.models else (options.k, None)
    dare, model_dare = per_model(recipe.dares, max) if recipe.models else (options.dare, None)
    return Variant(
        method=options.method,
        mask=options.mask,
        k=k,
        model_k=model_k,
        alpha=options.alpha if options.alpha is not None else METHODS[options.method].default_alpha,
        trim_scope=options.trim_scope,
        trim_count=options.trim_count,
        zero_sign=options.zero_sign,
        elect_on=options.elect_on,
        aggregate=options.aggregate,
        mask_source=options.mask_source,
        dare=dare,
        model_dare=model_dare,
        dare_seed=options.dare_seed,
        common_space=options.common_space,
        iterations=options.iterations,
        rank_fraction=options.rank_fraction,
        lambdas=tuple(
            recipe.lambda_for(m.modality, default_lambda) if default_lambda is not None else None  # type: ignore[arg-type]
            for m in recipe.models
        ),
        weights=recipe.weights,
    )


def build_plan(recipe: Recipe, *, shared: Collection[str] = ()) -> MergePlan:
    """Open every model and check it against the base; raise before any weight is read (``shared``: see
    :func:`check_registries`)."""
    check_registries(recipe, shared=shared)
    opened: list[SourceModel] = []  # closed again if any check fails: the caller never sees them
    try:
        base = open_source(recipe.base)
        opened.append(base)
        if base.components:
            names = ", ".join(i.name for i in base.components[:3])
            raise LayoutError(
                f"{base.path}: the base holds tensors that are not part of an LLM ({names}...)",
                file=str(base.path),
                tensor=base.components[0].name,
                hint="the base must be the shared text LLM the multimodal models were fine-tuned from",
            )
        for spec in recipe.models:
            opened.append(open_source(spec))
        models = opened[1:]
        warnings: list[str] = unused_lambdas(recipe)
        for model in models:
            _check_config(base, model, warnings)
        slots = _plan_slots(base, recipe)
        private = {m.label: _check_tensors(base, m, slots, recipe.options.vocab_policy) for m in models}
        plan = MergePlan(recipe, base, models, slots, private, resolve_variant(recipe), warnings)
        plan.estimate = estimate_memory(plan)
    except BaseException:
        close_sources(opened)
        raise
    return plan


def close_sources(models: list[SourceModel]) -> None:
    """Close each model's reader (closing one twice is harmless)."""
    for model in models:
        model.reader.close()


def _check_config(base: SourceModel, model: SourceModel, warnings: list[str]) -> None:
    b = base.text_config()
    path, m = find_text_config(model.config or {}, b)
    if not b or not m:
        warnings.append(f"{model.label}: no config.json to compare with the base; only tensor shapes were checked")
        return
    if not any(key in b and key in m for key in STRUCTURAL_KEYS + NUMERIC_KEYS):
        warnings.append(
            f"{model.label}: its config.json holds no text config with the base's dimensions; only tensor shapes "
            "were checked"
        )
    for key in STRUCTURAL_KEYS + NUMERIC_KEYS:
        if key in b and key in m and b[key] != m[key]:
            where = f"{path}.{key}" if path else key
            raise IncompatibleBaseError(
                f"{model.path}: config {where} = {m[key]!r} but the base has {b[key]!r}",
                file=str(model.path / "config.json"),
                key=where,
                hint="this model was not fine-tuned from this base; check which base LLM it was trained from",
            )
    for key in SOFT_KEYS:
        if key in b and key in m and b[key] != m[key]:
            warnings.append(f"{model.label}: config {key} = {m[key]!r}, base has {b[key]!r}")


def _plan_slots(base: SourceModel, recipe: Recipe) -> list[Slot]:
    slots = []
    for name in sorted(base.llm, key=canonical_order):
        info = base.llm[name]
        reason = None
        if is_buffer_name(name):
            reason = "buffer"
        elif not info.dtype.is_floating_point:
            reason = "integer dtype"
        elif is_vocab_tensor(name) and recipe.options.vocab_policy == "exclude":
            reason = "vocab_policy=exclude"
        slots.append(Slot(name, info.shape, info.dtype, merged=reason is None, reason=reason))
    return slots


def _check_tensors(base: SourceModel, model: SourceModel, slots: list[Slot], vocab_policy: str) -> list[PrivateRecord]:
    """Same LLM tensors with the same shapes as the base; returns the model's private vocabulary rows."""
    private: list[PrivateRecord] = []
    base_names = {s.name for s in slots if s.reason != "buffer"}
    model_names = {n for n in model.llm if not is_buffer_name(n)}
    tied_hint = "the base and this model disagree on tied embeddings (lm_head present in one only)"
    for name in sorted(base_names - model_names):
        raise IncompatibleBaseError(
            f"{model.path}: LLM tensor {model.layout.to_disk(name)!r} is missing (the base has {name!r})",
            file=str(model.path),
            tensor=name,
            hint=tied_hint if name == "lm_head.weight" else "was this model fine-tuned from a different base?",
        )
    for name in sorted(model_names - base_names):
        raise IncompatibleBaseError(
            f"{model.path}: LLM tensor {model.llm[name].name!r} has no counterpart in the base",
            file=str(model.path),
            tensor=model.llm[name].name,
            hint=tied_hint if name == "lm_head.weight" else "was this model fine-tuned from a different base?",
        )
    for slot in slots:
        if slot.reason == "buffer":
            continue
        info = model.llm[slot.name]
        _check_dtype_kind(model, info, slot)
        shape = info.shape
        if slot.reason == "vocab_policy=exclude":
            private.append(PrivateRecord(slot.name, 0, list(shape)))
            continue
        if shape == slot.shape:
            continue
        vocab_extension = (
            is_vocab_tensor(slot.name)
            and len(shape) == len(slot.shape)
            and shape[1:] == slot.shape[1:]
            and shape[0] > slot.shape[0]
        )
        if vocab_extension and vocab_policy == "shared-rows":
            private.append(PrivateRecord(slot.name, slot.shape[0], [shape[0] - slot.shape[0], *shape[1:]]))
            continue
        hint = "was this model fine-tuned from a different base?"
        if vocab_extension:
            hint = "the model adds vocabulary rows; use vocab_policy shared-rows (default) or exclude"
        elif is_vocab_tensor(slot.name) and shape[0] < slot.shape[0]:
            hint = "the model has fewer vocabulary rows than the base; is the base the right one?"
        raise IncompatibleBaseError(
            f"{model.path}: tensor {info.name!r} has shape {list(shape)} but the base's {slot.name!r} has "
            f"{list(slot.shape)}",
            file=str(info.file),
            tensor=info.name,
            hint=hint,
        )
    return private


def _check_dtype_kind(model: SourceModel, info: TensorInfo, slot: Slot) -> None:
    """An LLM weight is floating point in every model, or integer in the base and the model alike.

    Integers stored where the base has floats would be merged as numbers (a 0/1 flag, or raw bits, becomes a
    task vector of 1e9); the header says so before any weight is read.
    """
    if info.dtype.is_floating_point == slot.dtype.is_floating_point:
        return
    dtype, base_dtype = DTYPE_NAMES.get(info.dtype, str(info.dtype)), DTYPE_NAMES.get(slot.dtype, str(slot.dtype))
    if slot.dtype.is_floating_point:
        why = f"is stored as {dtype}, but an LLM weight must be floating point (the base's is {base_dtype})"
        hint = "re-export the model with its weights in floating point (its torch_dtype), or check the file"
    else:
        why = f"is {dtype}, but the base stores {slot.name!r} as {base_dtype}: not the same kind of tensor"
        hint = "was this model fine-tuned from a different base? check both files' tensor dtypes"
    error = CheckpointFormatError if slot.dtype.is_floating_point else IncompatibleBaseError
    raise error(
        f"{model.path} ({model.label}): LLM tensor {info.name!r} {why}",
        file=str(info.file),
        tensor=info.name,
        hint=hint,
    )


def estimate_memory(plan: MergePlan) -> MemoryEstimate:
    """Peak ≈ the largest slot, held once per model as float32 deltas, trimmed copies and masks, plus reads."""
    n = len(plan.models)
    merged = plan.merged_slots or plan.slots
    largest = max(merged, key=lambda s: s.numel)
    read_bytes = sum(i.nbytes for m in [plan.base, *plan.models] for i in m.reader.tensors.values())
    out_bytes = sum(s.nbytes for s in plan.slots) * (1 if plan.recipe.options.base_storage == "copy" else 0)
    tau_itemsize = 4 if plan.recipe.options.delta_dtype == "float32" else None
    storage = plan.recipe.options.tau_storage
    if storage != "exact":  # codes and scales (FORMAT.md, Quantised τ*)
        size = plan.recipe.options.tau_group_size
        out_bytes += sum(quant.stored_bytes(s.shape, storage, size) for s in plan.merged_slots)
    else:
        out_bytes += sum(s.numel * (tau_itemsize or s.dtype.itemsize) for s in plan.merged_slots)
    out_bytes += n * math.ceil(plan.merged_numel / 8)
    out_bytes += sum(i.nbytes for m in plan.models for i in m.components)
    # Per element of the largest slot, measured rather than guessed (tests/test_reliability.py): the raw reads
    # and their memory-mapped file pages (2·(n+1)·itemsize), then float32 working copies: n task vectors, n
    # trimmed, and TIES' stacked copy, signs and selection (≈3n), plus τ*, its stored cast and temporaries.
    per_element = 4 * (6 * n + 6)
    if plan.variant.dare > 0:  # DARE's draws, keep masks and dropped copies of every τᵢ, on whole slots
        per_element += 4 * 3 * n
    if plan.variant.masks_raw:  # masks test the raw τᵢ (TALL, or mask_source raw): kept beside the trimmed ones,
        per_element += 4 * 2 * n  # with the rule's own float32 temporaries (|τ* − τᵢ|, λ-scaled bounds)
    if largest.dtype == torch.float32:  # float32 inputs: τᵢ cannot reuse a widened copy, one more per model
        per_element += 4 * n
    mapped = 2 * (n + 1) * largest.dtype.itemsize
    working = largest.numel
    variant, options = plan.variant, plan.recipe.options
    per_tensor_first = trims_each_tensor_first(variant, options.allow_nonfinite)
    if torch.device(options.device).type == "cpu" and (variant.elementwise or per_tensor_first):
        working = min(working, runtime.CPU_CHUNK)  # merged in chunks: float32 copies of one chunk only
    peak = working * per_element + largest.numel * mapped
    # The trim's own search (mmer.merge.trim): a global one's sample and window candidates, or its histograms
    # (DARE, or a window that missed); a per-tensor one found in chunks holds one tensor's worth.
    if variant.needs_global_threshold:
        peak += 3 * (1 << 16) * 8 * n + (search_bytes(plan.merged_numel, n) if variant.dare <= 0 else 0)
    elif per_tensor_first:
        peak += 3 * (1 << 16) * 8 * n + search_bytes(largest.numel, n, TENSOR_SAMPLE_ENTRIES)
    peak += 2 * HASH_CHUNK_BYTES  # the outputs are hashed into the manifest a chunk at a time (two alive at once)
    return MemoryEstimate(read_bytes, out_bytes, peak, largest.name)
