"""Model specs and merge recipes: frozen dataclasses with one strict loader.

Unknown keys are errors (mergekit silently ignores them, and a misspelt ``lamda:`` then merges with the
default). Method and mask names stay plain strings here; ``pipeline`` checks them against the registries
before any tensor is read, so this module stays at the bottom of the import graph.

One file describes a whole merge in one of two shapes, told apart by their keys: an mmer recipe (``base``,
``models``, ``options``) or a mergekit config (``merge_method``, ``models``), read as the mmer recipe that
computes the same merge (``mmer.mergekit_config``). A relative model path is resolved from the directory of the
YAML that names it, so a recipe and its models can move together and run from any working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from mmer import mergekit_config
from mmer.errors import ConfigError

MODALITY_NAME = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")
# Names a modality cannot take: ``base`` is the base's own label (in the plan, the input hashes and every
# report), and the others name a decoupled checkpoint's own parts (FORMAT.md), so a modality called so would
# take the base's role or read as one of those parts.
RESERVED_MODALITY_NAMES = ("base", "tau_star", "masks", "components", "merged")

# Devices the arithmetic can run on: ``meta`` and the other torch device types hold no data to merge.
DEVICE_NAME = re.compile(r"^(cpu|mps|cuda(:[0-9]{1,3})?)$")
_DEVICE_HINT = "use cpu, cuda (the current GPU), cuda:N (GPU number N) or mps (Apple silicon)"

TRIM_SCOPES = ("global", "per-tensor")
ZERO_SIGN_RULES = ("zero", "positive", "majority")
TRIM_COUNTS = ("reference", "exact")
ELECT_ON = ("raw", "weighted")
AGGREGATES = ("mean", "sum")
MASK_SOURCES = ("trimmed", "raw")
VOCAB_POLICIES = ("shared-rows", "strict", "exclude")
DELTA_DTYPES = ("base", "float32")
BASE_STORAGES = ("copy", "reference")
TAU_STORAGES = ("exact", "int8", "int4")  # how τ* is stored; the encodings are mmer.checkpoint.quant's
DEFAULT_TAU_GROUP_SIZE = 128
MAX_TAU_GROUP_SIZE = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """One model: a local directory or a Hub id (with an optional revision).

    The base spec has no ``modality``; every fine-tuned spec has one, and may override λ for its mask, give the
    model a merge weight (used by ``average``, ``task_arithmetic`` and ``ties``; default 1), and its own trim
    fraction ``k`` and DARE drop rate ``dare`` where the recipe's one value does not fit every model (mergekit's
    per-model ``density``; TIES-Merging, arXiv 2306.01708 §3, and DARE, arXiv 2311.03099 §3, define both per task
    vector). ``None`` takes the recipe's.
    """

    model: str
    revision: str | None = None
    modality: str | None = None
    lambda_: float | None = None
    weight: float | None = None
    k: float | None = None
    dare: float | None = None

    def __post_init__(self) -> None:
        if self.lambda_ is not None:
            _check_lambda(self.lambda_, f"lambda of {self.model}")
        if self.weight is not None and (not math.isfinite(self.weight) or self.weight <= 0):
            raise ConfigError(
                f"weight of {self.model} = {self.weight} is out of range", key="weight", hint="a merge weight is > 0"
            )
        if self.k is not None:
            _check_k(self.k, f"k of {self.model}")
        if self.dare is not None:
            _check_dare(self.dare, f"dare of {self.model}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        if self.revision is not None:
            out["revision"] = self.revision
        if self.modality is not None:
            out["modality"] = self.modality
        if self.lambda_ is not None:
            out["lambda"] = self.lambda_
        if self.weight is not None:
            out["weight"] = self.weight
        if self.k is not None:
            out["k"] = self.k
        if self.dare is not None:
            out["dare"] = self.dare
        return out


@dataclass(frozen=True)
class MergeOptions:
    """Every knob of a merge, with the paper's defaults (docs/method.md §2–3).

    Attributes:
        method: merge method from the registry: ``ties`` (TIES-Merging as MMER uses it), ``average`` (NaiveMC),
            ``task_arithmetic``, ``emr`` (EMR-Merging's unified vector).
        mask: mask rule from the registry (``mmer`` = Eq. 3 of the paper; ``tall``; ``emr``), or ``none`` for a
            single merged model written as a plain Hugging Face checkpoint.
        k: fraction of each task vector kept by the trim (paper: 0.8). 1.0 disables trimming. A model spec's own
            ``k`` wins over it for that model.
        alpha: scale on the merged task vector τ*; ``None`` takes the method's default (1 for ties, average and
            emr as in the MMER paper; 0.3 for task_arithmetic).
        lambda_: default λ of the mask rule for every modality; ``None`` takes the rule's default (mmer: 0.9,
            the paper's best; tall: 0.4); a model spec may override it.
        trim_scope: ``global`` finds one magnitude threshold per model over all its LLM tensors (what the TIES
            reference code and ModelCompose do); ``per-tensor`` trims each tensor on its own (mergekit).
        trim_count: ``reference`` keeps |τ| ≥ the (d − ⌊d·K⌋)-th smallest magnitude (TIES reference code);
            ``exact`` keeps the max(1, ⌊d·K⌋) largest (mergekit, PEFT).
        zero_sign: what the elected sign is where Σᵢ τᵢ is exactly 0. ``zero`` follows TIES Algorithm 1
            (γ = sgn(0) = 0, so τ* = 0 there); ``positive`` follows mergekit (γ = +1); ``majority`` follows the
            TIES authors' code, ModelCompose and FusionBench (γ = the sign most entries of the whole model elect,
            counted in one more pass and recorded in the manifest's options as ``sign_census``).
        elect_on: TIES sign election on ``raw`` task vectors (paper, PEFT) or ``weighted`` ones (mergekit).
        aggregate: TIES disjoint ``mean`` (paper) or ``sum`` (FusionBench's default).
        dare: DARE drop rate p applied to every τᵢ before the method (0 = off); kept entries are scaled 1/(1−p).
            A model spec's own ``dare`` wins over it for that model.
        dare_seed: seed of DARE's random masks (with the model position and tensor name).
        common_space: Iso-CTS's fraction of each matrix's rank given to the common subspace (paper: 0.8).
        iterations: WUDI's Adam steps per weight matrix (FusionBench's configuration: 400).
        rank_fraction: CART's share of each matrix's rank kept for each task's deviation from the mean (0.1).
        mask_source: compare τ* with the ``trimmed`` τᵢ (the paper's notation) or the ``raw`` untrimmed τᵢ.
        vocab_policy: ``shared-rows`` merges rows [0, V_base) of embeddings/lm_head and keeps rows beyond the
            base as the model's private rows; ``strict`` refuses any vocabulary difference; ``exclude`` keeps
            embeddings and lm_head out of the merge, each model keeping its own.
        delta_dtype: dtype τ* is stored in: ``base`` (the base's dtype, the format default) or ``float32``.
        base_storage: ``copy`` the base LLM into the output, or store a pinned ``reference`` to it.
        tau_storage: ``exact`` stores τ* as computed (the default); ``int8`` / ``int4`` store it as integer codes
            with one float32 scale per group of ``tau_group_size`` entries along the last dimension (FORMAT.md,
            Quantised τ*). Storage only: masks and rescalers come from the exact τ*.
        tau_group_size: entries per scale when ``tau_storage`` is int8 or int4 (default 128).
        device: where the arithmetic runs (``cpu``, ``cuda``, ``cuda:1``...). Bytes always go through the CPU.
        shard_size: maximum bytes per output safetensors shard.
        allow_nonfinite: merge tensors holding NaN/inf, and write τᵢ, τ* or rebuilt weights that overflow to
            ±inf, instead of refusing them.
        hash_inputs: record the sha256 of every input file in the manifest.
    """

    method: str = "ties"
    mask: str = "mmer"
    k: float = 0.8
    alpha: float | None = None
    lambda_: float | None = None
    trim_scope: str = "global"
    trim_count: str = "reference"
    zero_sign: str = "zero"
    elect_on: str = "raw"
    aggregate: str = "mean"
    dare: float = 0.0
    dare_seed: int = 0
    common_space: float = 0.8
    iterations: int = 400
    rank_fraction: float = 0.1
    mask_source: str = "trimmed"
    vocab_policy: str = "shared-rows"
    delta_dtype: str = "base"
    base_storage: str = "copy"
    tau_storage: str = "exact"
    tau_group_size: int = DEFAULT_TAU_GROUP_SIZE
    device: str = "cpu"
    shard_size: int = 5 * 1024**3
    allow_nonfinite: bool = False
    hash_inputs: bool = True

    def __post_init__(self) -> None:
        _check_k(self.k, "k")
        if self.alpha is not None and (not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ConfigError(f"alpha = {self.alpha} is out of range", key="alpha", hint="alpha must be > 0")
        if self.lambda_ is not None:
            _check_lambda(self.lambda_, "lambda")
        _check_dare(self.dare, "dare")
        if not (0.0 <= self.common_space <= 1.0) or math.isnan(self.common_space):
            raise ConfigError(
                f"common_space = {self.common_space} is out of range",
                key="common_space",
                hint="the common subspace's share of each matrix's rank is in [0, 1] (paper: 0.8)",
            )
        if not (0.0 < self.rank_fraction <= 1.0) or math.isnan(self.rank_fraction):
            raise ConfigError(
                f"rank_fraction = {self.rank_fraction} is out of range",
                key="rank_fraction",
                hint="CART's kept share of each matrix's rank is in (0, 1] (default 0.1)",
            )
        if isinstance(self.iterations, bool) or not (1 <= self.iterations <= 100_000):
            raise ConfigError(
                f"iterations = {self.iterations} is out of range",
                key="iterations",
                hint="WUDI's Adam steps per weight matrix: an integer from 1 to 100000 (FusionBench: 400)",
            )
        for name, allowed in (
            ("trim_scope", TRIM_SCOPES),
            ("trim_count", TRIM_COUNTS),
            ("elect_on", ELECT_ON),
            ("aggregate", AGGREGATES),
            ("zero_sign", ZERO_SIGN_RULES),
            ("mask_source", MASK_SOURCES),
            ("vocab_policy", VOCAB_POLICIES),
            ("delta_dtype", DELTA_DTYPES),
            ("base_storage", BASE_STORAGES),
            ("tau_storage", TAU_STORAGES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"{name} = {value!r} is not one of {', '.join(allowed)}", key=name, hint=_closest(value, allowed)
                )
        if self.shard_size < 1024:
            raise ConfigError(f"shard_size = {self.shard_size} bytes is too small", key="shard_size")
        _check_tau_storage(self)
        if not isinstance(self.device, str) or not DEVICE_NAME.fullmatch(self.device):
            raise ConfigError(
                f"device = {self.device!r} is not a device mmer can merge on", key="device", hint=_DEVICE_HINT
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lambda"] = out.pop("lambda_")
        if self.tau_storage == "exact":  # an exact τ*'s recipe and manifest stay what an mmer before the option reads
            del out["tau_storage"], out["tau_group_size"]
        return out

    def non_defaults(self) -> dict[str, Any]:
        """The options, by recipe key, whose value is not the default.

        An option left at its default never counts as set: the options cannot tell a value the user wrote from
        one mmer wrote for them (``mmer_recipe.yaml`` lists every option), and a default changes nothing that
        needs refusing.
        """
        defaults = MergeOptions()
        return {
            ("lambda" if f.name == "lambda_" else f.name): getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        }


@dataclass(frozen=True)
class RecipeSource:
    """Which file a recipe came from and in which shape, and what a translated mergekit config left to say.

    Attributes:
        file: the YAML the user named.
        kind: ``recipe`` (mmer's own), ``mergekit`` (translated) or ``specs`` (one YAML per model).
        notes: where a translated merge can differ from mergekit's, one sentence each.
        output_dtype: the dtype a mergekit config asks the output to be stored in; mmer stores the base's, so it
            is checked against the base once that is opened (``mergekit_config.check_output_dtype``).
    """

    file: str
    kind: str
    notes: tuple[str, ...] = ()
    output_dtype: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A whole merge: the base, the fine-tuned models, and the options. Written resolved into the output.

    ``source`` says where the recipe was read from; it is not part of the merge (not written, not compared).
    """

    base: ModelSpec
    models: tuple[ModelSpec, ...]
    options: MergeOptions = field(default_factory=MergeOptions)
    source: RecipeSource | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.base.modality is not None:
            raise ConfigError(
                f"the base model {self.base.model!r} has a modality ({self.base.modality!r})",
                key="modality",
                hint="the base is the shared text LLM; give the modality only to the fine-tuned models",
            )
        for key, value in (("k", self.base.k), ("dare", self.base.dare)):
            if value is not None:
                raise ConfigError(
                    f"the base model {self.base.model!r} has its own {key} ({value:g}), but the base has no "
                    "task vector to trim or drop",
                    file=self.source.file if self.source is not None else None,
                    key=key,
                    hint=f"give `{key}:` to the fine-tuned models, or set it for all of them under `options:`",
                )
        if not self.models:
            raise ConfigError("no fine-tuned models to merge", hint="pass at least one model YAML after the base")
        seen: dict[str, str] = {}
        for spec in self.models:
            if spec.modality is None:
                raise ConfigError(
                    f"model {spec.model!r} has no modality", key="modality", hint="add e.g. `modality: vision`"
                )
            check_modality_name(spec.modality, where=f"model {spec.model!r}")
            if spec.modality in seen:
                raise ConfigError(
                    f"modality {spec.modality!r} is given twice ({seen[spec.modality]!r} and {spec.model!r})",
                    key="modality",
                    hint="give each model its own modality name, e.g. vision and vision_ocr",
                )
            seen[spec.modality] = spec.model

    def lambda_for(self, modality: str, rule_default: float | None = None) -> float | None:
        """λ of a modality: its model spec's, else the recipe's, else the mask rule's default."""
        for spec in self.models:
            if spec.modality == modality and spec.lambda_ is not None:
                return spec.lambda_
        return self.options.lambda_ if self.options.lambda_ is not None else rule_default

    @property
    def weights(self) -> tuple[float, ...] | None:
        """Per-model merge weights, or ``None`` when every model has weight 1 (plain means, counts)."""
        weights = tuple(1.0 if m.weight is None else m.weight for m in self.models)
        return None if all(w == 1.0 for w in weights) else weights

    @property
    def ks(self) -> tuple[float, ...]:
        """Each model's trim fraction K: its spec's own, else the recipe's."""
        return tuple(self.options.k if m.k is None else m.k for m in self.models)

    @property
    def dares(self) -> tuple[float, ...]:
        """Each model's DARE drop rate p: its spec's own, else the recipe's."""
        return tuple(self.options.dare if m.dare is None else m.dare for m in self.models)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.to_dict(),
            "models": [m.to_dict() for m in self.models],
            "options": self.options.to_dict(),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_compact_yaml(self) -> str:
        """The recipe as a user would write it: only the options that are not at their default."""
        data = {**self.to_dict(), "options": self.options.non_defaults()}
        if not data["options"]:
            del data["options"]
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------------- loading

_SPEC_KEYS = {
    "model": str,
    "revision": str,
    "modality": str,
    "lambda": (int, float),
    "weight": (int, float),
    "k": (int, float),
    "dare": (int, float),
}
_OPTION_TYPES: dict[str, type | tuple[type, ...]] = {
    "method": str,
    "mask": str,
    "k": (int, float),
    "alpha": (int, float),
    "lambda": (int, float),
    "trim_scope": str,
    "trim_count": str,
    "elect_on": str,
    "aggregate": str,
    "dare": (int, float),
    "dare_seed": int,
    "common_space": (int, float),
    "iterations": int,
    "rank_fraction": (int, float),
    "zero_sign": str,
    "mask_source": str,
    "vocab_policy": str,
    "delta_dtype": str,
    "base_storage": str,
    "tau_storage": str,
    "tau_group_size": int,
    "device": str,
    "shard_size": (int, str),
    "allow_nonfinite": bool,
    "hash_inputs": bool,
}


def _check_tau_storage(options: MergeOptions) -> None:
    """A group size is a positive integer that only a quantised τ* takes; a single merged model stores no τ*."""
    size = options.tau_group_size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_TAU_GROUP_SIZE:
        raise ConfigError(
            f"tau_group_size = {size!r} is out of range",
            key="tau_group_size",
            hint=f"entries per scale: an integer from 1 to {MAX_TAU_GROUP_SIZE} (default {DEFAULT_TAU_GROUP_SIZE})",
        )
    if options.tau_storage == "exact" and size != DEFAULT_TAU_GROUP_SIZE:
        raise ConfigError(
            f"tau_group_size = {size} given, but tau_storage is exact (an exact τ* has no groups)",
            key="tau_group_size",
            hint="add tau_storage: int8 or int4, or drop tau_group_size",
        )
    if options.tau_storage != "exact" and options.mask == "none":
        raise ConfigError(
            f"tau_storage = {options.tau_storage} with mask none: a single merged model stores θ*, not τ*",
            key="tau_storage",
            hint="quantised storage applies to a decoupled checkpoint (a mask rule); drop tau_storage",
        )


def _closest(value: object, choices: Any) -> str | None:
    match = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"did you mean {match[0]!r}?" if match else f"valid: {', '.join(sorted(choices))}"


def _check_lambda(value: float, key: str, file: str | None = None) -> None:
    if not math.isfinite(value) or value < 0:
        where = f"{file}: " if file else ""
        raise ConfigError(
            f"{where}{key} = {value} is out of range", key=key, file=file, hint="λ must be a finite number ≥ 0"
        )


def _check_k(value: float, key: str, file: str | None = None) -> None:
    if not (0.0 < value <= 1.0) or math.isnan(value):
        where = f"{file}: " if file else ""
        raise ConfigError(
            f"{where}{key} = {value} is out of range", key="k", file=file, hint="k is the fraction kept, in (0, 1]"
        )


def _check_dare(value: float, key: str, file: str | None = None) -> None:
    if not (0.0 <= value < 1.0) or math.isnan(value):
        where = f"{file}: " if file else ""
        raise ConfigError(
            f"{where}{key} = {value} is out of range", key="dare", file=file, hint="the drop rate p is in [0, 1)"
        )


def _check_keys(data: Mapping[str, Any], allowed: Mapping[str, Any], where: str, file: str | None) -> None:
    if file:
        where = f"{where} {file}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}", file=file)
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"unknown key {key!r} in {where}", file=file, key=str(key), hint=_closest(key, allowed))
        expected = allowed[key]
        number = float in _as_tuple(expected)
        fix = f"write {key} as {_type_name(expected)}" + (" (a number, unquoted)" if number else "")
        if isinstance(value, bool) and expected is not bool and bool not in _as_tuple(expected):
            raise ConfigError(
                f"{where}: {key} must be {_type_name(expected)}, got a boolean", file=file, key=key, hint=fix
            )
        if not isinstance(value, expected):
            raise ConfigError(
                f"{where}: {key} must be {_type_name(expected)}, got {type(value).__name__} ({value!r})",
                file=file,
                key=key,
                hint=fix,
            )


def _as_tuple(t: Any) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _type_name(t: Any) -> str:
    return " or ".join(x.__name__ for x in _as_tuple(t))


def spec_from_dict(data: Mapping[str, Any], file: str | None = None, relative_to: Path | None = None) -> ModelSpec:
    """Build a :class:`ModelSpec` from parsed YAML, refusing unknown keys and wrong types.

    ``relative_to`` is the directory of the YAML file: a relative ``model:`` path is resolved from there.
    """
    _check_keys(data, _SPEC_KEYS, "model spec", file)
    if "model" not in data:
        raise ConfigError(
            "model spec has no `model` key", file=file, key="model", hint="add `model: <path or hub id>`"
        )
    if not data["model"]:
        raise ConfigError(
            f"{file or 'model spec'}: `model` is empty", file=file, key="model", hint="add `model: <path or hub id>`"
        )
    modality = data.get("modality")
    if modality is not None:
        check_modality_name(modality, file)
    lam = data.get("lambda")
    if lam is not None:
        _check_lambda(float(lam), "lambda", file)
    weight = data.get("weight")
    if weight is not None and (not math.isfinite(weight) or weight <= 0):
        raise ConfigError(
            f"{file or 'model spec'}: weight = {weight} is out of range", file=file, key="weight", hint="weight > 0"
        )
    k, dare = data.get("k"), data.get("dare")
    if k is not None:
        _check_k(float(k), f"k of {data['model']}", file)
    if dare is not None:
        _check_dare(float(dare), f"dare of {data['model']}", file)
    return ModelSpec(
        model=resolve_model_path(data["model"], relative_to, file),
        revision=data.get("revision"),
        modality=modality,
        lambda_=None if lam is None else float(lam),
        weight=None if weight is None else float(weight),
        k=None if k is None else float(k),
        dare=None if dare is None else float(dare),
    )


def _looks_like_path(model: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else (``./x``, ``a/b/c``, ``C:\\x``) can only be a path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model or ":" in model


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a name the OS cannot even look up (too long, a NUL byte) does not."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def resolve_model_path(model: str, relative_to: Path | None, file: str | None = None) -> str:
    """A ``model:`` as written in the YAML at ``relative_to``: a relative path is joined to that directory.

    The result is absolute, so the recipe mmer writes into its output runs again from anywhere. A value that is
    no directory there and reads as a Hub id (``org/name``) stays one. A relative path that exists only from the
    working directory is refused rather than guessed at: the same file would mean another model elsewhere.
    """
    if relative_to is None or model.startswith("~") or Path(model).is_absolute():
        return model
    # the YAML's directory as the OS reaches it (``a/../b`` through a link is not ``b``); the model part as written,
    # so a model directory that is a link (into a Hub cache, onto shared storage) keeps the name the user gave it
    relative_to = relative_to.resolve()
    candidate = relative_to / model
    if _exists(candidate):
        return str(candidate)
    if _exists(Path(model)) and relative_to != Path.cwd().resolve():
        raise ConfigError(
            f"{file}: model {model!r} is not in {relative_to} (paths in a YAML are resolved from the "
            f"directory of the file), though it exists relative to the working directory",
            file=file,
            key="model",
            hint=f"write it as {str(Path(model).absolute())!r} or relative to the YAML's directory",
        )
    return str(candidate) if _looks_like_path(model) else model


def modality_for(model: str, taken: Collection[str]) -> str:
    """A modality name for a model that has none (a mergekit config's): its directory or repository name, made
    a valid name (see :func:`check_modality_name`) and unique among ``taken``."""
    stem = re.sub(r"[^a-z0-9_\-]+", "_", Path(model.rstrip("/\\")).name.lower())
    stem = re.sub(r"^[^a-z]+", "", stem)[:60].rstrip("_-") or "model"
    name, n = stem, 1
    while name in taken or name in RESERVED_MODALITY_NAMES:
        n += 1
        name = f"{stem}-{n}"
    return name


def check_modality_name(name: str, file: str | None = None, where: str | None = None) -> None:
    """A modality name is FORMAT.md's ``^[a-z][a-z0-9_-]{0,63}$`` and not one of the reserved names.

    Checked where a spec is read and again where a recipe is built, so specs made in Python are held to it too.
    """
    where = where or file or "model spec"
    if not isinstance(name, str) or not MODALITY_NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: modality {name!r} is not a valid name",
            file=file,
            key="modality",
            hint="use 1 to 64 lower-case letters, digits, '_' or '-', starting with a letter",
        )
    if name in RESERVED_MODALITY_NAMES:
        raise ConfigError(
            f"{where}: modality {name!r} is a reserved name"
            + (": it is the base's own label" if name == "base" else ": it names a part of a decoupled checkpoint"),
            file=file,
            key="modality",
            hint=f"name the modality after what the model adds (vision, audio...); reserved: "
            f"{', '.join(RESERVED_MODALITY_NAMES)}",
        )


def check_device_available(device: str) -> None:
    """Refuse a device this machine does not have, before any file is opened (the name is checked already)."""
    import torch  # here, not at the top: this module stays importable without loading torch

    kind, _, index = device.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} asked for, but no CUDA GPU is available", key="device", hint="use --device cpu"
        )
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are visible",
            key="device",
            hint="GPUs are numbered from 0; check CUDA_VISIBLE_DEVICES",
        )
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(
            "device 'mps' asked for, but this machine has no MPS device", key="device", hint="use --device cpu"
        )


def parse_size(value: int | str, key: str = "shard_size") -> int:
    """Parse ``5GB``, ``500MB``, ``2GiB`` or a plain byte count."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", value, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"{key} = {value!r} is not a size", key=key, hint="write e.g. 5GB, 500MB or 1048576")
    number, unit, binary = Decimal(m.group(1)), m.group(2).upper(), bool(m.group(3))
    base = 1024 if binary else 1000
    return int(number * base ** "_KMGT".index(unit or "_"))


def options_from_dict(data: Mapping[str, Any], file: str | None = None) -> MergeOptions:
    """Build :class:`MergeOptions` from parsed YAML (keys as in the recipe file: ``lambda``, not ``lambda_``)."""
    # `alpha: null` / `lambda: null` mean "the method's / the mask rule's default"
    data = {k: v for k, v in data.items() if not (k in ("alpha", "lambda") and v is None)}
    _check_keys(data, _OPTION_TYPES, "options", file)
    kwargs: dict[str, Any] = dict(data)
    if "lambda" in kwargs:
        kwargs["lambda_"] = float(kwargs.pop("lambda"))
    if "shard_size" in kwargs:
        kwargs["shard_size"] = parse_size(kwargs["shard_size"])
    for key in ("k", "alpha", "dare"):
        if key in kwargs:
            kwargs[key] = float(kwargs[key])
    try:
        return MergeOptions(**kwargs)
    except ConfigError as err:
        err.file = file
        raise


MAX_YAML_BYTES = 1024 * 1024  # specs and recipes are a few hundred bytes
MAX_YAML_DEPTH = 32  # a recipe nests four levels
MAX_YAML_INT_DIGITS = 100


class _YamlRefused(yaml.YAMLError):
    def __init__(self, what: str, mark: Any, hint: str) -> None:
        super().__init__(what)
        self.what, self.mark, self.hint = what, mark, hint


class PlainYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases, and with no nesting or integer beyond any recipe's.

    An alias points at an earlier node, so a few hundred bytes of aliases to aliases expand to billions of
    nodes when the document is built ("billion laughs"). Specs and recipes never need one, so an anchor or an
    alias is refused where it is first seen, before anything is expanded; nesting is counted while the document
    is composed, before Python's recursion limit could be reached.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise _YamlRefused(
                f"uses a YAML {'alias' if sign == '*' else 'anchor'} ({sign}{event.anchor}), which mmer refuses",
                event.start_mark,
                "write the value out in full where it is used: specs and recipes never need & anchors or * aliases, "
                "and aliases of aliases can expand a small file past any memory",
            )
        if self._depth >= MAX_YAML_DEPTH:
            raise _YamlRefused(
                f"nests more than {MAX_YAML_DEPTH} levels deep", event.start_mark, "recipes nest a few levels"
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: Any) -> int:
        if len(node.value) > MAX_YAML_INT_DIGITS:
            raise _YamlRefused(
                f"holds an integer of {len(node.value)} characters", node.start_mark, "no setting needs such a number"
            )
        return super().construct_yaml_int(node)


PlainYamlLoader.add_constructor("tag:yaml.org,2002:int", PlainYamlLoader.construct_yaml_int)


def read_yaml_file(path: str | Path, what: str = "YAML file") -> Any:
    """Parse a spec or recipe the user gave: bounded in size, depth and integers, no aliases, UTF-8 only.

    Every problem is a :class:`ConfigError` naming the file (and the line, where there is one).
    """
    path = Path(path)
    file = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", file=file, hint="check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a {what}", file=file, hint="pass the YAML file") from None
    except OSError as err:
        raise ConfigError(
            f"{path}: cannot read ({err.strerror or err})", file=file, hint="check the path and its permissions"
        ) from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_YAML_BYTES} bytes, too large for a {what}",
            file=file,
            hint="a spec or recipe is a few lines of YAML; check that this is the right file",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start})",
            file=file,
            hint="save the file as UTF-8; check that this is the right file",
        ) from None
    loader = None
    try:
        loader = PlainYamlLoader(text)
        loader.name = file  # parse errors then name the file, not "<unicode string>"
        return loader.get_single_data()
    except _YamlRefused as err:
        raise ConfigError(f"{path}: line {err.mark.line + 1}: {err.what}", file=file, hint=err.hint) from None
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        raise ConfigError(
            f"{path}: not valid YAML ({str(err)[:300]})", file=file, hint="fix the YAML at the line named"
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def load_spec(path: str | Path) -> ModelSpec:
    """Read one model YAML: ``model``, optional ``revision``, ``modality``, ``lambda``, ``weight``, ``k``, ``dare``."""
    data = read_yaml_file(path, "model spec")
    return spec_from_dict(data if data is not None else {}, file=str(path), relative_to=Path(path).parent)


_RECIPE_KEYS = {
    "base": (dict, str),
    "models": list,
    "options": dict,
    "mmer_version": str,
    "format_version": str,
}


def config_kind(data: object) -> str:
    """What a parsed YAML is, by its keys: ``mergekit`` (``merge_method``), ``recipe`` (``base``, ``models`` or
    ``options``; mmer's own) or ``spec`` (one model: ``model``, ``modality``...)."""
    if mergekit_config.is_mergekit_config(data):
        return "mergekit"
    if isinstance(data, Mapping) and "model" not in data and any(k in data for k in _RECIPE_KEYS):
        return "recipe"
    return "spec"


@dataclass(frozen=True)
class ConfigFile:
    """One recipe file read: its parts (the base and models may be absent: options alone are a recipe too)."""

    base: ModelSpec | None
    models: tuple[ModelSpec, ...]
    options: MergeOptions
    source: RecipeSource


def read_config(path: str | Path, data: object = None) -> ConfigFile:
    """Read a recipe file in either shape (see the module docstring); ``data``: its YAML, when already parsed."""
    file = str(path)
    if data is None:
        data = read_yaml_file(path, "recipe")
    if data is None:
        data = {}
    relative_to = Path(path).parent
    if config_kind(data) == "mergekit":
        return _from_mergekit(data, file, relative_to)
    _check_keys(data, _RECIPE_KEYS, "recipe", file)
    base = None
    if "base" in data:
        # `base: org/name` is shorthand for `base: {model: org/name}`
        base_data = {"model": data["base"]} if isinstance(data["base"], str) else data["base"]
        base = spec_from_dict(base_data, file, relative_to)
    models = tuple(spec_from_dict(m, file, relative_to) for m in data.get("models", []))
    options = options_from_dict(data.get("options", {}), file)
    return ConfigFile(base, models, options, RecipeSource(file, "recipe"))


def _from_mergekit(data: Mapping[str, Any], file: str, relative_to: Path) -> ConfigFile:
    translation = mergekit_config.translate(data, file)
    recipe = translation.recipe
    base = spec_from_dict(recipe["base"], file, relative_to)
    taken: list[str] = []
    models = []
    for entry in recipe["models"]:
        taken.append(modality_for(entry["model"], taken))
        models.append(spec_from_dict({**entry, "modality": taken[-1]}, file, relative_to))
    options = options_from_dict(recipe["options"], file)
    source = RecipeSource(file, "mergekit", translation.notes, translation.output_dtype)
    return ConfigFile(base, tuple(models), options, source)


def load_recipe(path: str | Path) -> tuple[ModelSpec | None, tuple[ModelSpec, ...], MergeOptions]:
    """Read a recipe file: optional ``base`` and ``models``, and ``options`` (or a mergekit config).

    Returns the parts rather than a :class:`Recipe` because a recipe file may hold only options, the models
    coming from the command line.
    """
    config = read_config(path)
    return config.base, config.models, config.options


def override_options(options: MergeOptions, **changes: Any) -> MergeOptions:
    """Apply the non-``None`` changes (command-line flags win over the recipe file)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(options, **changes) if changes else options


def build_recipe(
    spec_files: list[str | Path] | tuple[str | Path, ...] = (),
    recipe_file: str | Path | None = None,
    lambdas: Mapping[str, float] | None = None,
    **option_overrides: Any,
) -> Recipe:
    """Assemble a recipe the way the command line does.

    One YAML that is a recipe or a mergekit config (by its keys) is the whole merge: ``mmer merge recipe.yaml``.
    Otherwise the first spec file is the base and the rest are fine-tuned models; spec files, when given, replace
    the recipe file's models. Options come from defaults, then the recipe file, then ``option_overrides`` (the
    flags); ``lambdas`` sets λ per modality over everything else.
    """
    base: ModelSpec | None = None
    models: tuple[ModelSpec, ...] = ()
    options = MergeOptions()
    source: RecipeSource | None = None
    config: ConfigFile | None = None
    spec_files = list(spec_files)
    first: Any = None
    if spec_files:
        first = read_yaml_file(spec_files[0], "model spec or recipe")
        kind = config_kind(first)
        if kind != "spec":
            _check_whole_recipe(spec_files, kind, recipe_file)
            config = read_config(spec_files[0], first)
            spec_files = []
    if recipe_file is not None:
        config = read_config(recipe_file)
    if config is not None:
        base, models, options, source = config.base, config.models, config.options, config.source
    if spec_files:
        head = spec_from_dict(first if first is not None else {}, str(spec_files[0]), Path(spec_files[0]).parent)
        specs = [head, *(load_spec(f) for f in spec_files[1:])]
        base, models = specs[0], tuple(specs[1:])
        if source is None:
            source = RecipeSource(str(spec_files[0]), "specs")
        if base.modality is not None:
            raise ConfigError(
                f"{spec_files[0]}: the first YAML is the base, but it names modality {base.modality!r}",
                file=str(spec_files[0]),
                key="modality",
                hint="put the base LLM's YAML first: mmer merge base.yaml vision.yaml audio.yaml",
            )
    if base is None:
        raise ConfigError(
            "no base model given", hint="pass a recipe with a `base:` (mmer merge recipe.yaml), or base.yaml first"
        )
    if option_overrides:
        try:
            options = override_options(options, **option_overrides)
        except ConfigError:
            raise
        except TypeError as err:
            raise ConfigError(f"bad option: {err}") from None
    if lambdas:
        known = {m.modality for m in models}
        for modality, value in lambdas.items():
            if modality not in known:
                raise ConfigError(
                    f"λ given for modality {modality!r}, which no model has",
                    key=modality,
                    hint=_closest(modality, known),
                )
            _check_lambda(value, f"lambda for {modality}")
        models = tuple(
            dataclasses.replace(m, lambda_=lambdas[m.modality]) if m.modality in lambdas else m for m in models
        )
    return Recipe(base, models, options, source)


def _check_whole_recipe(spec_files: list[str | Path], kind: str, recipe_file: str | Path | None) -> None:
    """A recipe or mergekit config given as a positional file is the whole merge: nothing else may name models."""
    what = "a mergekit config" if kind == "mergekit" else "a recipe"
    if len(spec_files) > 1:
        raise ConfigError(
            f"{spec_files[0]} is {what} (the whole merge), but more YAML files follow it",
            file=str(spec_files[0]),
            hint=f"pass {what} alone (mmer merge {spec_files[0]} -o out/), or one spec per model: "
            "mmer merge base.yaml vision.yaml audio.yaml",
        )
    if recipe_file is not None:
        raise ConfigError(
            f"{spec_files[0]} is {what}, and --recipe {recipe_file} is another",
            file=str(spec_files[0]),
            key="recipe",
            hint="pass one of them",
        )
