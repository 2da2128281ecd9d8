"""Data sets that need not fit in memory: sharded data files read lazily, and any torch Dataset of samples.

MoExtend's users train on LLaVA-scale data (hundreds of thousands of samples, each with hundreds of encoder
feature vectors), which one in-memory file cannot hold. Both kinds here are :class:`~mmer.extend.data.
ExtendDataset`\\ s, read by the training loop through a ``torch.utils.data.DataLoader``:

* :class:`ShardedData`: a directory of ordinary data files (the single-file format of
  :mod:`mmer.extend.data`, e.g. written by :func:`save_shards`). Only the headers are read up front; a batch
  reads just its samples' rows, shard by shard, through a memory map, with **one shard open at a time**.
  The sample order and the batches are those of the same samples in one file, so a sharded run trains
  exactly what a single-file run trains.
* :class:`TorchData`: a ``torch.utils.data.Dataset`` of per-sample dicts (``input_ids`` [T] and optionally
  ``labels``, ``attention_mask``, ``routing_mask``, ``features`` [F, d]). Given a frozen ``encoder``
  module, samples carry the encoder's raw input under ``encoder_inputs`` instead, and features are computed
  on the fly on the training device, so no feature is ever stored (the paper's frozen CLIP, docs/moextend.md
  §1).

Both take text-only samples beside the modality's (:mod:`mmer.extend.data`, "Text-only samples"): a shard's
``feature_mask`` marks them (a shard without ``features`` holds text only), a torch sample simply has no
``features`` (or ``encoder_inputs``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mmer.errors import ConfigError
from mmer.extend.data import (
    ENCODER_INPUTS,
    FEATURE_MASK,
    ExtendData,
    ExtendDataset,
    check_data_header,
    collate,
    data_from_tensors,
    samples_of,
    save_data,
)
from mmer.extend.losses import IGNORE_INDEX
from mmer.io.writer import StagedOutput

__all__ = ["ENCODER_INPUTS", "SHARD_NAME", "ShardedData", "TorchData", "save_shards"]
SHARD_NAME = "shard-{:05d}.safetensors"


class ShardedData(ExtendDataset):
    """Data files (shards) read lazily as one data set; samples are numbered through the shards in name order.

    Args:
        shards: the files, in order.
        counts: samples per shard.
        placeholder_id: the shards' common placeholder token id.
        feature_dim: the shards' common feature width (``None``: no features).
        source: a name for messages (the directory).
    """

    def __init__(
        self,
        shards: Sequence[Path],
        counts: Sequence[int],
        placeholder_id: int | None,
        feature_dim: int | None,
        source: str,
    ) -> None:
        self.shards = [Path(s) for s in shards]
        self.offsets = [0]
        for count in counts:
            self.offsets.append(self.offsets[-1] + int(count))
        self.placeholder_id = placeholder_id
        self._feature_dim = feature_dim
        self.source = source
        self._open: tuple[int, Any, torch.Tensor | None, torch.Tensor | None] | None = None
        self.opened = 0  # shard openings so far (diagnostics and tests)

    @classmethod
    def open(cls, directory: str | Path) -> ShardedData:
        """Every ``*.safetensors`` file of ``directory``, checked from its header (and ``feature_mask``, a few
        bytes a sample; no token or feature is loaded)."""
        directory = Path(directory)
        shards = sorted(p for p in directory.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if not shards:
            raise ConfigError(
                f"{directory}: no data files (*.safetensors) in the directory",
                file=str(directory),
                hint="write shards with mmer.extend.save_shards, or pass one data file",
            )
        counts: list[int] = []
        # The placeholder and the feature shape and dtype of the first shard that has features: every other
        # shard with features must agree; a shard without any holds text-only samples.
        first: tuple[Path, int | None, list[int], Any] | None = None
        placeholders: dict[int, Path] = {}
        for shard in shards:
            infos, placeholder_id = check_data_header(shard)
            counts.append(int(infos["input_ids"].shape[0]))
            if placeholder_id is not None:
                placeholders.setdefault(placeholder_id, shard)
            feature = infos.get("features")
            _check_feature_rows(shard, infos)
            if feature is None:
                continue
            this = (shard, placeholder_id, list(feature.shape[1:]), feature.dtype)
            if first is None:
                first = this
            elif this[1:] != first[1:]:
                raise ConfigError(
                    f"{shard}: placeholder id {placeholder_id}, features {this[2]} ({this[3]}) differ from "
                    f"{first[0].name}'s ({first[1]}, {first[2]}, {first[3]})",
                    file=str(shard),
                    tensor="features",
                    hint="every shard of a data set has the same placeholder and feature shape and dtype",
                )
        if len(placeholders) > 1:
            (a, first_shard), (b, other) = sorted(placeholders.items(), key=lambda kv: kv[1])[:2]
            raise ConfigError(
                f"{other}: placeholder id {b} differs from {first_shard.name}'s ({a})",
                file=str(other),
                key="placeholder_id",
                hint="every shard of a data set marks feature positions with one placeholder id",
            )
        placeholder = next(iter(placeholders), None)
        feature_dim = None if first is None else int(first[2][-1])
        return cls(shards, counts, placeholder, feature_dim, str(directory))

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def feature_dim(self) -> int | None:
        return self._feature_dim

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker gets its own (closed) handle: file handles do not cross processes.
        return self.__dict__ | {"_open": None}

    def _handle(self, shard: int) -> Any:
        """The open shard ``shard``; the previously open one is closed first."""
        if self._open is not None and self._open[0] == shard:
            return self._open[1]
        self.close()
        handle = safe_open(str(self.shards[shard]), framework="pt")
        # Which rows have features, and where each one's is (a shard's feature_mask is N small integers).
        has = handle.get_tensor(FEATURE_MASK).bool() if FEATURE_MASK in handle.keys() else None
        row = None if has is None else has.long().cumsum(0) - 1
        self._open = (shard, handle, has, row)
        self.opened += 1
        return handle

    def close(self) -> None:
        """Close the open shard, if any."""
        if self._open is not None:
            handle = self._open[1]
            self._open = None
            handle.__exit__(None, None, None)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row in it) of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.source}: sample {index} of {len(self)}")
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def _read(self, shard: int, rows: list[int]) -> ExtendData:
        """``rows`` of ``shard`` (each read through the memory map, nothing else of the file), checked."""
        handle = self._handle(shard)
        assert self._open is not None
        _, _, has, feature_row = self._open
        names = [n for n in handle.keys() if n not in ("features", FEATURE_MASK)]
        tensors = {name: torch.cat([handle.get_slice(name)[row : row + 1] for row in rows]) for name in names}
        if "features" in handle.keys():
            if has is None:
                feature_rows = rows
            else:
                assert feature_row is not None
                tensors[FEATURE_MASK] = has[rows]
                feature_rows = [int(feature_row[row]) for row in rows if bool(has[row])]
            features = handle.get_slice("features")
            tensors["features"] = (
                torch.cat([features[r : r + 1] for r in feature_rows])
                if feature_rows
                else torch.zeros((0, *features.get_shape()[1:]), dtype=_FEATURE_DTYPES[features.get_dtype()])
            )
        elif self._feature_dim is not None:
            # A text-only shard of a data set with features: its samples are checked as text-only ones.
            tensors[FEATURE_MASK] = torch.zeros(len(rows), dtype=torch.bool)
        return data_from_tensors(tensors, self.placeholder_id, str(self.shards[shard]))

    def fetch(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        where = [self.locate(int(i)) for i in torch.as_tensor(index, dtype=torch.long).tolist()]
        samples: list[dict[str, torch.Tensor] | None] = [None] * len(where)
        # Shard by shard (the open one first, so consecutive batches of one shard do not reopen it).
        current = -1 if self._open is None else self._open[0]
        for shard in sorted({s for s, _ in where}, key=lambda s: (s != current, s)):
            positions = [p for p, (s, _) in enumerate(where) if s == shard]
            part = self._read(shard, [where[p][1] for p in positions]).fetch(range(len(positions)))
            for p, sample in zip(positions, samples_of(part), strict=True):
                samples[p] = sample
        return collate(samples, self.source)  # type: ignore[arg-type]


_FEATURE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _check_feature_rows(shard: Path, infos: dict[str, Any]) -> None:
    """A shard's ``features`` rows against its samples (``feature_mask`` is read: N small integers), up front."""
    feature = infos.get("features")
    if FEATURE_MASK in infos:
        if list(infos[FEATURE_MASK].shape) != [int(infos["input_ids"].shape[0])]:
            raise ConfigError(
                f"{shard}: {FEATURE_MASK} has shape {list(infos[FEATURE_MASK].shape)} for "
                f"{int(infos['input_ids'].shape[0])} samples",
                file=str(shard),
                tensor=FEATURE_MASK,
                hint="one 0/1 integer per sample: 1 when it has features, 0 for a text-only sample",
            )
        with safe_open(str(shard), framework="pt") as handle:
            has = handle.get_tensor(FEATURE_MASK)
        bad = ((has != 0) & (has != 1)).nonzero()
        if bad.numel():
            raise ConfigError(
                f"{shard}: sample {int(bad[0])} has {FEATURE_MASK} = {int(has[int(bad[0])])}",
                file=str(shard),
                tensor=FEATURE_MASK,
                hint="1 when the sample has features, 0 for a text-only sample",
            )
        rows = int(has.sum())
        if feature is None and rows:
            raise ConfigError(
                f"{shard}: {rows} samples have {FEATURE_MASK} = 1 but the shard has no features",
                file=str(shard),
                tensor="features",
                hint=f"add their features, or set {FEATURE_MASK} to 0 for text-only samples",
            )
    else:
        rows = int(infos["input_ids"].shape[0])
    if feature is not None and (len(feature.shape) != 3 or int(feature.shape[0]) != rows):
        raise ConfigError(
            f"{shard}: features has shape {list(feature.shape)}, expected [{rows}, F, d] (one row per sample "
            "with features)",
            file=str(shard),
            tensor="features",
            hint=f"features holds one row per sample; text-only samples have {FEATURE_MASK} 0 and no row",
        )


def save_shards(
    directory: str | Path, data: ExtendData, samples_per_shard: int, *, overwrite: bool = False
) -> Path:
    """Write ``data`` as a directory of data files of ``samples_per_shard`` samples each (the last may be shorter).

    ``load_data(directory)`` reads them back as one :class:`ShardedData`, in the same sample order.
    """
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard = {samples_per_shard} is out of range", hint="≥ 1")
    with StagedOutput(directory, overwrite, kind="extend-data") as staging:
        for number, start in enumerate(range(0, len(data), samples_per_shard)):
            part = data.subset(torch.arange(start, min(start + samples_per_shard, len(data))))
            save_data(staging / SHARD_NAME.format(number), part)
    return Path(directory)


def _sample_defaults(sample: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A sample's missing attention mask and labels, by the data file's rules (all real; labels = input ids)."""
    out = {k: torch.as_tensor(v) for k, v in sample.items()}
    ids = out["input_ids"]
    out["input_ids"] = ids.long()
    if "attention_mask" not in out:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "labels" not in out:
        out["labels"] = torch.where(out["attention_mask"].bool(), out["input_ids"], IGNORE_INDEX)
    for name in ("labels", "attention_mask", "routing_mask"):
        if name in out:
            out[name] = out[name].long()
    return out


class TorchData(ExtendDataset):
    """A torch ``Dataset`` of per-sample dicts as MoExtend data, features optionally computed by a frozen encoder.

    Args:
        dataset: any map-style ``torch.utils.data.Dataset`` (``len`` and ``[i]``) of dicts with ``input_ids``
            [T] and optionally ``labels``, ``attention_mask``, ``routing_mask`` ([T] each) and ``features``
            [F, d]; with an ``encoder``, ``encoder_inputs`` (the encoder's input for one sample) instead of
            ``features``. Samples may differ in length T (batches are right-padded).
        placeholder_id: the token id of the feature positions.
        encoder: a frozen module (or callable) mapping a batch of ``encoder_inputs`` to features [B, F, d]; it
            runs without gradients on the training device, after the batch got there. Its parameters are
            frozen here and it is never trained.
        source: a name for messages.
    """

    def __init__(
        self,
        dataset: Any,
        placeholder_id: int | None = None,
        encoder: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
        source: str = "<torch dataset>",
    ) -> None:
        self.dataset = dataset
        self.placeholder_id = placeholder_id
        self.encoder = encoder
        self.source = source
        self._feature_dim: int | None | bool = False  # False: not yet looked at
        if isinstance(encoder, nn.Module):
            encoder.eval()
            encoder.requires_grad_(False)

    def __len__(self) -> int:
        return len(self.dataset)

    def fetch(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long).tolist()
        samples = [_sample_defaults(self.dataset[i]) for i in index]
        if self.placeholder_id is not None:
            for i, sample in zip(index, samples, strict=True):
                self._check_placeholders(i, sample)
        return collate(samples, self.source)

    def _check_placeholders(self, i: int, sample: dict[str, torch.Tensor]) -> None:
        """A text-only sample has no placeholder; one with features has one per feature vector."""
        slots = int((sample["input_ids"] == self.placeholder_id).sum())
        if "features" in sample:
            expected, what = int(sample["features"].shape[0]), f"{int(sample['features'].shape[0])} feature vectors"
        elif ENCODER_INPUTS in sample:
            return  # the encoder decides how many; the model checks them against the placeholders
        else:
            expected, what = 0, "no features (a text-only sample)"
        if slots != expected:
            raise ConfigError(
                f"{self.source}: sample {i} has {slots} placeholder tokens (id {self.placeholder_id}) but {what}",
                file=self.source,
                tensor="input_ids",
                hint="a sample with features has one placeholder per feature vector; a text-only sample none",
            )

    def _encode(self, inputs: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        assert self.encoder is not None
        if isinstance(self.encoder, nn.Module):
            self.encoder.to(device)
        with torch.no_grad():
            features = self.encoder(inputs.to(device))
        if features.dim() != 3 or features.shape[0] != inputs.shape[0]:
            raise ConfigError(
                f"{self.source}: the encoder returned shape {list(features.shape)} for {inputs.shape[0]} samples",
                file=self.source,
                tensor="features",
                hint="the encoder must return [batch, feature vectors, width]",
            )
        return features

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
        batch = dict(batch)
        inputs = batch.pop(ENCODER_INPUTS, None)
        if inputs is not None and self.encoder is None:
            raise ConfigError(
                f"{self.source}: samples carry {ENCODER_INPUTS!r} but no encoder was given",
                file=self.source,
                tensor=ENCODER_INPUTS,
                hint="pass encoder= to TorchData, or give features instead",
            )
        if inputs is not None:
            # Only the samples that have encoder inputs are encoded (feature_mask, if any, says which).
            batch["features"] = self._encode(inputs, device)
        return {k: v.to(device) for k, v in batch.items()}

    @property
    def feature_dim(self) -> int | None:
        """The width of the first sample with features (text-only samples before it are skipped)."""
        if self._feature_dim is False:
            self._feature_dim = None
            for i in range(len(self)):
                sample = self.dataset[i]
                if "features" in sample or ENCODER_INPUTS in sample:
                    first = self.to_device(self.fetch([i]), _encoder_device(self.encoder))
                    self._feature_dim = int(first["features"].shape[-1])
                    break
        return self._feature_dim  # type: ignore[return-value]


def _encoder_device(encoder: Any) -> torch.device:
    if isinstance(encoder, nn.Module):
        for p in encoder.parameters():
            return p.device
    return torch.device("cpu")
