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

Every data set the stages read is an :class:`ExtendDataset`, a map-style ``torch.utils.data.Dataset`` whose
``__getitems__`` returns a whole collated micro-batch, so the training loop reads it through a standard
``DataLoader`` (workers included). :class:`ExtendData` holds one file in memory; a directory of such files is
read lazily shard by shard and a torch ``Dataset`` of samples, with features from a frozen encoder computed
on the fly, plugs in too (:mod:`mmer.extend.datasets`), so memory need not grow with the data.

Batches come in a fixed order per (seed, epoch), whatever the data set's kind (:class:`BatchPlan`), and each
process of a data-parallel run takes a fixed share of every micro-batch, so a resumed run, and a run on more
processes with the same global batch, sees exactly the samples it would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmer.errors import CheckpointFormatError, ConfigError
from mmer.extend.losses import IGNORE_INDEX
from mmer.io.reader import read_safetensors_header

DATA_FORMAT = "mmer-extend-data/1"
TOKEN_TENSORS = ("input_ids", "labels", "attention_mask", "routing_mask")


def epoch_order(samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation fixed by (seed, epoch), the same for every kind of data."""
    return torch.randperm(samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


# Padding of token tensors of different lengths (shards padded to other lengths, samples of a torch Dataset):
# right-padding that no loss, attention or routing count sees.
PAD_VALUES = {"input_ids": 0, "labels": IGNORE_INDEX, "attention_mask": 0, "routing_mask": 0}


def collate(samples: Sequence[dict[str, torch.Tensor]], source: str = "<memory>") -> dict[str, torch.Tensor]:
    """Stack per-sample tensors into a batch; token tensors of unequal length are right-padded (``PAD_VALUES``)."""
    if not samples:
        raise ConfigError(f"{source}: an empty batch", file=source)
    keys = set(samples[0])
    for i, sample in enumerate(samples):
        if set(sample) != keys:
            raise ConfigError(
                f"{source}: sample {i} has tensors {sorted(sample)}, the first has {sorted(keys)}",
                file=source,
                hint="every sample of a data set carries the same tensors",
            )
    out: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        values = [torch.as_tensor(s[key]) for s in samples]
        if key in PAD_VALUES and len({v.shape[-1] for v in values}) > 1:
            length = max(v.shape[-1] for v in values)
            values = [
                torch.nn.functional.pad(v, (0, length - v.shape[-1]), value=PAD_VALUES[key]) for v in values
            ]
        out[key] = torch.stack(values)
    return out


class ExtendDataset(torch.utils.data.Dataset):
    """What the three stages read: a sized, indexable data set of samples that fetches whole micro-batches.

    Subclasses implement ``__len__`` and :meth:`fetch` (a collated CPU batch of the given sample indices, in
    that order); :meth:`to_device` is where a batch reaches the training device, and where a frozen encoder,
    if any, turns raw inputs into features. ``placeholder_id`` and ``source`` (a name for messages) are
    attributes.
    """

    placeholder_id: int | None = None
    source: str = "<memory>"

    def __len__(self) -> int:
        raise NotImplementedError

    def fetch(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def has_features(self) -> bool:
        """Whether batches carry (or :meth:`to_device` produces) features for a projector."""
        return self.feature_dim is not None

    @property
    def feature_dim(self) -> int | None:
        return None

    # -- the torch Dataset protocol: DataLoader calls __getitems__ with a batch sampler's index list
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.fetch([int(i)]).items()}

    def __getitems__(self, index: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.fetch(index)

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batch.items()}

    def batch(self, index: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu") -> dict[str, Any]:
        return self.to_device(self.fetch(index), device)

    def subset(self, index: torch.Tensor) -> ExtendDataset:
        """The samples at ``index`` (in that order), as a data set of the same kind where it can be."""
        return SubsetData(self, index)

    def split(self, fraction: float, seed: int, samples: int | None = None) -> tuple[ExtendDataset, ExtendDataset]:
        """(rest, held-out): ``min(samples, round(fraction·N))`` samples held out (at least one, never all).

        The held-out set is a seeded random choice, both sets keep file order, and they are disjoint.
        """
        n = len(self)
        if n < 2:
            raise ConfigError(f"{self.source}: {n} sample(s) cannot be split into training and statistics sets")
        held = round(n * fraction)
        if samples is not None:
            held = min(held, samples)
        held = min(n - 1, max(1, held))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self.subset(order[held:].sort().values), self.subset(order[:held].sort().values)

    def sample(self, samples: int, seed: int) -> ExtendDataset:
        """At most ``samples`` of the samples (a seeded random choice in file order); all of them if fewer."""
        if len(self) <= samples:
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(order[:samples].sort().values)

    def batches_per_epoch(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """The sample order of one epoch: a permutation fixed by (seed, epoch)."""
        return epoch_order(len(self), seed, epoch)

    def micro_batch(
        self, step: int, batch_size: int, seed: int, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Micro-batch number ``step`` of the endless shuffled stream (epochs follow each other)."""
        return self.batch(BatchPlan(len(self), batch_size, seed).global_indices(step), device)

    def in_order(
        self, batch_size: int, device: torch.device | str = "cpu", rank: int = 0, world: int = 1
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Every sample once, in file order (evaluation, statistics); with ``world`` > 1 only this rank's
        contiguous share (the shares of all ranks cover every sample once)."""
        first, last = rank_share(len(self), rank, world)
        for start in range(first, last, batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, last)), device)


def rank_share(samples: int, rank: int, world: int) -> tuple[int, int]:
    """[first, last) of ``samples`` items that process ``rank`` of ``world`` takes (contiguous, sizes differ by ≤1)."""
    per, extra = divmod(samples, world)
    first = rank * per + min(rank, extra)
    return first, first + per + (1 if rank < extra else 0)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples micro-batch ``i`` holds, for the whole run and for one process of it.

    The global micro-batch ``i`` is the same as one process would train on (``batch_size`` samples of the
    (seed, epoch) permutation); process ``rank`` of ``world`` takes its contiguous share. A share can be empty
    (the last micro-batch of an epoch may be shorter than the number of processes): that process then runs
    the global batch's first sample with no weight (``is_real`` is false), so every process takes part in
    every gradient exchange.
    """

    samples: int
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1

    @property
    def per_epoch(self) -> int:
        return -(-self.samples // self.batch_size)

    def global_indices(self, micro: int) -> torch.Tensor:
        epoch, position = divmod(micro, self.per_epoch)
        order = _cached_order(self.samples, self.seed, epoch)
        return order[position * self.batch_size : (position + 1) * self.batch_size]

    def share(self, micro: int) -> tuple[torch.Tensor, bool]:
        """(indices this process runs, whether they carry weight)."""
        indices = self.global_indices(micro)
        first, last = rank_share(len(indices), self.rank, self.world)
        if first == last:
            return indices[:1], False
        return indices[first:last], True


_ORDER_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _cached_order(samples: int, seed: int, epoch: int) -> torch.Tensor:
    """One epoch's permutation, computed once (the last one is kept: the loop walks epochs in order)."""
    key = (samples, seed, epoch)
    if key not in _ORDER_CACHE:
        _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = epoch_order(samples, seed, epoch)
    return _ORDER_CACHE[key]


class MicroBatchSampler(torch.utils.data.Sampler[list[int]]):
    """A DataLoader batch sampler: this process's share of micro-batches ``first`` .. ``last - 1`` of ``plan``."""

    def __init__(self, plan: BatchPlan, first: int, last: int) -> None:
        self.plan, self.first, self.last = plan, first, last

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def __iter__(self) -> Iterator[list[int]]:
        for micro in range(self.first, self.last):
            yield self.plan.share(micro)[0].tolist()


class SubsetData(ExtendDataset):
    """The samples ``index`` of another data set (held-out statistics sets of lazily read data)."""

    def __init__(self, base: ExtendDataset, index: torch.Tensor) -> None:
        self.base = base
        self.index = torch.as_tensor(index, dtype=torch.long)
        self.placeholder_id = base.placeholder_id
        self.source = base.source

    def __len__(self) -> int:
        return len(self.index)

    @property
    def feature_dim(self) -> int | None:
        return self.base.feature_dim

    def fetch(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        return self.base.fetch(self.index[torch.as_tensor(index, dtype=torch.long)].tolist())

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
        return self.base.to_device(batch, device)

    def subset(self, index: torch.Tensor) -> ExtendDataset:
        return SubsetData(self.base, self.index[torch.as_tensor(index, dtype=torch.long)])


@dataclass
class ExtendData(ExtendDataset):
    """A data set held in memory: the whole of one data file (see the module docstring for the tensors)."""

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

    # A dataclass's generated __eq__ would compare tensors; data sets compare by identity.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

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

    def fetch(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long)
        out = {
            "input_ids": self.input_ids[index],
            "labels": self.labels[index],
            "attention_mask": self.attention_mask[index],
        }
        if self.features is not None:
            out["features"] = self.features[index]
        if self.routing_mask is not None:
            out["routing_mask"] = self.routing_mask[index]
        return out


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


def check_data_header(path: Path) -> tuple[dict[str, Any], int | None]:
    """A data file's tensor infos and placeholder id, checked (format, names, dtypes) from the header alone."""
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
    placeholder = metadata.get("placeholder_id")
    try:
        placeholder_id = None if placeholder is None else int(placeholder)
    except ValueError:
        raise ConfigError(f"{path}: placeholder_id {placeholder!r} is not an integer", file=str(path)) from None
    return infos, placeholder_id


def data_from_tensors(tensors: dict[str, torch.Tensor], placeholder_id: int | None, source: str) -> ExtendData:
    """An :class:`ExtendData` from a data file's tensors (token tensors as int64), checked."""

    def tokens(name: str) -> torch.Tensor | None:
        return None if name not in tensors else tensors[name].long()

    return ExtendData(
        tokens("input_ids"),
        tokens("labels"),
        tokens("attention_mask"),
        tensors.get("features"),
        tokens("routing_mask"),
        placeholder_id,
        source,
    )


def load_data(path: str | Path) -> ExtendDataset:
    """Read a data file into memory, or open a directory of data files (shards) to be read lazily.

    A directory's ``*.safetensors`` files, in name order, are the shards of one data set
    (:class:`mmer.extend.datasets.ShardedData`; write them with :func:`mmer.extend.datasets.save_shards`).
    Names, dtypes and shapes are checked before any tensor is used.
    """
    path = Path(path)
    if path.is_dir():
        from mmer.extend.datasets import ShardedData

        return ShardedData.open(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such data file or directory",
            file=str(path),
            hint="write one with mmer.extend.save_data (or shards with mmer.extend.save_shards)",
        )
    _, placeholder_id = check_data_header(path)
    return data_from_tensors(load_file(str(path)), placeholder_id, str(path))
