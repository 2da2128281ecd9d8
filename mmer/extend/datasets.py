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
    ExtendData,
    ExtendDataset,
    check_data_header,
    collate,
    data_from_tensors,
    save_data,
)
from mmer.extend.losses import IGNORE_INDEX
from mmer.io.writer import StagedOutput

ENCODER_INPUTS = "encoder_inputs"
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
        self._open: tuple[int, Any] | None = None
        self.opened = 0  # shard openings so far (diagnostics and tests)

    @classmethod
    def open(cls, directory: str | Path) -> ShardedData:
        """Every ``*.safetensors`` file of ``directory``, checked from its header alone (nothing is loaded)."""
        directory = Path(directory)
        shards = sorted(p for p in directory.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if not shards:
            raise ConfigError(
                f"{directory}: no data files (*.safetensors) in the directory",
                file=str(directory),
                hint="write shards with mmer.extend.save_shards, or pass one data file",
            )
        counts: list[int] = []
        first: tuple[Path, int | None, list[int] | None, Any] | None = None
        for shard in shards:
            infos, placeholder_id = check_data_header(shard)
            counts.append(int(infos["input_ids"].shape[0]))
            feature = infos.get("features")
            shape = None if feature is None else list(feature.shape[1:])
            this = (shard, placeholder_id, shape, None if feature is None else feature.dtype)
            if first is None:
                first = this
            elif this[1:] != first[1:]:
                raise ConfigError(
                    f"{shard}: placeholder id {placeholder_id}, features {shape} ({this[3]}) differ from "
                    f"{first[0].name}'s ({first[1]}, {first[2]}, {first[3]})",
                    file=str(shard),
                    tensor="features",
                    hint="every shard of a data set has the same placeholder and feature shape and dtype",
                )
        assert first is not None
        feature_dim = None if first[2] is None else int(first[2][-1])
        return cls(shards, counts, first[1], feature_dim, str(directory))

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
        self._open = (shard, handle)
        self.opened += 1
        return handle

    def close(self) -> None:
        """Close the open shard, if any."""
        if self._open is not None:
            _, handle = self._open
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
        tensors = {
            name: torch.cat([handle.get_slice(name)[row : row + 1] for row in rows]) for name in handle.keys()
        }
        return data_from_tensors(tensors, self.placeholder_id, str(self.shards[shard]))

    def fetch(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        where = [self.locate(int(i)) for i in torch.as_tensor(index, dtype=torch.long).tolist()]
        samples: list[dict[str, torch.Tensor] | None] = [None] * len(where)
        # Shard by shard (the open one first, so consecutive batches of one shard do not reopen it).
        current = -1 if self._open is None else self._open[0]
        for shard in sorted({s for s, _ in where}, key=lambda s: (s != current, s)):
            positions = [p for p, (s, _) in enumerate(where) if s == shard]
            part = self._read(shard, [where[p][1] for p in positions]).fetch(range(len(positions)))
            for j, p in enumerate(positions):
                samples[p] = {k: v[j] for k, v in part.items()}
        return collate(samples, self.source)  # type: ignore[arg-type]


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
        samples = [_sample_defaults(self.dataset[int(i)]) for i in torch.as_tensor(index, dtype=torch.long)]
        return collate(samples, self.source)

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
        if self.encoder is not None:
            if inputs is None:
                raise ConfigError(
                    f"{self.source}: a sample has no {ENCODER_INPUTS!r} for the encoder",
                    file=self.source,
                    tensor=ENCODER_INPUTS,
                )
            batch["features"] = self._encode(inputs, device)
        elif inputs is not None:
            raise ConfigError(
                f"{self.source}: samples carry {ENCODER_INPUTS!r} but no encoder was given",
                file=self.source,
                tensor=ENCODER_INPUTS,
                hint="pass encoder= to TorchData, or give features instead",
            )
        return {k: v.to(device) for k, v in batch.items()}

    @property
    def feature_dim(self) -> int | None:
        if self._feature_dim is False:
            if len(self) == 0:
                self._feature_dim = None
            else:
                first = self.to_device(self.fetch([0]), _encoder_device(self.encoder))
                self._feature_dim = None if "features" not in first else int(first["features"].shape[-1])
        return self._feature_dim  # type: ignore[return-value]


def _encoder_device(encoder: Any) -> torch.device:
    if isinstance(encoder, nn.Module):
        for p in encoder.parameters():
            return p.device
    return torch.device("cpu")
