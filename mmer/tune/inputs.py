"""What is tuned: a recipe as given, or a decoupled checkpoint's recipe with its original models found (τᵢ
is not stored, so tuning needs them) and checked against the sha256 its manifest recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from mmer.checkpoint.decoupled import check_source_files, load_decoupled
from mmer.checkpoint.sources import (
    base_read_spec,
    base_spec,
    check_source_names,
    checkpoint_options,
    original_spec,
    pinned_spec,
)
from mmer.config import Recipe
from mmer.errors import ConfigError, ModelNotFoundError
from mmer.io.resolve import resolve_model


def tune_inputs(
    recipe: Recipe | None,
    checkpoint: str | Path | None,
    sources: Mapping[str, str | Path] | None,
    device: str | None,
    check: bool,
) -> tuple[Recipe, Recipe, tuple[str, float] | None]:
    """(the recipe to read from, the recipe to write back, (τ* directory, its K) to reuse)."""
    if (recipe is None) == (checkpoint is None):
        raise ConfigError(
            "give either a recipe (base and model YAMLs) or a decoupled checkpoint to tune",
            key="checkpoint",
            hint="mmer tune base.yaml vision.yaml audio.yaml, or mmer tune --checkpoint merged/",
        )
    if recipe is not None:
        if sources:
            raise ConfigError("--source goes with --checkpoint", key="source", hint="edit the model YAMLs instead")
        if device is not None:
            recipe = replace(recipe, options=replace(recipe.options, device=device))
        return recipe, recipe, None
    ckpt = load_decoupled(checkpoint)  # type: ignore[arg-type]
    try:
        if ckpt.is_single_model:
            raise ConfigError(
                f"{checkpoint} is a single merged model: no masks, no λ",
                key="checkpoint",
                hint="tune a checkpoint with masks, or tune from the model YAMLs",
            )
        check_source_names(ckpt, sources)
        options = checkpoint_options(ckpt, device=device)
        read, spec = [], []
        missing = []
        for name in ckpt.modalities:
            explicit = (sources or {}).get(name)
            found = original_spec(ckpt, name, explicit, local_only=False)
            if found is None:
                missing.append(f"{name} ({ckpt.modality(name).source.model})")
                continue
            if check:
                try:
                    resolved = resolve_model(found.model, found.revision)
                except ModelNotFoundError as err:
                    raise ConfigError(
                        f"{name}: {err.message}", file=err.file, key=name, hint=f"pass --source {name}=PATH"
                    ) from None
                problems = check_source_files(ckpt.modality(name).source, resolved.path, every_file=True).problems
                if problems:
                    raise ConfigError(
                        f"{name}: {resolved.path} is not the model {checkpoint} was merged from: {problems[0]}",
                        file=str(resolved.path),
                        key=name,
                        hint="point --source to that model, or pass --no-check-sources",
                    )
            read.append(found)
            spec.append(found if explicit is not None else pinned_spec(name, ckpt.modality(name)))
        if missing:
            raise ConfigError(
                f"tuning needs each modality's original model (τᵢ is not stored in a decoupled checkpoint, so masks "
                f"at another λ cannot be derived from it); not found: {', '.join(missing)}",
                key="source",
                hint="pass --source MODALITY=PATH for each",
            )
        tau_dir = str(ckpt.path / ckpt.manifest.tau_star_dir)  # type: ignore[operator]
        return (
            Recipe(base_read_spec(ckpt), tuple(read), options),
            Recipe(base_spec(ckpt), tuple(spec), options),
            None if ckpt.tau_star_encoding is not None else (tau_dir, options.k),  # reuse only an exact τ*
        )
    finally:
        ckpt.close()
