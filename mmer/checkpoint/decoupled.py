"""Read a decoupled checkpoint back: the public entry point every reader (reconstruct, route, add, tune, verify,
inspect-masks) goes through.

The directory layout is fixed here and in the manifest module (and specified in FORMAT.md) so that the pipeline
that writes it and the reader that opens it share one set of names. A checkpoint is untrusted input: its
manifest is validated before use (:func:`mmer.checkpoint.manifest.read_manifest`), every file opened here must
resolve inside the checkpoint, and a base kept by reference is checked against the sha256 recorded at the merge
before anything is rebuilt from it (a changed base would rebuild wrong weights without a word).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmer.checkpoint import bits, quant
from mmer.checkpoint.manifest import BASE_DIR as BASE_DIR  # the writer's names, re-exported from one place
from mmer.checkpoint.manifest import COMPONENTS_DIR as COMPONENTS_DIR
from mmer.checkpoint.manifest import MASKS_DIR as MASKS_DIR
from mmer.checkpoint.manifest import TAU_STAR_DIR as TAU_STAR_DIR
from mmer.checkpoint.manifest import (
    Manifest,
    ModalityRecord,
    SlotRecord,
    SourceRecord,
    TauEncoding,
)
from mmer.errors import (
    CheckpointFormatError,
    DecoupledFormatError,
    MmerError,
    ModelNotFoundError,
    NonFiniteError,
    UnsafePathError,
)
from mmer.io.hashing import file_sha256, known
from mmer.io.jsonfile import loads_bounded
from mmer.io.layouts import layout_named
from mmer.io.paths import check_inside
from mmer.io.reader import DTYPE_NAMES, SAFETENSORS_DTYPES, CheckpointReader, TensorInfo, read_safetensors_header
from mmer.io.resolve import cached_blob_sha256

PRIVATE_FILE = "llm_private.safetensors"
CHANGED_HINT = (
    "the checkpoint was modified or damaged after the merge; run `mmer verify` on it, then fetch it again or "
    "re-run the merge"
)
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
    """One modality's packed masks, with every claimed shape checked against the stored bytes first.

    Any file, however hostile, ends in a :class:`DecoupledFormatError` or :class:`CheckpointFormatError`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise DecoupledFormatError(
                f"{path}: mask file missing", file=str(path), hint="the checkpoint is incomplete"
            )
        infos, metadata = read_safetensors_header(path)
        if not isinstance(metadata, dict):
            raise self._bad("its __metadata__ is not a JSON object")
        if metadata.get("format") != MASK_FORMAT or metadata.get("bit_order") != bits.BIT_ORDER:
            raise DecoupledFormatError(
                f"{path}: not an {MASK_FORMAT} file with {bits.BIT_ORDER} bit order",
                file=str(path),
                hint="the mask file is corrupt or hostile; re-run the merge",
            )
        raw = metadata.get("shapes")
        if not isinstance(raw, str):
            raise self._bad("its metadata has no `shapes` string")
        shapes = loads_bounded(raw, path, what="mask metadata `shapes`", error=DecoupledFormatError)
        if not isinstance(shapes, dict):
            raise self._bad("its metadata `shapes` is not a JSON object")
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, info in infos.items():
            shape = shapes.get(name)
            if not (
                isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 63 for d in shape)
            ):
                raise DecoupledFormatError(
                    f"{path}: mask {name!r} has no valid shape in its metadata",
                    file=str(path),
                    tensor=name,
                    hint="the mask file is corrupt or hostile; re-run the merge",
                )
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
        self._handle: Any = None

    def _bad(self, why: str) -> DecoupledFormatError:
        return DecoupledFormatError(
            f"{self.path}: mask metadata is malformed ({why})",
            file=str(self.path),
            hint="the mask file is corrupt or hostile; re-run the merge",
        )

    def packed(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(f"{self.path}: no mask for {name}")
        if self._handle is None:
            self._handle = _safe_open(self.path)
        return self._handle.get_tensor(name)

    def mask(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        return bits.unpack(self.packed(name).to(device), self.shapes[name])


def _safe_open(path: Path) -> Any:
    """safetensors' reader over a file whose header was already validated; its own errors named, not raised raw."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointFormatError(
            f"{path}: cannot be opened ({err})", file=str(path), hint="the file is corrupt; re-run the merge"
        ) from None


# ------------------------------------------------------------------------------------------ source files
@dataclass
class SourceCheck:
    """How a source model's weight files compare with the sha256 its record holds from the merge."""

    problems: list[str]  # each difference found, naming the file
    hashes: dict[str, str | None]  # sha256 by file name: where one was recorded, or free from the Hub cache
    recorded: bool  # whether any sha256 was recorded (merged with ``hash_inputs`` on): if not, nothing was checked


def check_source_files(
    record: SourceRecord, directory: Path, *, every_file: bool = False, pool: ThreadPoolExecutor | None = None
) -> SourceCheck:
    """Compare the weight files at ``directory`` with the sha256 ``record`` holds from the merge: the one rule
    that a reference base, ``mmer verify``, ``add`` and ``tune`` check a source with.

    Only the recorded names are opened (the schema makes them plain file names), and only where they resolve
    inside ``directory`` (or its Hub cache folder). With ``every_file`` the directory's weight files must also be
    exactly the recorded ones (re-merging reads them all, so an added or missing file is a difference) and each
    gets its hash in ``hashes``; otherwise a recorded file that is missing is the difference. Files are hashed on
    ``pool`` when given (a Hub-cache file is named by its sha256, so its hash costs nothing).
    """
    listed = record.files or {}
    recorded = {name: digest for name, digest in listed.items() if digest is not None}
    if every_file:
        reader = CheckpointReader(directory)
        try:
            names = sorted(f.name for f in reader.weight_files())
        finally:
            reader.close()
        if listed and set(names) != set(listed):
            differ = sorted(set(listed) - set(names)) or sorted(set(names) - set(listed))
            return SourceCheck([f"its weight files differ from those merged ({differ[0]})"], {}, bool(recorded))
    else:
        names = sorted(recorded)
    problems: list[str] = []
    futures: dict[str, Future] = {}
    own_pool = pool is None
    workers = pool or ThreadPoolExecutor(max_workers=2)
    try:
        for name in names:
            file = directory / name
            if name in recorded and not os.path.lexists(file):
                problems.append(f"{file}: missing (it was merged with sha256 {recorded[name][:12]}…)")
                continue
            try:
                real = check_inside(directory, file, what="weight file")
            except UnsafePathError as err:
                problems.append(err.message)
                continue
            cached = cached_blob_sha256(file)  # a Hub-cache blob is named by its sha256
            if cached is not None or name not in recorded:
                futures[name] = known(cached)
            else:
                futures[name] = workers.submit(file_sha256, real)
        hashes: dict[str, str | None] = {}
        for name, future in futures.items():
            try:
                hashes[name] = future.result()
            except OSError as err:
                problems.append(f"{directory / name}: cannot be read ({err.strerror or err})")
    finally:
        if own_pool:
            workers.shutdown()
    for name in names:
        actual, digest = hashes.get(name), recorded.get(name)
        if actual is not None and digest is not None and actual != digest:
            problems.append(
                f"{directory / name}: sha256 {actual[:12]}… differs from the {digest[:12]}… recorded at the merge"
            )
    return SourceCheck(problems, hashes, bool(recorded))


# -------------------------------------------------------------------------------------------- rebuilding
def slot_dtype(slot: SlotRecord) -> torch.dtype:
    """The torch dtype of a manifest slot (``"BF16"`` → ``torch.bfloat16``)."""
    try:
        return SAFETENSORS_DTYPES[slot.dtype]
    except KeyError:
        raise DecoupledFormatError(
            f"slot {slot.name!r} has unknown dtype {slot.dtype!r}", tensor=slot.name, hint="the manifest is corrupt"
        ) from None


def modality_tensor(
    shared: Callable[[], torch.Tensor],
    private: torch.Tensor | None = None,
    row_start: int = 0,
    *,
    dtype: torch.dtype | None = None,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """A modality's whole LLM tensor from its parts, by FORMAT.md's "Rebuilding a modality".

    ``private`` is what the modality kept out of the merge for this tensor: the whole tensor when ``row_start`` is
    0, else its own vocabulary rows from ``row_start`` on (``None``: nothing). A whole private tensor is the
    answer, and ``shared`` is never called; otherwise ``shared()`` gives the shared rows (θ_base + sᵢ·mᵢ∘τ* when
    merged, θ_base or θ* when not) and the private rows follow them. Every reader that rebuilds a modality
    (the checkpoint, the router's live weights, ``add``'s stand-ins, ``tune``'s candidates) goes through here,
    so none can order the parts differently.

    The rows are joined in ``dtype`` (default: the shared rows' dtype, as the checkpoint rebuilds; a stand-in
    asks for the dtype its source stored). With ``into``, the parts are copied into the first rows of that
    preallocated tensor instead, which is returned: the router rewrites its live weights in place.
    """
    if private is not None and row_start == 0:
        if into is None:
            return private
        into[: private.shape[0]].copy_(private)
        return into
    out = shared()
    if into is not None:
        into[: out.shape[0]].copy_(out)
        if private is not None:
            into[row_start : row_start + private.shape[0]].copy_(private)
        return into
    if private is None:
        return out
    dtype = dtype or out.dtype
    return torch.cat([out.to(dtype), private.to(dtype)])


class DecoupledCheckpoint:
    """A decoupled checkpoint opened for reading: base, τ*, masks and components, one tensor at a time."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self._base: CheckpointReader | None = None
        self._base_layout = layout_named(manifest.base.layout)
        self._tau: CheckpointReader | None = None
        self._masks: dict[str, MaskFile] = {}
        self._components: dict[str, CheckpointReader | None] = {}
        self._private: dict[str, Any] = {}
        self._private_infos: dict[str, dict[str, TensorInfo]] = {}
        self._reference_base: Path | None = None

    @classmethod
    def open(cls, path: str | Path) -> DecoupledCheckpoint:
        """Open the checkpoint at ``path`` once its manifest has passed its sidecar and the schema."""
        path = Path(path)
        return cls(path, Manifest.read(path))

    def inside(self, rel: str, what: str = "file") -> Path:
        """``rel`` under the checkpoint, resolved, refused unless it stays inside (a link out is refused)."""
        return check_inside(self.path, self.path / rel, what=what)

    # ----------------------------------------------------------------------------------------------- metadata
    @property
    def modalities(self) -> list[str]:
        return list(self.manifest.modalities)

    def modality(self, name: str) -> ModalityRecord:
        try:
            return self.manifest.modalities[name]
        except KeyError:
            err = DecoupledFormatError(
                f"{self.path}: no modality {name!r} (has {', '.join(self.modalities)})",
                key=name,
                hint=f"name one of: {', '.join(self.modalities)}",
            )
            err.exit_code = 2  # asking for a modality the checkpoint lacks is a usage error, not a damaged file
            raise err from None

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
                base_dir = self.manifest.base_dir or BASE_DIR
                self.inside(base_dir, "directory")
                reader = CheckpointReader(self.path / base_dir)
                to_disk = None
            else:
                reader = CheckpointReader(self.reference_base())
                to_disk = self._base_layout.to_disk if self._base_layout is not None else None
            self._check_headers(reader, "the base", self.slots, to_disk=to_disk)
            self._base = reader
        return self._base

    def reference_base(self, local_only: bool = False) -> Path:
        """Where a base kept by reference is, after checking its files against the sha256 recorded at the merge.

        Checked once per open. A base merged with ``hash_inputs`` off has nothing to check against (``mmer
        verify`` says so). With ``local_only`` a Hub base is looked for in the local cache only (nothing is
        downloaded) and :class:`ModelNotFoundError` says when it is not there.
        """
        if self._reference_base is None:
            src = self.manifest.base
            directory = _local_snapshot(src) if local_only and src.commit else None
            if directory is None:
                from mmer.io.resolve import resolve_model

                directory = resolve_model(src.model, src.commit if src.commit else None).path
            problems = check_source_files(src, directory).problems
            if problems:
                raise DecoupledFormatError(
                    f"{self.path}: its base, kept by reference, differs from the one merged: {problems[0]}"
                    + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                    file=str(directory),
                    key="base.files",
                    hint=f"fetch {src.model}"
                    + (f" at commit {src.commit}" if src.commit else "")
                    + " as it was when merged, or re-run the merge against this base",
                )
            self._reference_base = directory
        return self._reference_base

    @property
    def reference_base_checked(self) -> bool:
        """Whether a base kept by reference was found and checked in this open (so reading it fetches nothing)."""
        return self._reference_base is not None

    def base_tensor(self, name: str, *, copy: bool = True) -> torch.Tensor:
        """θ_base of a canonical LLM tensor (``copy=False``: a read-only view of the mapped file, see
        ``CheckpointReader.get``)."""
        reader = self.base_reader()
        if self.manifest.base_storage == "copy" or self._base_layout is None:
            return reader.get(name, copy=copy)
        return reader.get(self._base_layout.to_disk(name), copy=copy)

    @property
    def is_single_model(self) -> bool:
        """True when the output is one merged model (mask rule ``none``) rather than base + τ* + masks."""
        return self.manifest.merged_dir is not None

    @property
    def tau_star_encoding(self) -> TauEncoding | None:
        """How τ* is stored: ``None`` for exact, else the quantised encoding (FORMAT.md, Quantised τ*)."""
        return self.manifest.tau_star_encoding

    def tau_star(self, name: str, *, copy: bool = True) -> torch.Tensor:
        """The merged task vector τ* of a merged canonical LLM tensor (``copy`` as in :meth:`base_tensor`).

        A quantised τ* is dequantised here, one tensor per call, into a new tensor of τ*'s dtype (``copy`` does
        not apply: there is no stored τ* to view): every reader — rebuild, verify, inspect, add, the router —
        sees τ* the same way whatever the storage.
        """
        if self.manifest.tau_star_dir is None:
            raise DecoupledFormatError(
                f"{self.path}: a single merged model (mask rule none) stores no τ*",
                hint="read its weights with merged_tensor() or llm_tensor()",
            )
        encoding = self.manifest.tau_star_encoding
        if self._tau is None:
            self.inside(self.manifest.tau_star_dir, "directory")
            reader = CheckpointReader(self.path / self.manifest.tau_star_dir)
            if encoding is None:
                self._check_headers(reader, "τ*", self.merged_slots, dtypes=self.manifest.tau_star_dtype.split("/"))
            else:
                self._check_quantised_headers(reader, encoding)
            self._tau = reader
        if encoding is None:
            return self._tau.get(name, copy=copy)
        slot = self._merged_slot(name)
        codes = self._tau.get(name, copy=False)
        return quant.dequantise(
            codes,
            self._tau.get(name + quant.SCALES_SUFFIX, copy=False),
            slot.shape,
            encoding.scheme,
            encoding.group_size,
            self.tau_dtype(slot),
            file=str(self._tau.tensors[name].file),
            tensor=name,
        )

    def _merged_slot(self, name: str) -> SlotRecord:
        slot = next((s for s in self.merged_slots if s.name == name), None)
        if slot is None:
            raise KeyError(f"{self.path}: no merged tensor {name}")
        return slot

    def tau_dtype(self, slot: SlotRecord) -> torch.dtype:
        """The dtype τ* of ``slot`` has (exact) or is dequantised to: the slot's own when ``tau_star_dtype`` lists
        it, else ``tau_star_dtype``'s only entry (float32 under ``delta_dtype: float32``)."""
        listed = self.manifest.tau_star_dtype.split("/")
        if slot.dtype in listed:
            return slot_dtype(slot)
        if len(listed) == 1 and listed[0] in SAFETENSORS_DTYPES:
            return SAFETENSORS_DTYPES[listed[0]]
        raise DecoupledFormatError(
            f"{self.path}: τ* of {slot.name!r} has no dtype: tau_star_dtype {self.manifest.tau_star_dtype!r} lists "
            f"neither its slot's {slot.dtype} nor one dtype for every slot",
            file=str(self.path / "mmer_manifest.json"),
            key="tau_star_dtype",
            tensor=slot.name,
            hint=CHANGED_HINT,
        )

    def merged_tensor(self, name: str, *, copy: bool = True) -> torch.Tensor:
        """θ* of a single merged model (mask rule ``none``), canonical name (``copy`` as in :meth:`base_tensor`)."""
        if self.manifest.merged_dir is None:
            raise DecoupledFormatError(
                f"{self.path}: not a single merged model", hint="use llm_tensor(modality, name)"
            )
        if self._tau is None:
            self.inside(self.manifest.merged_dir, "directory")
            reader = CheckpointReader(self.path / self.manifest.merged_dir)
            self._check_headers(reader, "the merged model", self.slots)
            self._tau = reader
        return self._tau.get(name, copy=copy)

    def mask_file(self, modality: str) -> MaskFile:
        if modality not in self._masks:
            mask_file = self.modality(modality).mask_file
            if mask_file is None:
                raise DecoupledFormatError(f"{self.path}: a single merged model (mask rule none) has no masks")
            masks = MaskFile(self.inside(mask_file, "mask file"))
            self._check_mask_shapes(masks)
            self._masks[modality] = masks
        return self._masks[modality]

    def mask(self, modality: str, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """mᵢ of one tensor, unpacked to bool."""
        return self.mask_file(modality).mask(name, device)

    def component_reader(self, modality: str) -> CheckpointReader | None:
        """The modality's own non-LLM tensors (towers, projectors), under their original names."""
        if modality not in self._components:
            record = self.modality(modality)
            if record.component_tensors:
                self.inside(record.component_dir, "directory")
            self._components[modality] = (
                CheckpointReader(self.path / record.component_dir) if record.component_tensors else None
            )
        return self._components[modality]

    def private_infos(self, modality: str) -> dict[str, TensorInfo]:
        """The header of the modality's private tensor file, checked against its private records (no data read)."""
        if modality not in self._private_infos:
            record = self.modality(modality)
            if not record.private:
                self._private_infos[modality] = {}
                return {}
            path = self.inside(f"{record.component_dir}/{PRIVATE_FILE}", "private tensor file")
            if not path.is_file():
                raise DecoupledFormatError(
                    f"{path}: missing or not a regular file", file=str(path), hint="the checkpoint is incomplete"
                )
            infos, _ = read_safetensors_header(path)  # validated before the Rust reader sees it
            self._check_private_headers(record, path, infos)
            self._private_infos[modality] = infos
        return self._private_infos[modality]

    def private_tensor(self, modality: str, name: str) -> torch.Tensor | None:
        """Rows (or a whole tensor) of the modality's LLM that were never merged, or ``None``."""
        record = self.modality(modality)
        if not any(p.name == name for p in record.private):
            return None
        if modality not in self._private:
            self.private_infos(modality)
            self._private[modality] = _safe_open(self.inside(f"{record.component_dir}/{PRIVATE_FILE}"))
        return self._private[modality].get_tensor(name)

    def llm_tensor(self, modality: str, name: str) -> torch.Tensor:
        """The modality's rebuilt LLM tensor θ̂ᵢ = θ_base + sᵢ·mᵢ∘τ*, with its private rows appended.

        Returned in the base's dtype under the canonical name; ``route.reconstruct`` maps names back. For a
        single merged model it is θ* (the same for every modality) plus the modality's private rows.
        """
        from mmer.merge.masks import rebuild_weight
        from mmer.merge.overflow import max_abs

        slot = next((s for s in self.slots if s.name == name), None)
        if slot is None:
            raise KeyError(name)
        record = self.modality(modality)
        own = next((p for p in record.private if p.name == name), None)

        def shared() -> torch.Tensor:
            if self.is_single_model:
                return self.merged_tensor(name)
            base = self.base_tensor(name)
            if not slot.merged:
                return base
            tau, mask = self.tau_star(name), self.mask(modality, name)
            out = rebuild_weight(base, tau, mask, scale=record.scale)
            if not self.allows_nonfinite and not math.isfinite(max_abs(out)):
                self.check_rebuild(name, base, tau, {modality: record.scale}, {modality: mask})
            return out

        if own is None:
            return modality_tensor(shared)
        return modality_tensor(shared, self.private_tensor(modality, name), own.row_start)

    # ------------------------------------------------------------------------------------------------- checks
    @property
    def allows_nonfinite(self) -> bool:
        """Whether the merge was told to write weights that overflow (``--allow-nonfinite``): then so may a rebuild."""
        return self.manifest.options.get("allow_nonfinite") is True

    def check_rebuild(
        self,
        name: str,
        base: torch.Tensor,
        tau: torch.Tensor,
        scales: dict[str, float],
        masks: dict[str, torch.Tensor] | None = None,
        maxima: tuple[float, float] | None = None,
    ) -> None:
        """Refuse θ_base + sᵢ·mᵢ∘τ* that is not finite in the base dtype, by the merge's own rule.

        The merge refused exactly this (``mmer.merge.overflow.check_merged``) unless allowed to write it, so a
        checkpoint that rebuilds to ±inf has a scale, a τ* or a base that is not the one merged.
        """
        from mmer.merge.overflow import check_merged

        if self.allows_nonfinite:
            return
        labels = list(scales)
        try:
            check_merged(
                base,
                tau,
                [scales[m] for m in labels],
                tensor=name,
                file=str(self.path),
                labels=labels,
                masks=None if masks is None else [masks[m] for m in labels],
                maxima=maxima,
            )
        except NonFiniteError as err:
            raise NonFiniteError(
                f"{self.path}: {', '.join(labels)}: {err.message}",
                file=str(self.path),
                tensor=name,
                key=f"modalities.{labels[0]}.scale" if len(labels) == 1 else "modalities",
                hint="a merge never writes weights that overflow unless told to: the manifest's scale, τ* or the "
                "base was changed; " + CHANGED_HINT.split("; ", 1)[1],
            ) from None

    def _refuse(self, file: Path | str, tensor: str, why: str) -> DecoupledFormatError:
        return DecoupledFormatError(f"{file}: {tensor!r} {why}", file=str(file), tensor=tensor, hint=CHANGED_HINT)

    def _check_headers(
        self,
        reader: CheckpointReader,
        what: str,
        slots: list[SlotRecord],
        dtypes: list[str] | None = None,
        to_disk: Any = None,
    ) -> None:
        """Every slot ``reader`` must hold is there with the manifest's shape and dtype (headers only, no data).

        A header that lies (a renamed, dropped, transposed or re-typed tensor, same bytes) would otherwise be read
        as it claims: a missing tensor, a shape error deep in the rebuild, or integers rebuilt as weights.
        """
        for slot in slots:
            key = to_disk(slot.name) if to_disk is not None else slot.name
            info = reader.tensors.get(key)
            if info is None:
                if slot.reason == "buffer":
                    continue  # buffers are not stored (FORMAT.md)
                raise self._refuse(
                    reader.directory, key, f"is missing from {what}, but the manifest lists it among its slots"
                )
            wanted = dtypes or [slot.dtype]
            stored = DTYPE_NAMES.get(info.dtype, str(info.dtype))
            if list(info.shape) != list(slot.shape) or stored not in wanted:
                raise self._refuse(
                    info.file,
                    key,
                    f"is stored in {what} as {stored} {list(info.shape)}, but the manifest records "
                    f"{'/'.join(wanted)} {slot.shape}",
                )

    def _check_quantised_headers(self, reader: CheckpointReader, encoding: TauEncoding) -> None:
        """A quantised τ*'s files say the manifest's encoding, and hold each merged slot's codes and scales in the
        shapes and dtypes FORMAT.md gives for it (headers only: the scales themselves are checked as each tensor is
        dequantised). A file that disagrees is refused before a code is read as a number."""
        where = reader.directory
        for file in sorted({info.file for info in reader.tensors.values()}):
            _, metadata = read_safetensors_header(file)
            said = (metadata or {}).get("format"), (metadata or {}).get("scheme"), (metadata or {}).get("group_size")
            if said != (quant.QUANTISED_FORMAT, encoding.scheme, str(encoding.group_size)):
                raise DecoupledFormatError(
                    f"{file}: its metadata says format/scheme/group_size {said}, but the manifest records "
                    f"{quant.QUANTISED_FORMAT} {encoding.scheme} with groups of {encoding.group_size}",
                    file=str(file),
                    key="tau_star_encoding",
                    hint=CHANGED_HINT,
                )
        scheme = quant.scheme(encoding.scheme)
        expected: set[str] = set()
        for slot in self.merged_slots:
            self.tau_dtype(slot)
            for key, dtype, shape in (
                (slot.name, scheme.code_dtype, quant.codes_shape(slot.shape, encoding.scheme)),
                (slot.name + quant.SCALES_SUFFIX, torch.float32, quant.scales_shape(slot.shape, encoding.group_size)),
            ):
                expected.add(key)
                info = reader.tensors.get(key)
                if info is None:
                    raise self._refuse(where, key, f"is missing from the {encoding.scheme} τ*; {slot.name} is merged")
                if info.dtype != dtype or tuple(info.shape) != shape:
                    stored = DTYPE_NAMES.get(info.dtype, str(info.dtype))
                    raise self._refuse(
                        info.file,
                        key,
                        f"is stored as {stored} {list(info.shape)}, but {encoding.scheme} with groups of "
                        f"{encoding.group_size} stores {DTYPE_NAMES[dtype]} {list(shape)} for the slot's {slot.shape}",
                    )
        extra = sorted(set(reader.tensors) - expected)
        if extra:
            raise self._refuse(where, extra[0], "is in the quantised τ*, but the manifest lists no merged slot for it")

    def _check_mask_shapes(self, masks: MaskFile) -> None:
        """One mask per merged slot, each claiming its slot's shape (one that only fits the bytes is not enough)."""
        merged = {s.name: s for s in self.merged_slots}
        for name, shape in masks.shapes.items():
            slot = merged.get(name)
            if slot is None:
                raise self._refuse(masks.path, name, "has a mask, but the manifest lists no merged slot of that name")
            if list(shape) != list(slot.shape):
                raise self._refuse(
                    masks.path, name, f"has a mask of shape {list(shape)}, but the manifest records {slot.shape}"
                )
        missing = [name for name in merged if name not in masks.shapes]
        if missing:
            raise self._refuse(masks.path, missing[0], "is merged, but the mask file holds no mask for it")

    def _check_private_headers(self, record: ModalityRecord, path: Path, infos: dict[str, TensorInfo]) -> None:
        """Each private record is stored under its name with its shape, floating point where its slot is, and in one
        of the source's dtypes (the rows are the source's own, copied unchanged)."""
        slots = {s.name: s for s in self.slots}
        source = [d for d in record.source.dtype.split("/") if d]
        for p in record.private:
            info = infos.get(p.name)
            if info is None:
                raise self._refuse(path, p.name, "is listed among the private tensors, but the file does not hold it")
            stored = DTYPE_NAMES.get(info.dtype, str(info.dtype))
            if list(info.shape) != list(p.shape):
                raise self._refuse(path, p.name, f"is stored as {list(info.shape)}, the manifest records {p.shape}")
            dtype = slot_dtype(slots[p.name])
            if info.dtype.is_floating_point != dtype.is_floating_point:
                kind = "floating point" if dtype.is_floating_point else "an integer"
                raise self._refuse(
                    path, p.name, f"is stored as {stored}, but the base's {slots[p.name].dtype} is {kind}"
                )
            if source and stored not in source:
                raise self._refuse(
                    path,
                    p.name,
                    f"is stored as {stored}, but the manifest records its source as {record.source.dtype}",
                )

    def stored_problems(self, base: bool = True) -> list[MmerError]:
        """Every refusal the readers would raise on opening (headers only): what ``mmer verify`` reports."""
        openers: list[Any] = []
        if self.is_single_model:
            openers.append(lambda: self.merged_tensor(self.slots[0].name) if self.slots else None)
        else:
            if base:
                openers.append(self.base_reader)
            if self.merged_slots:
                openers.append(lambda: self.tau_star(self.merged_slots[0].name))
            openers += [lambda m=m: self.mask_file(m) for m in self.modalities]
        openers += [lambda m=m: self.private_infos(m) for m in self.modalities]
        found = []
        for opener in openers:
            try:
                opener()
            except MmerError as err:
                found.append(err)
        return found

    def close(self) -> None:
        for reader in (self._base, self._tau, *self._components.values()):
            if reader is not None:
                reader.close()
        self._private.clear()
        self._private_infos.clear()
        self._masks.clear()

    def __enter__(self) -> DecoupledCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_decoupled(
    path: str | Path, revision: str | None = None, *, modalities: Sequence[str] | None = None
) -> DecoupledCheckpoint:
    """Open a decoupled checkpoint written by ``mmer merge`` (its manifest checked first, see ``open``).

    ``path`` is a directory or a Hub id (``org/name``, at ``revision``): a Hub checkpoint is fetched into the
    Hugging Face cache, only the files a reader of ``modalities`` needs (all by default); offline, from the cache.
    """
    from mmer.checkpoint.hub import checkpoint_directory

    return DecoupledCheckpoint.open(checkpoint_directory(path, revision, modalities))


def _local_snapshot(src: SourceRecord) -> Path:
    """The Hub cache snapshot of ``src`` at its recorded commit, if it is already on this machine."""
    try:
        import huggingface_hub

        name = next(iter(src.files), "config.json")
        found = huggingface_hub.try_to_load_from_cache(src.model, name, revision=src.commit)
    except Exception:  # not a valid id, no cache: not at hand either way
        found = None
    if not isinstance(found, str):
        raise ModelNotFoundError(
            f"{src.model}@{src.commit}: not in the local Hugging Face cache",
            file=src.model,
            hint=f"download it first (`hf download {src.model} --revision {src.commit}`)",
        )
    return Path(found).parent
