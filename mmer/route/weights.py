"""A decoupled checkpoint's LLM held on a device: θ_base, τ*, the packed masks and each modality's private rows.

Everything the router and expansion mode compute comes from here, with the one formula of
``mmer.merge.masks.rebuild_weight`` (θ̂ᵢ = θ_base + mᵢ∘τ*, float32 then the base's dtype) and, for text tokens in
expansion mode, :func:`rebuild_mean_weight` (θ_base + m̄∘τ*, m̄ the mean of the masks). Masks stay packed, one bit
per parameter, and are unpacked on the device (``mmer.checkpoint.bits.unpack``) only while a tensor is rebuilt;
a switch on the CPU reads the packed bits directly (:mod:`mmer.route.switch_kernel`, the same formula in one pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmer.checkpoint import bits
from mmer.checkpoint.decoupled import BASE_DIR, DecoupledCheckpoint, modality_tensor, slot_dtype
from mmer.checkpoint.manifest import SlotRecord
from mmer.errors import DecoupledFormatError
from mmer.merge.masks import rebuild_weight
from mmer.route import arena, switch_kernel

MEAN = "<mean>"  # the text-weight state of expansion mode, θ_base + m̄∘τ* (not a valid modality name)
BASE = "<base>"  # θ_base itself: the only weights an extension pack may run on (mmer.route.packs)
STATES = (MEAN, BASE)  # weight states that are not modalities


def rebuild_mean_weight(
    base: torch.Tensor,
    tau_star: torch.Tensor,
    masks: Sequence[torch.Tensor],
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """θ_base + m̄∘τ* with m̄ = (Σᵢ sᵢ·mᵢ)/n, the "merged mask" text tokens use in expansion mode (§4a, Fig. 3).

    m̄ is fractional (values 0, 1/n, …, 1 when every sᵢ = 1, as in MMER); the rescalers sᵢ of a rescaled mask
    rule (EMR) weigh each mask the way its modality's own model does. Computed in float32 and cast to the
    base's dtype like :func:`mmer.merge.masks.rebuild_weight`; with one mask it equals that function.
    """
    scales = [1.0] * len(masks) if scales is None else list(scales)
    weighted = torch.zeros(base.shape, dtype=torch.float32, device=tau_star.device)
    for mask, scale in zip(masks, scales, strict=True):
        weighted += mask if scale == 1.0 else mask * scale
    mean_mask = weighted / len(masks)
    return (base.float() + mean_mask * tau_star.float()).to(base.dtype)


REBUILD_CHUNK = 1 << 24  # entries per slice of a torch-path rebuild (a multiple of 8: whole mask bytes)


def _in_chunks(
    out: torch.Tensor,
    base: torch.Tensor,
    tau: torch.Tensor,
    packed: Sequence[torch.Tensor],
    rebuild: Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], torch.Tensor],
) -> None:
    """``out`` = ``rebuild(θ_base, τ*, masks)`` one slice of entries at a time, each slice's masks unpacked from
    its own bytes: the arithmetic is per entry, so the slices give the whole tensor's result bit for bit, and
    the temporaries (the unpacked bits, float32 copies, the sum) stay a slice's size."""
    flat_out, flat_base, flat_tau = out.reshape(-1), base.reshape(-1), tau.reshape(-1)
    numel = flat_out.numel()
    for start in range(0, numel, REBUILD_CHUNK):
        stop = min(start + REBUILD_CHUNK, numel)
        masks = [bits.unpack(p[start // 8 : (stop + 7) // 8], (stop - start,)) for p in packed]
        flat_out[start:stop] = rebuild(flat_base[start:stop], flat_tau[start:stop], masks)


@dataclass(frozen=True)
class PrivateRows:
    """Rows ``[row_start, row_start + len(tensor))`` of one modality's LLM tensor that were never merged."""

    row_start: int
    tensor: torch.Tensor


def private_dtypes(ckpt: DecoupledCheckpoint, modality: str) -> dict[str, torch.dtype]:
    """Stored dtype of each private tensor of ``modality``, read from its safetensors header only (checked by the
    loader against the manifest's records)."""
    infos = ckpt.private_infos(modality)
    return {p.name: infos[p.name].dtype for p in ckpt.modality(modality).private}


def modality_shape(ckpt: DecoupledCheckpoint, modality: str, name: str) -> tuple[int, ...]:
    """Shape of the modality's full LLM tensor ``name``: the base's, with its private rows appended (FORMAT.md)."""
    slot = next(s for s in ckpt.slots if s.name == name)
    shape = list(slot.shape)
    for p in ckpt.modality(modality).private:
        if p.name != name:
            continue
        if p.row_start == 0:
            return tuple(p.shape)
        if p.row_start != shape[0] or list(p.shape[1:]) != shape[1:]:
            raise DecoupledFormatError(
                f"{ckpt.path}: private rows of {name!r} for {modality!r} start at row {p.row_start} with shape "
                f"{p.shape}, which does not continue the base's {slot.shape}",
                tensor=name,
                key=modality,
                hint="the manifest is corrupt; re-run the merge",
            )
        shape[0] += p.shape[0]
    return tuple(shape)


def base_config_dir(ckpt: DecoupledCheckpoint) -> Path:
    """The directory holding the base LLM's ``config.json`` (or the single merged model's)."""
    if ckpt.manifest.merged_dir is not None:
        return ckpt.path / ckpt.manifest.merged_dir
    if ckpt.manifest.base_storage == "copy":
        return ckpt.path / (ckpt.manifest.base_dir or BASE_DIR)
    return ckpt.base_reader().directory


class DeviceWeights:
    """θ_base, τ*, packed masks and private rows of the chosen modalities, loaded once onto devices.

    A modality's tensor is θ_base + sᵢ·mᵢ∘τ* (sᵢ = 1 except for a rescaled rule such as EMR), private rows
    appended: what ``DecoupledCheckpoint.llm_tensor`` gives, computed on the device.

    ``device`` holds τ*, the masks and the private rows; ``base_device`` holds θ_base (the same device by
    default; ``"cpu"`` keeps the base off the GPU at the price of a host-to-device copy per rebuilt tensor).
    ``devices`` (from a device map, :mod:`mmer.route.placement`) overrides ``device`` per tensor, so each
    tensor's τ*, masks and private rows (and θ_base, unless ``base_device`` is given) sit where it is rebuilt.
    """

    def __init__(
        self,
        ckpt: DecoupledCheckpoint,
        modalities: Sequence[str],
        device: torch.device,
        base_device: torch.device | None = None,
        devices: dict[str, torch.device] | None = None,
    ) -> None:
        self.ckpt = ckpt
        self.modalities = tuple(modalities)
        self.device = device
        self.base_device = base_device
        self.slots: dict[str, SlotRecord] = {s.name: s for s in ckpt.slots}
        self.devices = {name: (devices or {}).get(name, device) for name in self.slots}
        self.dtypes = {name: slot_dtype(s) for name, s in self.slots.items()}
        # A single merged model (mask rule none) stores θ* itself: it stands in for θ_base with no τ* or masks.
        self.single_model = ckpt.is_single_model
        self.base: dict[str, torch.Tensor] = {}
        self.tau: dict[str, torch.Tensor] = {}
        # θ_base and τ* are only ever read: on the CPU they stay views of the mapped files (page-cache pages,
        # shared with every other reader and never copied); elsewhere the copy to the device is the only copy.
        for name, slot in self.slots.items():
            base = ckpt.merged_tensor(name, copy=False) if self.single_model else ckpt.base_tensor(name, copy=False)
            home = self.base_device or self.devices[name]
            pin = home.type == "cpu" and self.devices[name].type == "cuda"
            self.base[name] = base.pin_memory() if pin else base.to(home)
            if slot.merged and not self.single_model:
                self.tau[name] = ckpt.tau_star(name, copy=False).to(self.devices[name])
        arena.map_in([t for name, t in [*self.base.items(), *self.tau.items()] if t.device.type == "cpu"])
        self.scales = {m: ckpt.modality(m).scale for m in self.modalities}
        # Every rebuild from these tensors is proved finite once per load, before its first use: by the one-pass
        # kernel's own maxima during the first switch, else (check_all, or a torch-path rebuild) by reading them.
        self._unchecked = set(self.tau)
        self._same: dict[tuple[str, str, str], bool] = {}
        self.masks: dict[str, dict[str, torch.Tensor]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.private: dict[str, dict[str, PrivateRows]] = {}
        self.rows: dict[str, dict[str, tuple[int, ...]]] = {}
        for m in self.modalities:
            self.masks[m] = {}
            if self.tau:
                mask_file = ckpt.mask_file(m)
                self.masks[m] = {n: mask_file.packed(n).to(self.devices[n]) for n in self.tau}
                self.shapes.update(mask_file.shapes)
            self.private[m] = {
                p.name: PrivateRows(p.row_start, ckpt.private_tensor(m, p.name).to(self.devices[p.name]))  # type: ignore[union-attr]
                for p in ckpt.modality(m).private
            }
            self.rows[m] = {name: modality_shape(ckpt, m, name) for name in self.slots}
        for state in STATES:
            self.private[state] = {}
            self.rows[state] = {name: tuple(slot.shape) for name, slot in self.slots.items()}

    # --------------------------------------------------------------------------------------------- rebuilds
    def check(self, name: str, maxima: tuple[float, float] | None = None) -> None:
        """Refuse (``NonFiniteError``) a tensor that rebuilds to ±inf for any loaded modality; once per tensor."""
        if name in self._unchecked:
            tau = self.tau[name]
            self.ckpt.check_rebuild(name, self.base[name], tau.to(self.base[name].device), self.scales, maxima=maxima)
            self._unchecked.discard(name)

    def check_all(self) -> None:
        """Check every tensor no rebuild has checked yet (a router calls this before it is handed out)."""
        for name in sorted(self._unchecked):
            self.check(name)

    def mask(self, modality: str, name: str) -> torch.Tensor:
        """mᵢ of one tensor, unpacked to bool on the device."""
        return bits.unpack(self.masks[modality][name], self.shapes[name])

    def base_on_device(self, name: str) -> torch.Tensor:
        """θ_base of one tensor on its device (copied from the host when the base lives there)."""
        return self.base[name].to(self.devices[name], non_blocking=True)

    def cuda_devices(self) -> set[torch.device]:
        """The CUDA devices holding tensors (a switch waits for each before it reports its time)."""
        return {d for d in self.devices.values() if d.type == "cuda"}

    def shared_part(self, modality: str, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[0, V_base)`` of the modality's tensor: θ_base + mᵢ∘τ* when merged, else θ_base.

        A merged tensor is rebuilt from the packed bits with no full-size temporary: by the one-pass kernel
        (:mod:`mmer.route.switch_kernel`) where it covers the tensor, else ``rebuild_weight`` (the reference the
        kernel equals bit for bit) over slices of :data:`REBUILD_CHUNK` entries, so a GPU's switch never holds
        the unpacked mask or a float32 copy of a whole tensor. With ``into``, the result is written straight
        into its first rows and that view is returned (``modality_tensor``'s copy of it onto itself is then a
        no-op).
        """
        base = self.base_on_device(name)
        if name not in self.tau:
            return base
        tau, packed, scale = self.tau[name], self.masks[modality][name], self.scales[modality]
        out = self._output(base, into)
        if out is None:
            self.check(name)
            return rebuild_weight(base, tau, self.mask(modality, name), scale=scale)
        if switch_kernel.supports(base, tau, packed, out):
            self.check(name, switch_kernel.rebuild_into(out, base, tau, packed, scale))
            return out
        self.check(name)
        _in_chunks(out, base, tau, [packed], lambda b, t, masks: rebuild_weight(b, t, masks[0], scale=scale))
        return out

    def text_part(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """θ_base + m̄∘τ* (expansion mode's text weights), or θ_base for a tensor that was not merged; built as
        :meth:`shared_part` builds a modality's (one pass on the CPU, slices elsewhere)."""
        base = self.base_on_device(name)
        if name not in self.tau:
            return base
        self.check(name)
        tau = self.tau[name]
        scales = [self.scales[m] for m in self.modalities]
        packed = [self.masks[m][name] for m in self.modalities]
        out = self._output(base, into)
        if out is None:
            return rebuild_mean_weight(base, tau, [self.mask(m, name) for m in self.modalities], scales)
        if switch_kernel.supports_mean(base, tau, packed, out):
            switch_kernel.rebuild_mean_into(out, base, tau, packed, scales)
            return out
        _in_chunks(out, base, tau, packed, lambda b, t, masks: rebuild_mean_weight(b, t, masks, scales))
        return out

    @staticmethod
    def _output(base: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor | None:
        """Where a rebuild of ``base``'s rows goes: the first rows of ``into`` or a new tensor; None when
        ``into`` cannot take a flat write (a strided slice of a fused parameter), which the caller copies into."""
        if into is None or not into.dim():
            return torch.empty(base.shape, dtype=base.dtype, device=base.device)
        out = into[: base.shape[0]]
        ok = out.shape == base.shape and out.is_contiguous() and out.dtype == base.dtype and out.device == base.device
        return out if ok else None

    def full(self, modality: str, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """The modality's whole LLM tensor, as ``DecoupledCheckpoint.llm_tensor`` builds it (FORMAT.md), or
        written into the first rows of ``into``."""
        rows = self.private[modality].get(name)
        if rows is None:
            return modality_tensor(lambda: self.shared_part(modality, name, into), into=into)
        return modality_tensor(lambda: self.shared_part(modality, name, into), rows.tensor, rows.row_start, into=into)

    def write_into(self, target: torch.Tensor, modality: str, name: str) -> None:
        """Write the modality's tensor (or, for :data:`MEAN`, the text weights) into the first rows of ``target``.

        Always rebuilt from θ_base, never derived from what ``target`` held; :data:`BASE` writes θ_base itself.
        """
        if modality == BASE:
            base = self.base_on_device(name)
            target[: base.shape[0]].copy_(base)
            return
        if modality == MEAN:
            text = self.text_part(name, into=target if target.dim() else None)
            if text.data_ptr() != target.data_ptr():
                target[: text.shape[0]].copy_(text)
            return
        self.full(modality, name, into=target)

    def write_many(self, jobs: Sequence[tuple[torch.Tensor, str]], state: str) -> None:
        """:meth:`write_into` for every ``(target, name)`` of a switch, with the same result.

        The merged tensors the one-pass kernel covers (a modality's state, on the CPU, written straight into the
        target) are rebuilt together by ``switch_kernel.rebuild_many``, one parallel pass for the whole switch;
        their private rows, and every other tensor, are then written one by one as :meth:`write_into` does.
        """
        batch: list[tuple[torch.Tensor, str, torch.Tensor, torch.Tensor]] = []
        rest: list[tuple[torch.Tensor, str]] = []
        for target, name in jobs:
            own = self.private[state].get(name) if state not in STATES else None
            if state in STATES or name not in self.tau or (own is not None and own.row_start == 0):
                rest.append((target, name))
                continue
            base, tau, packed = self.base_on_device(name), self.tau[name], self.masks[state][name]
            out = self._output(base, target) if target.dim() else None  # a scalar's rebuild is copied in
            if (
                out is None
                or not (base.is_contiguous() and tau.is_contiguous() and packed.is_contiguous())
                or not switch_kernel.supports(base, tau, packed, out)
            ):
                rest.append((target, name))
                continue
            batch.append((target, name, out, base))
        scale = self.scales.get(state, 1.0)
        maxima = switch_kernel.rebuild_many([(o, b, self.tau[n], self.masks[state][n], scale) for _, n, o, b in batch])
        for (target, name, out, _), tops in zip(batch, maxima, strict=True):
            self.check(name, tops)
            own = self.private[state].get(name)
            if own is not None:  # the shared rows are in place: modality_tensor adds the private ones after them
                modality_tensor(lambda out=out: out, own.tensor, own.row_start, into=target)
        for target, name in rest:
            self.write_into(target, state, name)

    def same_weights(self, a: str, b: str, name: str) -> bool:
        """Whether modalities ``a`` and ``b`` have bit-identical tensors ``name`` (same mask, no private rows)."""
        if name in self.private[a] or name in self.private[b]:
            return False
        if name not in self.tau or a == b:
            return True
        if MEAN in (a, b) or BASE in (a, b):
            return False
        key = (a, b, name) if a <= b else (b, a, name)
        if key not in self._same:  # compared once per pair: masks never change after loading
            self._same[key] = self.scales[a] == self.scales[b] and torch.equal(
                self.masks[a][name], self.masks[b][name]
            )
        return self._same[key]

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by part: base, tau_star, masks, private."""
        return {
            "base": sum(t.nbytes for t in self.base.values()),
            "tau_star": sum(t.nbytes for t in self.tau.values()),
            "masks": sum(t.nbytes for per in self.masks.values() for t in per.values()),
            "private": sum(r.tensor.nbytes for per in self.private.values() for r in per.values()),
        }
