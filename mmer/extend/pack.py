"""The extension pack: MoExtend's result as new tensors + a manifest, loaded onto the untouched base model.

A partially extended model has layers of different widths and calibration modules, which no stock
transformers config can describe, so the result is not a standalone checkpoint (the authors saved the
trainable tensors only and had no loader: their bug 6). A pack is a directory::

    moextend_manifest.json     format, modality, base model (type, sizes, dtype, sha256 of its tensors),
                               extended layers (experts before/after, source experts, router init, d_j),
                               routing semantics (top-k, renormalisation), calibration form, projector,
                               tensor list with shapes and the file's sha256, options, training report
    extension.safetensors      the new tensors only, named as in the extended causal LM
                               (model.layers.L.mlp.new_experts.gate_up_proj [n, 2F, D], ...down_proj [n, D, F],
                               ...new_router.weight [n, D], ...calibration.*) plus projector.* tensors

:func:`load_extension_pack` checks the base against the manifest (by default the sha256 of every tensor),
wraps the listed layers and loads the tensors: the result computes exactly what the trained model computed.
An ``align`` pack holds only a projector (no layers).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mmer.errors import CheckpointFormatError, ConfigError, IncompatibleBaseError, LayoutError
from mmer.extend.block import ExtendedMoeBlock
from mmer.extend.extension import extended_blocks, is_new_parameter, remove_extension, wrap_layers
from mmer.extend.families import block_shape, decoder_layers, family_of, moe_block, moe_layer_indices
from mmer.extend.modality import MoExtendModel, Projector
from mmer.extend.options import ExtendOptions
from mmer.io.hashing import file_sha256
from mmer.io.jsonfile import read_json_file
from mmer.io.outputs import check_target
from mmer.io.reader import DTYPE_NAMES, SAFETENSORS_DTYPES, read_safetensors_header
from mmer.io.writer import StagedOutput, write_tensors
from mmer.version import __version__

PACK_MANIFEST = "moextend_manifest.json"
PACK_FORMAT = "mmer-moextend-pack"
PACK_FORMAT_VERSION = "1.0"
TENSORS_FILE = "extension.safetensors"
BASE_CHECKS = ("full", "shapes", "none")


# ------------------------------------------------------------------------------------------------------ hashing
def base_tensors(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors (state dict minus MoExtend's new ones), by name."""
    return {n: t for n, t in lm.state_dict().items() if not is_new_parameter(n)}


def base_model_hash(lm: nn.Module) -> str:
    """sha256 over the base's tensors in name order: name, dtype, shape and raw bytes of each.

    Computed from the live model, so it identifies the weights whatever file layout or shard split they came
    from (transformers writes Mixtral's experts per expert on disk but holds them fused in memory); the dtype
    is part of it, so a base loaded in another dtype than the pack was trained on is a different base.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(base_tensors(lm).items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{DTYPE_NAMES.get(t.dtype, str(t.dtype))}|{list(t.shape)}\n".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------------ writing
def check_output(output: str | Path, overwrite: bool, protect: Iterable[str | Path | None] = ()) -> None:
    """Refuse an output that may not be written (it exists, is not mmer's, or holds an input) before hours of
    training rather than after; ``protect`` is what the run reads (the base, data, checkpoints)."""
    check_target(output, overwrite, [p for p in protect if p is not None])


def _base_path(lm: nn.Module) -> list[str]:
    """The base's local directory, when it was loaded from one: a pack must never be written over it."""
    where = getattr(getattr(lm, "config", None), "_name_or_path", None)
    return [where] if isinstance(where, str) and where and os.path.isdir(where) else []


def base_record(lm: nn.Module) -> dict[str, Any]:
    """What the manifest says about the base: enough to refuse the wrong one before loading anything."""
    family = family_of(lm)
    config = lm.config
    experts, top_k, renormalise = {}, {}, {}
    for layer in moe_layer_indices(lm):
        block = moe_block(lm, layer)
        original = block.original_block() if isinstance(block, ExtendedMoeBlock) else block
        shape = block_shape(original, layer)
        experts[str(layer)] = shape.num_experts
        top_k[str(layer)] = shape.top_k
        renormalise[str(layer)] = family.renormalises(original)
    dtype = next(t for n, t in lm.named_parameters() if not is_new_parameter(n)).dtype
    return {
        "model_type": family.model_type,
        "architecture": type(lm).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "sha256": base_model_hash(lm),
        "dtype": _dtype_name(dtype),
        "num_hidden_layers": len(decoder_layers(lm)),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "moe_layers": experts,
        "top_k": top_k,
        "renormalise": renormalise,
    }


def write_pack(
    model: MoExtendModel,
    output: str | Path,
    *,
    modality: str,
    extend_options: ExtendOptions | None = None,
    selection: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    protect: Iterable[str | Path | None] = (),
) -> Path:
    """Write ``model``'s new tensors (and projector) with their manifest into ``output``, atomically.

    ``protect`` names what the run read (data, checkpoints); the base's own directory is protected anyway.
    """
    lm = model.lm
    blocks = extended_blocks(lm)
    scores = (selection or {}).get("scores", {})
    layers = [
        {
            "layer": layer,
            "base_experts": block.num_old,
            "new_experts": block.num_new,
            "source_experts": (selection or {}).get("sources", {}).get(str(layer)),
            "score": scores.get(str(layer)),
        }
        for layer, block in sorted(blocks.items())
    ]
    tensors = {n: p.detach() for n, p in lm.named_parameters() if is_new_parameter(n)}
    if model.projector is not None:
        tensors |= {f"projector.{n}": p.detach() for n, p in model.projector.named_parameters()}
    if not tensors:
        raise ConfigError("the model has neither new experts nor a projector: there is nothing to pack")
    first = next(iter(blocks.values()), None)
    manifest: dict[str, Any] = {
        "format": PACK_FORMAT,
        "format_version": PACK_FORMAT_VERSION,
        "mmer_version": __version__,
        "modality": modality,
        "stage": "extend" if blocks else "align",
        "base": base_record(lm),
        "layers": layers,
        "calibration": None
        if first is None
        else {"form": first.calibration_form, "hidden": first.calibration_hidden, "dtype": "float32"},
        "router_init": None if extend_options is None else extend_options.router_init,
        "projector": None
        if model.projector is None
        else {
            "kind": model.projector.kind,
            "in_features": model.projector.in_features,
            "placeholder_id": model.placeholder_id,
        },
        "tensors": {
            "file": TENSORS_FILE,
            "sha256": None,
            "parameters": sum(t.numel() for t in tensors.values()),
            "entries": {
                n: {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)} for n, t in sorted(tensors.items())
            },
        },
        "selection": dict(selection) if selection is not None else None,
        "training": dict(training) if training is not None else None,
        "recipe": dict(recipe) if recipe is not None else None,
    }
    inputs = [*_base_path(lm), *(p for p in protect if p is not None)]
    with StagedOutput(output, overwrite=overwrite, kind="extension-pack", protect=inputs) as staging:
        write_tensors(staging, {n: t.cpu().contiguous() for n, t in tensors.items()}, 1 << 62, prefix="extension")
        manifest["tensors"]["sha256"] = file_sha256(staging / TENSORS_FILE)
        (staging / PACK_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Path(output)


# ------------------------------------------------------------------------------------------------------ reading
def is_extension_pack(path: str | Path) -> bool:
    """Whether ``path`` looks like an extension pack (the modality router's test)."""
    return (Path(path) / PACK_MANIFEST).is_file()


def read_pack_manifest(pack_dir: str | Path) -> dict[str, Any]:
    """Read and check a pack's manifest (format, version, required keys)."""
    path = Path(pack_dir) / PACK_MANIFEST
    if not path.is_file():
        raise CheckpointFormatError(
            f"{pack_dir}: not an extension pack (no {PACK_MANIFEST})",
            file=str(path),
            hint="point at the directory `mmer extend train -o` wrote",
        )
    manifest = read_json_file(path, what="pack manifest", hint="the pack is corrupt; write it again")
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != PACK_FORMAT:
        raise CheckpointFormatError(
            f"{path}: format {found!r} is not {PACK_FORMAT!r}",
            file=str(path),
            key="format",
        )
    version = str(manifest.get("format_version", ""))
    if version.split(".")[0] != PACK_FORMAT_VERSION.split(".")[0]:
        raise CheckpointFormatError(
            f"{path}: pack format {version} is newer than this mmer reads ({PACK_FORMAT_VERSION})",
            file=str(path),
            key="format_version",
            hint="upgrade mmer",
        )
    for key in ("modality", "base", "layers", "tensors"):
        if key not in manifest:
            raise CheckpointFormatError(f"{path}: manifest has no {key!r}", file=str(path), key=key)
    _check_types(path, manifest, _MANIFEST_TYPES, "")
    _check_types(path, manifest["base"], _BASE_TYPES, "base.")
    _check_types(path, manifest["tensors"], _TENSORS_TYPES, "tensors.")
    for name, entry in manifest["tensors"]["entries"].items():
        _check_types(path, entry, _ENTRY_TYPES, f"tensors.entries.{name}.")
    for i, entry in enumerate(manifest["layers"]):
        _check_types(path, entry, _LAYER_TYPES, f"layers[{i}].")
    for key, types in (("calibration", _CALIBRATION_TYPES), ("projector", _PROJECTOR_TYPES)):
        if manifest.get(key) is not None:
            _check_types(path, manifest[key], types, f"{key}.")
    return manifest


# The types of every manifest field a reader uses, checked before any is: a hand-edited or hostile manifest
# is then one CheckpointFormatError naming the key, never a TypeError deep in loading.
_INT = (int,)
_MANIFEST_TYPES: dict[str, Any] = {
    "modality": str,
    "stage": str,
    "base": dict,
    "layers": list,
    "tensors": dict,
    "calibration": (dict, type(None)),
    "projector": (dict, type(None)),
}
_BASE_TYPES: dict[str, Any] = {
    "model_type": str,
    "architecture": str,
    "sha256": str,
    "dtype": str,
    "num_hidden_layers": _INT,
    "hidden_size": _INT,
    "moe_layers": dict,
}
_TENSORS_TYPES: dict[str, Any] = {"file": str, "sha256": (str, type(None)), "parameters": _INT, "entries": dict}
_ENTRY_TYPES: dict[str, Any] = {"dtype": str, "shape": list}
_LAYER_TYPES: dict[str, Any] = {
    "layer": _INT,
    "base_experts": _INT,
    "new_experts": _INT,
    "score": (float, int, type(None)),
}
_CALIBRATION_TYPES: dict[str, Any] = {"form": str, "hidden": _INT}
_PROJECTOR_TYPES: dict[str, Any] = {"kind": str, "in_features": _INT, "placeholder_id": (int, type(None))}


def _check_types(path: Path, data: Any, types: Mapping[str, Any], prefix: str) -> None:
    if not isinstance(data, dict):
        raise CheckpointFormatError(
            f"{path}: {prefix.rstrip('.') or 'the manifest'} is a JSON {type(data).__name__}, not an object",
            file=str(path),
            key=prefix.rstrip(".") or None,
            hint="the pack's manifest was edited or damaged; write the pack again",
        )
    for key, expected in types.items():
        value = data.get(key)
        wanted = expected if isinstance(expected, tuple) else (expected,)
        if key not in data and type(None) in wanted:
            continue
        if isinstance(value, bool) and bool not in wanted or not isinstance(value, wanted):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in wanted)
            raise CheckpointFormatError(
                f"{path}: {prefix}{key} must be {names}, not {type(value).__name__}",
                file=str(path),
                key=f"{prefix}{key}",
                hint="the pack's manifest was edited or damaged; write the pack again",
            )


def read_pack_tensors(pack_dir: str | Path, manifest: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The pack's tensors, after checking the file's sha256 and that names, dtypes and shapes match the manifest."""
    file = Path(pack_dir) / TENSORS_FILE
    if not file.is_file():
        raise CheckpointFormatError(f"{file}: missing", file=str(file), hint="the pack is incomplete; copy it again")
    expected = manifest["tensors"].get("sha256")
    if expected and file_sha256(file) != expected:
        raise CheckpointFormatError(
            f"{file}: sha256 differs from the manifest's (the file was changed or damaged)",
            file=str(file),
            hint="copy the pack again",
        )
    infos, _ = read_safetensors_header(file)
    entries = manifest["tensors"]["entries"]
    if set(infos) != set(entries):
        name = sorted(set(infos) ^ set(entries))[0]
        raise CheckpointFormatError(
            f"{file}: tensor {name!r} is in only one of the file and the manifest", file=str(file), tensor=name
        )
    for name, info in infos.items():
        entry = entries[name]
        if SAFETENSORS_DTYPES.get(entry["dtype"]) != info.dtype or list(info.shape) != entry["shape"]:
            raise CheckpointFormatError(
                f"{file}: tensor {name!r} is {info.dtype} {list(info.shape)}, the manifest says "
                f"{entry['dtype']} {entry['shape']}",
                file=str(file),
                tensor=name,
            )
    return load_file(str(file))


def check_base(lm: nn.Module, base: Mapping[str, Any], pack_dir: str | Path, check: str = "full") -> None:
    """Refuse a base that is not the one the pack was trained on (``check``: full hash, shapes only, none)."""
    if check not in BASE_CHECKS:
        raise ConfigError(f"check_base = {check!r} is not one of {', '.join(BASE_CHECKS)}", key="check_base")
    where = str(pack_dir)
    family = family_of(lm)
    if family.model_type != base["model_type"]:
        raise IncompatibleBaseError(
            f"{where}: the pack extends a {base['model_type']} model, this base is {family.model_type}",
            file=where,
            key="model_type",
            hint="load the pack onto the base it was trained on",
        )
    if check == "none":
        return
    layers = decoder_layers(lm)
    if len(layers) != base["num_hidden_layers"] or int(lm.config.hidden_size) != base["hidden_size"]:
        raise IncompatibleBaseError(
            f"{where}: the pack's base has {base['num_hidden_layers']} layers of width {base['hidden_size']}, this "
            f"one {len(layers)} of width {lm.config.hidden_size}",
            file=where,
            key="num_hidden_layers",
            hint="load the pack onto the base it was trained on",
        )
    for layer, experts in base["moe_layers"].items():
        shape = block_shape(moe_block(lm, int(layer)), int(layer))
        if shape.num_experts != experts:
            raise IncompatibleBaseError(
                f"{where}: layer {layer} of the pack's base has {experts} experts, "
                f"this base's has {shape.num_experts}",
                file=where,
                key=f"model.layers.{layer}.mlp",
                hint="load the pack onto the base it was trained on",
            )
    if check == "full":
        found = base_model_hash(lm)
        if found != base["sha256"]:
            dtype = _dtype_name(next(lm.parameters()).dtype)
            hint = (
                f"the pack was trained on a {base['dtype']} base and this one is {dtype}; "
                f"load it with dtype={base['dtype']}"
                if dtype != base["dtype"]
                else "these are different weights: load the exact base the pack was trained on "
                "(check_base_model='shapes' skips this check at your own risk)"
            )
            raise IncompatibleBaseError(
                f"{where}: the base's tensors hash to {found[:12]}…, the pack expects {base['sha256'][:12]}…",
                file=where,
                key="base.sha256",
                hint=hint,
            )


def load_base(path: str | Path, dtype: str | torch.dtype | None = None) -> nn.Module:
    """A base causal LM from a local directory with stock transformers (no remote code)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the library reports through progress sinks, never its own bars
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
    model.eval()
    return model


def load_extension_pack(
    base_model: nn.Module | str | Path,
    pack_dir: str | Path,
    *,
    check_base_model: str = "full",
) -> MoExtendModel:
    """Put a pack onto its base and return the ready model (``model(input_ids, attention_mask, features)``).

    Args:
        base_model: the untouched base causal LM, or a directory to load it from (in the pack's base dtype).
            A live model is extended in place; :func:`unload_extension` gives it back unchanged.
        pack_dir: the pack directory.
        check_base_model: ``full`` compares the sha256 of every base tensor with the manifest's, ``shapes``
            only the architecture, ``none`` only the model type.
    """
    manifest = read_pack_manifest(pack_dir)
    base = manifest["base"]
    lm = load_base(base_model, base["dtype"]) if isinstance(base_model, (str, Path)) else base_model
    if extended_blocks(lm):
        raise LayoutError(
            f"{pack_dir}: the base model already carries an extension (layers {sorted(extended_blocks(lm))})",
            hint="call mmer.extend.unload_extension(model) first; packs are applied one at a time",
        )
    check_base(lm, base, pack_dir, check_base_model)
    tensors = read_pack_tensors(pack_dir, manifest)
    calibration = manifest.get("calibration") or {"form": "none", "hidden": 1}
    options = ExtendOptions(
        modality=manifest["modality"], calibration=calibration["form"], calibration_hidden=calibration["hidden"]
    )
    layers = {int(entry["layer"]): int(entry["new_experts"]) for entry in manifest["layers"]}
    lm_tensors = {n: t for n, t in tensors.items() if not n.startswith("projector.")}
    expert_dtypes = [t.dtype for n, t in lm_tensors.items() if ".new_experts." in n]
    dtype = expert_dtypes[0] if expert_dtypes else torch.float32
    wrap_layers(lm, layers, options, dtype)
    try:
        params = {n: p for n, p in lm.named_parameters() if is_new_parameter(n)}
        _copy_into(params, lm_tensors, pack_dir)
        projector = None
        if manifest.get("projector") is not None:
            spec = manifest["projector"]
            projector = Projector(spec["kind"], int(spec["in_features"]), int(lm.config.hidden_size))
            proj = {n.removeprefix("projector."): t for n, t in tensors.items() if n.startswith("projector.")}
            projector.to(dtype=next(iter(proj.values())).dtype, device=next(lm.parameters()).device)
            _copy_into(dict(projector.named_parameters()), proj, pack_dir)
    except BaseException:
        remove_extension(lm)
        raise
    for param in [*params.values(), *([] if projector is None else projector.parameters())]:
        param.requires_grad_(False)  # a loaded pack is for inference; set_trainable() turns training back on
    model = MoExtendModel(lm, projector, None if projector is None else manifest["projector"]["placeholder_id"])
    model.manifest = manifest
    model.eval()
    return model


def _copy_into(params: Mapping[str, nn.Parameter], tensors: Mapping[str, torch.Tensor], pack_dir: str | Path) -> None:
    if set(params) != set(tensors):
        name = sorted(set(params) ^ set(tensors))[0]
        raise CheckpointFormatError(
            f"{pack_dir}: tensor {name!r} is expected by the extended model or held by the pack, but not both",
            file=str(pack_dir),
            tensor=name,
            hint="the manifest and the tensors disagree; copy the pack again",
        )
    with torch.no_grad():
        for name, param in params.items():
            tensor = tensors[name]
            if tensor.shape != param.shape:
                raise CheckpointFormatError(
                    f"{pack_dir}: tensor {name!r} has shape {list(tensor.shape)}, the model needs {list(param.shape)}",
                    file=str(pack_dir),
                    tensor=name,
                )
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))


def unload_extension(model: MoExtendModel | nn.Module) -> nn.Module:
    """Take the extension off (in place) and return the base causal LM, bit for bit as it was."""
    lm = model.lm if isinstance(model, MoExtendModel) else model
    return remove_extension(lm)
