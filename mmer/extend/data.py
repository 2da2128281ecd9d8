"""Training data for the three stages: padded token tensors, optional features, and a reproducible order.

One safetensors file holds a whole data set (what ``mmer extend`` reads):

=====================  ===========================  ==================================================
tensor                 shape / dtype                meaning
=====================  ===========================  ==================================================
``input_ids``          [N, T] int64                 tokens, ``placeholder_id`` where features go
``labels``             [N, T] int64, optional       targets (-100: no loss; default: the input ids
                                                    where ``attention_mask`` is 1, else -100)
``attention_mask``     [N, T] int64, optional       1 for real tokens, 0 for padding (default: all 1)
``features``           [N, F, d] float, optional    the frozen encoder's output, F per sample
``routing_mask``       [N, T] int64, optional       tokens the routing statistics count (default:
                                                    ``attention_mask``; e.g. only the prompt, as the
                                                    authors counted the first user turn)
=====================  ===========================  ==================================================

Metadata: ``format`` = ``mmer-extend-data/1`` and, with features, ``placeholder_id``.

Batches come in a fixed order per (seed, epoch), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmer.errors import CheckpointFormatError, ConfigError
from mmer.extend.losses import IGNORE_INDEX
from mmer.io.reader import read_safetensors_header

DATA_FORMAT = "mmer-extend-data/1"
TOKEN_TENSORS = ("input_ids", "labels", "attention_mask", "routing_mask")


@dataclass
class ExtendData:
    """A data set held in memory (see the module docstring for the tensors)."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    features: torch.Tensor | None = None
    routing_mask: torch.Tensor | None = None
    placeholder_id: int | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ConfigError(
                f"{self.source}: input_ids has shape {list(self.input_ids.shape)}, expected [samples, length]",
                file=self.source,
                tensor="input_ids",
            )
        shape = tuple(self.input_ids.shape)
        for name in TOKEN_TENSORS[1:]:
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ConfigError(
                    f"{self.source}: {name} has shape {list(t.shape)} but input_ids has {list(shape)}",
                    file=self.source,
                    tensor=name,
                    hint="every token tensor is [samples, length], padded alike",
                )
        if self.attention_mask is None:
            self.attention_mask = torch.ones_like(self.input_ids)
        if self.labels is None:
            self.labels = torch.where(self.attention_mask.bool(), self.input_ids, IGNORE_INDEX)
        if self.features is not None:
            if self.features.dim() != 3 or self.features.shape[0] != shape[0]:
                raise ConfigError(
                    f"{self.source}: features has shape {list(self.features.shape)}, expected [{shape[0]}, F, d]",
                    file=self.source,
                    tensor="features",
                )
            if self.placeholder_id is None:
                raise ConfigError(
                    f"{self.source}: features are given but no placeholder_id",
                    file=self.source,
                    key="placeholder_id",
                    hint="record which token id marks the feature positions",
                )
            per_sample = (self.input_ids == self.placeholder_id).sum(1)
            bad = (per_sample != self.features.shape[1]).nonzero()
            if bad.numel():
                i = int(bad[0])
                raise ConfigError(
                    f"{self.source}: sample {i} has {int(per_sample[i])} placeholder tokens "
                    f"(id {self.placeholder_id}) "
                    f"but {self.features.shape[1]} feature vectors",
                    file=self.source,
                    tensor="input_ids",
                    hint="every sample needs exactly one placeholder per feature vector",
                )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def feature_dim(self) -> int | None:
        return None if self.features is None else int(self.features.shape[-1])

    def subset(self, index: torch.Tensor) -> ExtendData:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return ExtendData(
            self.input_ids[index],
            pick(self.labels),
            pick(self.attention_mask),
            pick(self.features),
            pick(self.routing_mask),
            self.placeholder_id,
            self.source,
        )

    def split(self, fraction: float, seed: int) -> tuple[ExtendData, ExtendData]:
        """(rest, held-out) with ``fraction`` of the samples held out (at least one, never all), disjoint."""
        n = len(self)
        if n < 2:
            raise ConfigError(f"{self.source}: {n} sample(s) cannot be split into training and statistics sets")
        held = min(n - 1, max(1, round(n * fraction)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self.subset(order[held:].sort().values), self.subset(order[:held].sort().values)

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out = {
            "input_ids": self.input_ids[index],
            "labels": self.labels[index],
            "attention_mask": self.attention_mask[index],
        }
        if self.features is not None:
            out["features"] = self.features[index]
        if self.routing_mask is not None:
            out["routing_mask"] = self.routing_mask[index]
        return {k: v.to(device) for k, v in out.items()}

    def batches_per_epoch(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """The sample order of one epoch: a permutation fixed by (seed, epoch)."""
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

    def micro_batch(
        self, step: int, batch_size: int, seed: int, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Micro-batch number ``step`` of the endless shuffled stream (epochs follow each other)."""
        per_epoch = self.batches_per_epoch(batch_size)
        epoch, position = divmod(step, per_epoch)
        order = self.epoch_order(seed, epoch)
        return self.batch(order[position * batch_size : (position + 1) * batch_size], device)

    def in_order(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
        """Every sample once, in file order (evaluation, statistics)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self))), device)


def save_data(path: str | Path, data: ExtendData) -> Path:
    """Write ``data`` as one safetensors file (the format above)."""
    path = Path(path)
    tensors = {"input_ids": data.input_ids, "labels": data.labels, "attention_mask": data.attention_mask}
    if data.features is not None:
        tensors["features"] = data.features
    if data.routing_mask is not None:
        tensors["routing_mask"] = data.routing_mask
    metadata = {"format": DATA_FORMAT}
    if data.placeholder_id is not None:
        metadata["placeholder_id"] = str(data.placeholder_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def load_data(path: str | Path) -> ExtendData:
    """Read a data file, checking names, dtypes and shapes before using it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such data file", file=str(path), hint="write one with mmer.extend.save_data")
    infos, metadata = read_safetensors_header(path)
    if metadata.get("format") != DATA_FORMAT:
        raise CheckpointFormatError(
            f"{path}: not an mmer extend data file (format {metadata.get('format')!r}, expected {DATA_FORMAT!r})",
            file=str(path),
            key="format",
            hint="write it with mmer.extend.save_data",
        )
    known = set(TOKEN_TENSORS) | {"features"}
    for name, info in infos.items():
        if name not in known:
            raise ConfigError(
                f"{path}: unknown tensor {name!r}", file=str(path), tensor=name, hint=f"known: {sorted(known)}"
            )
        if name in TOKEN_TENSORS and info.dtype.is_floating_point:
            raise ConfigError(f"{path}: {name} must hold integers, not {info.dtype}", file=str(path), tensor=name)
    if "input_ids" not in infos:
        raise ConfigError(f"{path}: has no input_ids", file=str(path), tensor="input_ids")
    tensors = load_file(str(path))
    placeholder = metadata.get("placeholder_id")
    try:
        placeholder_id = None if placeholder is None else int(placeholder)
    except ValueError:
        raise ConfigError(f"{path}: placeholder_id {placeholder!r} is not an integer", file=str(path)) from None
    return ExtendData(
        tensors["input_ids"].long(),
        None if "labels" not in tensors else tensors["labels"].long(),
        None if "attention_mask" not in tensors else tensors["attention_mask"].long(),
        tensors.get("features"),
        None if "routing_mask" not in tensors else tensors["routing_mask"].long(),
        placeholder_id,
        str(path),
    )
