"""Every knob of MoExtend: frozen dataclasses with the paper's defaults, and one strict YAML loader.

Defaults are the paper's (its Table 6; docs/moextend.md §3) where it gives one, else the authors' code's; where
both are silent the choice is ours, named here and recorded in every pack's manifest. Unknown keys are errors
naming the file, the key and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmer.config import MODALITY_NAME, read_yaml_file
from mmer.errors import ConfigError

MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LAYER_CHOICES = ("extender", "all")
SOURCE_CHOICES = ("auto", "tuned", "base")
ROUTER_INITS = ("copy", "zero", "mean")
CALIBRATIONS = ("additive_mlp", "multiplicative_mlp", "additive_vector", "multiplicative_vector", "none")
NEW_PARAM_DTYPES = ("float32", "base")
AUX_SCALES = ("layer", "max")
ROUTING_TOKENS = ("all", "prompt")
PROJECTOR_KINDS = ("mlp2x_gelu", "linear")


def closest(value: object, choices: Any) -> str:
    match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f"did you mean {match[0]!r}?" if match else f"valid: {', '.join(str(c) for c in choices)}"


def _one_of(owner: str, name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{owner}.{name} = {value!r} is not one of {', '.join(allowed)}", key=name, hint=closest(value, allowed)
        )


def _positive(owner: str, name: str, value: float, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = "≥ 0" if allow_zero else "> 0"
        raise ConfigError(f"{owner}.{name} = {value} is out of range", key=name, hint=f"{name} must be {bound}")


@dataclass(frozen=True)
class TrainOptions:
    """One training stage (align, probe or finetune): optimiser, schedule, precision and bookkeeping.

    Attributes:
        steps: optimiser steps; ``None`` runs ``epochs`` over the data instead.
        epochs: passes over the data when ``steps`` is ``None`` (paper: 1 for align and finetune).
        learning_rate: AdamW peak learning rate (paper: 1e-3 align, 2e-5 finetune; code: 1e-3 probe).
        batch_size: samples per micro-batch: the *global* micro-batch, which the processes of a data-parallel
            launch share (so a run on n processes trains what one process does with the same value).
        grad_accum: micro-batches per optimiser step.
        warmup_ratio: linear warm-up share of the steps before the cosine decay (paper: 0.03).
        weight_decay: AdamW weight decay (paper: 0).
        max_grad_norm: gradient clipping (the authors' HF Trainer default, 1.0); 0 turns it off.
        aux_loss_coef: weight of the per-layer load-balancing loss (paper: 0.001).
        seed: seeds the new parameters' init, the data order and torch's RNG (code: 42).
        mixed_precision: ``auto`` is bf16 on a CUDA GPU that supports it (the paper's BF16) and ``no`` on CPU.
        device: ``auto`` uses a CUDA GPU when there is one.
        log_every: steps between loss notes to the progress sink (0: never).
        save_every: steps between resumable checkpoints (0: only when asked with a checkpoint directory at the end).
        keep_checkpoints: how many step checkpoints to keep.
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass instead of
            keeping them (transformers' ``gradient_checkpointing_enable``): less memory, about one more forward
            per step, the same gradients. May differ between a run and its resumption.
        num_workers: DataLoader worker processes reading batches (0: read in the training process).
    """

    steps: int | None = None
    epochs: float = 1.0
    learning_rate: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    aux_loss_coef: float = 0.001
    seed: int = 42
    mixed_precision: str = "auto"
    device: str = "auto"
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
        owner = "train"
        if self.steps is not None and self.steps < 1:
            raise ConfigError(
                f"steps = {self.steps} is out of range", key="steps", hint="steps must be ≥ 1 (or unset)"
            )
        _positive(owner, "epochs", self.epochs)
        _positive(owner, "learning_rate", self.learning_rate)
        for name in ("batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)} is out of range", key=name, hint=f"{name} ≥ 1")
        for name in ("log_every", "save_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} = {getattr(self, name)} is out of range", key=name, hint=f"{name} ≥ 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(
                f"warmup_ratio = {self.warmup_ratio} is out of range", key="warmup_ratio", hint="in [0, 1)"
            )
        for name in ("weight_decay", "max_grad_norm", "aux_loss_coef"):
            _positive(owner, name, getattr(self, name), allow_zero=True)
        _one_of(owner, "mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _one_of(owner, "device", self.device, DEVICES)


# The paper's per-stage defaults (Table 6; the probe's are the code's, the paper gives only 1,000 steps).
ALIGN_DEFAULTS = TrainOptions(learning_rate=1e-3, batch_size=256)
PROBE_DEFAULTS = TrainOptions(steps=1000, learning_rate=1e-3, batch_size=64)
FINETUNE_DEFAULTS = TrainOptions(learning_rate=2e-5, batch_size=128)


@dataclass(frozen=True)
class ProbeOptions:
    """The Extender (stage b): which layers get new experts.

    Attributes:
        fraction: share p of the MoE layers that get experts, the top ⌊p·L⌋ by routing change (paper: 0.5).
            At least one layer is always chosen.
        stats_samples: size of the statistics set S_e (paper: 10k samples). Held out of the data when no
            separate set is given, but never more than ``stats_fraction`` of it; a separate set larger than this
            is sampled down (seeded) to this many.
        stats_fraction: the largest share of the data held out as S_e when no separate set is given, so that
            small data keeps most of its samples for training (ours; 10 %: the paper's 10k of 665k samples are
            1.5 %). The authors' code forgot to remove S_e from the training data (their bug 7); mmer keeps the
            two sets disjoint.
        routing_tokens: which tokens the routing statistics count: ``all`` real tokens (the paper's text), or
            only the ``prompt``, the real tokens without a label (the authors' code counts the first user turn,
            the image included). A data set's own ``routing_mask`` narrows either.
        ddof: degrees of freedom of the standard deviation d_j (the code's pandas ``.std()``: 1). Any value
            gives the same ranking.
    """

    fraction: float = 0.5
    stats_samples: int = 10_000
    stats_fraction: float = 0.1
    routing_tokens: str = "all"
    ddof: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction = {self.fraction} is out of range", key="fraction", hint="p is in (0, 1]")
        if not 0.0 < self.stats_fraction < 1.0:
            raise ConfigError(
                f"stats_fraction = {self.stats_fraction} is out of range", key="stats_fraction", hint="in (0, 1)"
            )
        if self.stats_samples < 1:
            raise ConfigError(
                f"stats_samples = {self.stats_samples} is out of range", key="stats_samples", hint="≥ 1"
            )
        _one_of("selection", "routing_tokens", self.routing_tokens, ROUTING_TOKENS)
        if self.ddof not in (0, 1):
            raise ConfigError(f"ddof = {self.ddof} must be 0 or 1", key="ddof")


@dataclass(frozen=True)
class ExtendOptions:
    """How new experts are placed, initialised, calibrated and trained (stages b″ and c).

    Attributes:
        modality: name of the new modality; the modality router finds the pack by it.
        layers: ``extender`` (paper: the probe's top-p layers), ``all``, or an explicit tuple of layer indices.
        experts_per_layer: new experts per chosen layer (paper: 1); with n > 1 they copy the n most-used.
        source: which routing statistics pick the expert to copy: ``tuned`` (κ′, after router tuning: the
            code and the paper's introduction), ``base`` (κ, Eq. 8 read literally), or ``auto``: κ′ when the
            probe ran (always with ``layers = extender``), κ when the layers were given and no probe ran.
        source_expert: copy this fixed expert in every layer instead (Table 4's Copy(i) ablation).
        router_init: the new router row: ``copy`` of the source expert's row (paper), ``zero`` or ``mean`` of
            the old rows (Table 4's ablations).
        calibration: form of the calibration module on the router probabilities: ``additive_mlp`` (the code
            and Table 5's winner, Type2 a), ``multiplicative_mlp`` (Eq. 10's form; output layer zero-initialised
            here, so it starts as the identity, unlike Table 5's exploding normal init), ``additive_vector``
            (Type1 a), ``multiplicative_vector`` (Type1 b) or ``none``.
        calibration_hidden: hidden width of the calibration MLP (code: 16).
        calibration_init_std: std of the MLP's first layer (code: the model's ``initializer_range``, used when
            this is unset).
        new_params_dtype: dtype the new tensors live and train in: ``float32`` (ours: exact copies of bf16 or
            fp16 sources, full-precision optimiser updates) or the ``base`` model's dtype.
        aux_scale: the per-layer load-balancing term is scaled by the ``layer``'s own expert count (ours: a
            balanced layer scores k whatever its width) or by the ``max`` count of any layer (the code's 9).
        train_projector: train the modality projector in stage c too (the README's ``--vision_encode``).
    """

    modality: str = "vision"
    layers: str | tuple[int, ...] = "extender"
    experts_per_layer: int = 1
    source: str = "auto"
    source_expert: int | None = None
    router_init: str = "copy"
    calibration: str = "additive_mlp"
    calibration_hidden: int = 16
    calibration_init_std: float | None = None
    new_params_dtype: str = "float32"
    aux_scale: str = "layer"
    train_projector: bool = True

    def __post_init__(self) -> None:
        owner = "extend"
        if not MODALITY_NAME.fullmatch(self.modality):
            raise ConfigError(
                f"modality {self.modality!r} is not a valid name",
                key="modality",
                hint="use lower-case letters, digits, '_' or '-', starting with a letter",
            )
        if isinstance(self.layers, str):
            _one_of(owner, "layers", self.layers, LAYER_CHOICES)
        else:
            layers = tuple(self.layers)
            if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
                raise ConfigError(
                    f"layers = {self.layers!r} is not a list of layer indices",
                    key="layers",
                    hint="give extender, all, or non-negative integers such as [1, 3]",
                )
            if len(set(layers)) != len(layers):
                raise ConfigError(f"layers = {list(layers)} names a layer twice", key="layers")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        if self.experts_per_layer < 1:
            raise ConfigError(f"experts_per_layer = {self.experts_per_layer} is out of range", key="experts_per_layer")
        _one_of(owner, "source", self.source, SOURCE_CHOICES)
        if self.source_expert is not None and self.source_expert < 0:
            raise ConfigError(f"source_expert = {self.source_expert} is out of range", key="source_expert")
        _one_of(owner, "router_init", self.router_init, ROUTER_INITS)
        _one_of(owner, "calibration", self.calibration, CALIBRATIONS)
        if self.calibration_hidden < 1:
            raise ConfigError(
                f"calibration_hidden = {self.calibration_hidden} is out of range", key="calibration_hidden"
            )
        if self.calibration_init_std is not None:
            _positive(owner, "calibration_init_std", self.calibration_init_std)
        _one_of(owner, "new_params_dtype", self.new_params_dtype, NEW_PARAM_DTYPES)
        _one_of(owner, "aux_scale", self.aux_scale, AUX_SCALES)


@dataclass(frozen=True)
class ProjectorOptions:
    """The new modality's projector from encoder features to the LLM's embedding space.

    Attributes:
        kind: ``mlp2x_gelu`` (paper: Linear → GELU → Linear, LLaVA-1.5's) or ``linear``.
        in_features: width of the (frozen, external) encoder's features; taken from the data when unset.
    """

    kind: str = "mlp2x_gelu"
    in_features: int | None = None

    def __post_init__(self) -> None:
        _one_of("projector", "kind", self.kind, PROJECTOR_KINDS)
        if self.in_features is not None and self.in_features < 1:
            raise ConfigError(f"in_features = {self.in_features} is out of range", key="in_features")


@dataclass(frozen=True)
class MoExtendRecipe:
    """All three stages' options; what ``mmer extend ... --recipe`` reads and every manifest records."""

    align: TrainOptions = ALIGN_DEFAULTS
    probe: TrainOptions = PROBE_DEFAULTS
    finetune: TrainOptions = FINETUNE_DEFAULTS
    selection: ProbeOptions = field(default_factory=ProbeOptions)
    extend: ExtendOptions = field(default_factory=ExtendOptions)
    projector: ProjectorOptions = field(default_factory=ProjectorOptions)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        layers = out["extend"]["layers"]
        out["extend"]["layers"] = layers if isinstance(layers, str) else list(layers)
        return out


# ------------------------------------------------------------------------------------------------------ loading
_SECTIONS: dict[str, tuple[type, Any]] = {
    "align": (TrainOptions, ALIGN_DEFAULTS),
    "probe": (TrainOptions, PROBE_DEFAULTS),
    "finetune": (TrainOptions, FINETUNE_DEFAULTS),
    "selection": (ProbeOptions, ProbeOptions()),
    "extend": (ExtendOptions, ExtendOptions()),
    "projector": (ProjectorOptions, ProjectorOptions()),
}
_FLOAT_FIELDS = {
    "epochs",
    "learning_rate",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "aux_loss_coef",
    "fraction",
    "stats_fraction",
    "calibration_init_std",
}


_INT_FIELDS = {
    "steps",
    "batch_size",
    "grad_accum",
    "seed",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "num_workers",
    "stats_samples",
    "ddof",
    "experts_per_layer",
    "source_expert",
    "calibration_hidden",
    "in_features",
}
_BOOL_FIELDS = {"train_projector", "gradient_checkpointing"}


def _check_value(section: str, name: str, value: Any, file: str | None) -> Any:
    """Type-check one value from YAML or a flag (``None`` is left to the field's own check)."""
    where = f"{file}: " if file else ""

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where}{section}.{name} must be {expected}, got {value!r}", file=file, key=name)

    if value is None:
        return value
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if name == "layers":
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if not isinstance(value, str):
            raise wrong("extender, all or a list of layer indices")
        return value
    if not isinstance(value, str):
        raise wrong("a string")
    return value


def replace_options(options: Any, section: str, changes: Mapping[str, Any], file: str | None = None) -> Any:
    """``options`` with ``changes`` applied, refusing unknown keys (named with the closest valid one)."""
    names = {f.name for f in dataclasses.fields(options)}
    where = f"{file}: " if file else ""
    for key in changes:
        if key not in names:
            raise ConfigError(
                f"{where}unknown key {key!r} in {section}", file=file, key=str(key), hint=closest(key, sorted(names))
            )
    values = {k: _check_value(section, k, v, file) for k, v in changes.items()}
    try:
        return dataclasses.replace(options, **values)
    except ConfigError as err:
        err.file = file
        err.message = f"{where}{section}: {err.message}"
        raise
    except TypeError as err:
        raise ConfigError(f"{where}{section}: {err}", file=file) from None


def recipe_from_dict(data: Mapping[str, Any], file: str | None = None) -> MoExtendRecipe:
    """Build a recipe from parsed YAML: any subset of the sections, each any subset of its keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{file or 'recipe'} must be a mapping, got {type(data).__name__}", file=file)
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in _SECTIONS:
            raise ConfigError(
                f"unknown section {name!r} in {file or 'the MoExtend recipe'}",
                file=file,
                key=str(name),
                hint=closest(name, list(_SECTIONS)),
            )
        if not isinstance(value, Mapping):
            raise ConfigError(f"section {name!r} must be a mapping", file=file, key=str(name))
        sections[name] = replace_options(_SECTIONS[name][1], name, value, file)
    return MoExtendRecipe(**sections)


def load_moextend_recipe(path: str | Path) -> MoExtendRecipe:
    """Read a MoExtend recipe YAML (sections align, probe, finetune, selection, extend, projector)."""
    path = Path(path)
    data = read_yaml_file(path, "MoExtend recipe")
    return recipe_from_dict(data if data is not None else {}, str(path))
