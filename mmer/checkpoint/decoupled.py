"""Read a decoupled checkpoint back: the public entry point later steps (reconstruct, route, add) build on.

The directory layout is fixed here (and specified in FORMAT.md) so that the pipeline that writes it and the
reader that opens it share one set of names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mmer.checkpoint import bits
from mmer.checkpoint.manifest import Manifest, ModalityRecord, SlotRecord
from mmer.errors import DecoupledFormatError
from mmer.io.layouts import LAYOUTS
from mmer.io.reader import CheckpointReader, read_safetensors_header

BASE_DIR = "base"
TAU_STAR_DIR = "tau_star"
MASKS_DIR = "masks"
COMPONENTS_DIR = "components"
PRIVATE_FILE = "llm_private.safetensors"
RECIPE_NAME = "mmer_recipe.yaml"
CARD_NAME = "README.md"

MASK_FORMAT = "mmer-mask/1"
MAX_MASK_NUMEL = 1 << 44  # 17.6 T parameters: far beyond any model, far below what would overflow


def mask_metadata(shapes: dict[str, list[int]]) -> dict[str, str]:
    """The ``__metadata__`` of a mask file: format tag, bit order and each tensor's shape.

    Known before the merge starts, so mask files stream to disk like every other output.
    """
    return {
        "format": MASK_FORMAT,
        "bit_order": bits.BIT_ORDER,
        "shapes": json.dumps(shapes, separators=(",", ":"), sort_keys=True),
    }


class MaskFile:
    """One modality's packed masks, with every claimed shape checked against the stored bytes first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise DecoupledFormatError(
                f"{path}: mask file missing", file=str(path), hint="the checkpoint is incomplete"
            )
        infos, metadata = read_safetensors_header(path)
        if metadata.get("format") != MASK_FORMAT or metadata.get("bit_order") != bits.BIT_ORDER:
            raise DecoupledFormatError(
                f"{path}: not an {MASK_FORMAT} file with {bits.BIT_ORDER} bit order", file=str(path)
            )
        try:
            shapes = json.loads(metadata["shapes"])
        except (KeyError, json.JSONDecodeError) as err:
            raise DecoupledFormatError(f"{path}: mask metadata is malformed ({err})", file=str(path)) from None
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, info in infos.items():
            shape = shapes.get(name)
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise DecoupledFormatError(f"{path}: mask {name!r} has no valid shape", file=str(path), tensor=name)
            numel = math.prod(shape)
            if numel > MAX_MASK_NUMEL or info.dtype != torch.uint8 or info.shape != (bits.packed_size(numel),):
                raise DecoupledFormatError(
                    f"{path}: mask {name!r} claims shape {shape} but stores {info.shape} {info.dtype} "
                    f"(needs ({bits.packed_size(numel)},) uint8); refused before allocating",
                    file=str(path),
                    tensor=name,
                    hint="the mask file is corrupt or hostile; re-run the merge",
                )
            self.shapes[name] = tuple(shape)
        self._handle = None

    def packed(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(f"{self.path}: no mask for {name}")
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        return self._handle.get_tensor(name)

    def mask(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        return bits.unpack(self.packed(name).to(device), self.shapes[name])


class DecoupledCheckpoint:
    """A decoupled checkpoint opened for reading: base, τ*, masks and components, one tensor at a time."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self._base: CheckpointReader | None = None
        self._base_layout = LAYOUTS.get(manifest.base.layout)
        self._tau: CheckpointReader | None = None
        self._masks: dict[str, MaskFile] = {}
        self._components: dict[str, CheckpointReader | None] = {}
        self._private: dict[str, CheckpointReader | None] = {}

    @classmethod
    def open(cls, path: str | Path) -> DecoupledCheckpoint:
        path = Path(path)
        return cls(path, Manifest.read(path))

    # ----------------------------------------------------------------------------------------------- metadata
    @property
    def modalities(self) -> list[str]:
        return list(self.manifest.modalities)

    def modality(self, name: str) -> ModalityRecord:
        try:
            return self.manifest.modalities[name]
        except KeyError:
            raise DecoupledFormatError(
                f"{self.path}: no modality {name!r} (has {', '.join(self.modalities)})", key=name
            ) from None

    @property
    def slots(self) -> list[SlotRecord]:
        return self.manifest.slots

    @property
    def merged_slots(self) -> list[SlotRecord]:
        return [s for s in self.manifest.slots if s.merged]

    # ------------------------------------------------------------------------------------------------ tensors
    def base_reader(self) -> CheckpointReader:
        if self._base is None:
            if self.manifest.base_storage == "copy":
                self._base = CheckpointReader(self.path / (self.manifest.base_dir or BASE_DIR))
            else:
                from mmer.io.resolve import resolve_model

                src = self.manifest.base
                resolved = resolve_model(src.model, src.commit if src.commit else None)
                self._base = CheckpointReader(resolved.path)
        return self._base

    def base_tensor(self, name: str) -> torch.Tensor:
        """θ_base of a canonical LLM tensor."""
        reader = self.base_reader()
        if self.manifest.base_storage == "copy" or self._base_layout is None:
            return reader.get(name)
        return reader.get(self._base_layout.to_disk(name))

    @property
    def is_single_model(self) -> bool:
        """True when the output is one merged model (mask rule ``none``) rather than base + τ* + masks."""
        return self.manifest.merged_dir is not None

    def tau_star(self, name: str) -> torch.Tensor:
        """The merged task vector τ* of a merged canonical LLM tensor."""
        if self.manifest.tau_star_dir is None:
            raise DecoupledFormatError(
                f"{self.path}: a single merged model (mask rule none) stores no τ*",
                hint="read its weights with merged_tensor() or llm_tensor()",
            )
        if self._tau is None:
            self._tau = CheckpointReader(self.path / self.manifest.tau_star_dir)
        return self._tau.get(name)

    def merged_tensor(self, name: str) -> torch.Tensor:
        """θ* of a single merged model (mask rule ``none``), canonical name."""
        if self.manifest.merged_dir is None:
            raise DecoupledFormatError(
                f"{self.path}: not a single merged model", hint="use llm_tensor(modality, name)"
            )
        if self._tau is None:
            self._tau = CheckpointReader(self.path / self.manifest.merged_dir)
        return self._tau.get(name)

    def mask_file(self, modality: str) -> MaskFile:
        if modality not in self._masks:
            mask_file = self.modality(modality).mask_file
            if mask_file is None:
                raise DecoupledFormatError(f"{self.path}: a single merged model (mask rule none) has no masks")
            self._masks[modality] = MaskFile(self.path / mask_file)
        return self._masks[modality]

    def mask(self, modality: str, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """mᵢ of one tensor, unpacked to bool."""
        return self.mask_file(modality).mask(name, device)

    def component_reader(self, modality: str) -> CheckpointReader | None:
        """The modality's own non-LLM tensors (towers, projectors), under their original names."""
        if modality not in self._components:
            record = self.modality(modality)
            self._components[modality] = (
                CheckpointReader(self.path / record.component_dir) if record.component_tensors else None
            )
        return self._components[modality]

    def private_tensor(self, modality: str, name: str) -> torch.Tensor | None:
        """Rows (or a whole tensor) of the modality's LLM that were never merged, or ``None``."""
        record = self.modality(modality)
        if not any(p.name == name for p in record.private):
            return None
        if modality not in self._private:
            from safetensors import safe_open

            self._private[modality] = safe_open(  # type: ignore[assignment]
                str(self.path / record.component_dir / PRIVATE_FILE), framework="pt", device="cpu"
            )
        return self._private[modality].get_tensor(name)  # type: ignore[union-attr]

    def llm_tensor(self, modality: str, name: str) -> torch.Tensor:
        """The modality's rebuilt LLM tensor θ̂ᵢ = θ_base + sᵢ·mᵢ∘τ*, with its private rows appended.

        Returned in the base's dtype under the canonical name; ``route.reconstruct`` maps names back. For a
        single merged model it is θ* (the same for every modality) plus the modality's private rows.
        """
        from mmer.merge.masks import reconstruct

        slot = next((s for s in self.slots if s.name == name), None)
        if slot is None:
            raise KeyError(name)
        record = self.modality(modality)
        private = {p.name: p for p in record.private}
        if name in private and private[name].row_start == 0:
            return self.private_tensor(modality, name)  # type: ignore[return-value]
        if self.is_single_model:
            out = self.merged_tensor(name)
        else:
            base = self.base_tensor(name)
            out = (
                reconstruct(base, self.tau_star(name), self.mask(modality, name), scale=record.scale)
                if slot.merged
                else base
            )
        if name in private:
            out = torch.cat([out, self.private_tensor(modality, name).to(out.dtype)])  # type: ignore[union-attr]
        return out

    def close(self) -> None:
        for reader in (self._base, self._tau, *self._components.values()):
            if reader is not None:
                reader.close()
        self._private.clear()
        self._masks.clear()

    def __enter__(self) -> DecoupledCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_decoupled(path: str | Path) -> DecoupledCheckpoint:
    """Open a decoupled checkpoint written by ``mmer merge``."""
    return DecoupledCheckpoint.open(path)
