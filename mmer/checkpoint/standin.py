"""A modality's model read back from a decoupled checkpoint, as if it were a checkpoint on disk.

When a modality's original fine-tuned model is gone, its reconstruction θ̂ᵢ = θ_base + sᵢ·mᵢ∘τ* (MMER, arXiv
2505.17110, §3.2, Eq. 3) stands in for it: ``mmer add`` re-merges the stand-in's task vector θ̂ᵢ − θ_base with
the new models' (§3.2.3). The reader serves it tensor by tensor in the source's own key names, so the merge
engine reads it like any model and nothing is rebuilt beyond the slot being read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmer.checkpoint.decoupled import PRIVATE_FILE, DecoupledCheckpoint, modality_tensor, slot_dtype
from mmer.errors import DecoupledFormatError
from mmer.io.reader import TensorInfo
from mmer.io.reader import read_safetensors_header as _read_header
from mmer.merge.masks import rebuild_weight


class SlotCache:
    """θ_base and τ* of the slot being read, shared by every stand-in (they are read model after model)."""

    def __init__(self, ckpt: DecoupledCheckpoint) -> None:
        self.ckpt = ckpt
        self._name: str | None = None
        self._base: torch.Tensor | None = None
        self._tau: torch.Tensor | None = None

    def get(self, name: str, merged: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if name != self._name:
            self._name = None
            self._base = self.ckpt.base_tensor(name)
            self._tau = self.ckpt.tau_star(name) if merged else None
            self._name = name
        return self._base, self._tau  # type: ignore[return-value]


class StandInReader:
    """One old modality's model, read back from the decoupled checkpoint as if it were a checkpoint on disk.

    Duck-types :class:`mmer.io.reader.CheckpointReader` for the merge engine: LLM tensors under the source's own
    keys are θ̂ᵢ = θ_base + sᵢ·mᵢ∘τ* (base dtype) with the private rows appended (the stored rows, in their
    stored dtype), component tensors are the stored components. Nothing is held beyond the slot being read.
    """

    format = "safetensors"

    def __init__(self, ckpt: DecoupledCheckpoint, modality: str, cache: SlotCache) -> None:
        self.ckpt = ckpt
        self.modality = modality
        self.cache = cache
        record = ckpt.modality(modality)
        self.record = record
        self.directory = ckpt.path / record.component_dir
        self.files: list[Path] = []
        slots = {s.name: s for s in ckpt.slots}
        self._slots = slots
        self._private = {p.name: p for p in record.private}
        private_dtypes: dict[str, torch.dtype] = {}
        if record.private:
            infos, _ = _read_header(self.directory / PRIVATE_FILE)
            for p in record.private:
                if p.name not in infos:
                    raise DecoupledFormatError(
                        f"{self.directory / PRIVATE_FILE}: no private tensor {p.name!r} listed in the manifest",
                        file=str(self.directory / PRIVATE_FILE),
                        tensor=p.name,
                        hint="the checkpoint is incomplete; re-run the merge",
                    )
                private_dtypes[p.name] = infos[p.name].dtype
        self.tensors: dict[str, TensorInfo] = {}
        self._canonical: dict[str, str] = {}
        where = self.directory / "(rebuilt from the decoupled checkpoint)"
        for canonical, disk in record.llm_keys.items():
            slot = slots.get(canonical)
            if slot is None:
                continue  # a buffer the base does not have: never merged, never needed
            shape = list(slot.shape)
            dtype = slot_dtype(slot)
            p = self._private.get(canonical)
            if p is not None:
                dtype = private_dtypes[canonical]
                shape = list(p.shape) if p.row_start == 0 else [p.row_start + p.shape[0], *shape[1:]]
            self.tensors[disk] = TensorInfo(disk, dtype, tuple(shape), where)
            self._canonical[disk] = canonical
        components = ckpt.component_reader(modality)
        self._components = components
        for name in record.component_tensors:
            info = None if components is None else components.tensors.get(name)
            if info is None:
                raise DecoupledFormatError(
                    f"{self.directory}: component tensor {name!r} is listed in the manifest but not stored",
                    file=str(self.directory),
                    tensor=name,
                    hint="the checkpoint is incomplete; re-run the merge",
                )
            self.tensors[name] = info

    def get(self, name: str, copy: bool = True) -> torch.Tensor:
        canonical = self._canonical.get(name)
        if canonical is None:
            return self._components.get(name)  # type: ignore[union-attr]
        slot = self._slots[canonical]

        def shared() -> torch.Tensor:
            base, tau = self.cache.get(canonical, slot.merged)
            if slot.merged:
                mask = self.ckpt.mask(self.modality, canonical)
                return rebuild_weight(base, tau, mask, scale=self.record.scale)  # type: ignore[arg-type]
            return base.clone() if copy else base

        p = self._private.get(canonical)
        if p is None:
            return modality_tensor(shared)
        rows = self.ckpt.private_tensor(self.modality, canonical)
        return modality_tensor(shared, rows, p.row_start, dtype=self.tensors[name].dtype)

    def weight_files(self) -> list[Path]:
        return []

    def release(self) -> None:
        """Nothing is mapped here (tensors are computed from the checkpoint); kept for the reader interface."""

    def close(self) -> None:
        """The checkpoint is shared by every stand-in; ``mmer.add.add_models`` closes it."""
