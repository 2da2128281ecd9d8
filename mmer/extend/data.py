"""Training data for the three stages: padded token tensors, optional features, and a reproducible order.

One safetensors file holds a whole data set (what ``mmer extend`` reads):

=====================  ===========================  ==================================================
tensor                 shape / dtype                meaning
=====================  ===========================  ==================================================
``input_ids``          [N, T] int64                 tokens, ``placeholder_id`` where features go
``labels``             [N, T] int64, optional       targets (-100: no loss; default: the input ids
                                                    where ``attention_mask`` is 1, else -100)
``attention_mask``     [N, T] int64, optional       1 for real tokens, 0 for padding (default: all 1)
``features``           [M, F, d] float, optional    the frozen encoder's output, F per sample, one row
                                                    per sample that has features, in sample order
``feature_mask``       [N] int64 or bool, optional  1 for a sample with features, 0 for a text-only one
                                                    (default: every sample has features, M = N)
``routing_mask``       [N, T] int64, optional       tokens the routing statistics count (default:
                                                    ``attention_mask``; e.g. only the prompt, as the
                                                    authors counted the first user turn)
=====================  ===========================  ==================================================

Metadata: ``format`` = ``mmer-extend-data/1`` and, with features, ``placeholder_id``.

**Text-only samples.** MoExtend's data mixes text-only samples into the modality's (LLaVA-665k holds ShareGPT's
text conversations beside its image ones). A text-only sample has ``feature_mask`` 0, no placeholder token and
no row in ``features``; the rows belong, in order, to the samples with ``feature_mask`` 1, so text-only samples
cost no feature storage. A batch follows the same rule (:func:`pack_features`): its ``features`` are those of
its samples that have them, in batch order, and ``feature_mask`` says which those are when some lack them;
the model writes them over the placeholders in that order (:mod:`mmer.extend.modality`).

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
FEATURE_MASK = "feature_mask"
FEATURE_TENSORS = ("features", FEATURE_MASK)  # per-sample, packed: see "Text-only samples" above


def epoch_order(samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation fixed by (seed, epoch), the same for every kind of data."""
    return torch.randperm(samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


# Padding of token tensors of different lengths (shards padded to other lengths, samples of a torch Dataset):
# right-padding that no loss, attention or routing count sees.
PAD_VALUES = {"input_ids": 0, "labels": IGNORE_INDEX, "attention_mask": 0, "routing_mask": 0}


# A per-sample tensor that only the samples with features carry: the features themselves, or (a frozen encoder
# computing them on the fly, mmer.extend.datasets.TorchData) the encoder's raw input.
ENCODER_INPUTS = "encoder_inputs"
PER_FEATURE_SAMPLE = ("features", ENCODER_INPUTS)


def pack_features(has: torch.Tensor, stacked: torch.Tensor | None, key: str = "features") -> dict[str, torch.Tensor]:
    """A batch's feature entries, in the one form every batch has: ``stacked`` holds the rows of the samples
    whose ``has`` is true, in batch order; ``feature_mask`` is there only when some sample has none."""
    if stacked is None or not bool(has.any()):
        return {}
    if bool(has.all()):
        return {key: stacked}
    return {key: stacked, FEATURE_MASK: has.bool()}


def samples_of(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A batch split into per-sample dicts (:func:`collate`'s inverse); a text-only sample has no features."""
    size = int(batch["input_ids"].shape[0])
    has = batch.get(FEATURE_MASK)
    has = torch.ones(size, dtype=torch.bool) if has is None else has.bool()
    row = (has.long().cumsum(0) - 1).tolist()
    samples: list[dict[str, torch.Tensor]] = []
    for j in range(size):
        sample = {k: v[j] for k, v in batch.items() if k not in PER_FEATURE_SAMPLE and k != FEATURE_MASK}
        for key in PER_FEATURE_SAMPLE:
            if key in batch and bool(has[j]):
                sample[key] = batch[key][row[j]]
        samples.append(sample)
    return samples


def collate(samples: Sequence[dict[str, torch.Tensor]], source: str = "<memory>") -> dict[str, torch.Tensor]:
    """Stack per-sample tensors into a batch; token tensors of unequal length are right-padded (``PAD_VALUES``).

    A sample without ``features`` (or ``encoder_inputs``) is a text-only one: the batch carries the features
    of the samples that have them (:func:`pack_features`).
    """
    if not samples:
        raise ConfigError(f"{source}: an empty batch", file=source)
    keys = set(samples[0]) - set(PER_FEATURE_SAMPLE)
    for i, sample in enumerate(samples):
        if set(sample) - set(PER_FEATURE_SAMPLE) != keys:
            raise ConfigError(
                f"{source}: sample {i} has tensors {sorted(sample)}, the first has {sorted(samples[0])}",
                file=source,
                hint="every sample of a data set carries the same tensors (only features may be left out, by "
                "text-only samples)",
            )
        if FEATURE_MASK in sample:
            raise ConfigError(
                f"{source}: sample {i} carries {FEATURE_MASK!r}",
                file=source,
                tensor=FEATURE_MASK,
                hint="a sample has features by carrying them; leave them out for a text-only sample",
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
    carriers = [k for k in PER_FEATURE_SAMPLE if any(k in s for s in samples)]
    if len(carriers) > 1:
        raise ConfigError(
            f"{source}: some samples carry features and others {ENCODER_INPUTS!r}",
            file=source,
            tensor=ENCODER_INPUTS,
            hint="give every sample features, or every sample the encoder's input (text-only samples neither)",
        )
    for key in carriers:
        has = torch.tensor([key in s for s in samples])
        values = [torch.as_tensor(s[key]) for s in samples if key in s]
        for i, s in enumerate(samples):
            if key in s and torch.as_tensor(s[key]).shape != values[0].shape:
                raise ConfigError(
                    f"{source}: sample {i}'s {key} has shape {list(torch.as_tensor(s[key]).shape)}, another's "
                    f"{list(values[0].shape)}",
                    file=source,
                    tensor=key,
                    hint="every sample with features has as many feature vectors of one width",
                )
        out |= pack_features(has, torch.stack(values), key)
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
    """A data set held in memory: the whole of one data file (see the module docstring for the tensors).

    ``features`` has one row per sample whose ``feature_mask`` is true (every sample when it is ``None``).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    features: torch.Tensor | None = None
    routing_mask: torch.Tensor | None = None
    placeholder_id: int | None = None
    source: str = "<memory>"
    feature_mask: torch.Tensor | None = None

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
        has = self._check_feature_mask(shape[0])
        if self.features is not None:
            rows = shape[0] if has is None else int(has.sum())
            if self.features.dim() != 3 or self.features.shape[0] != rows:
                expected = f"[{rows}, F, d]" + ("" if has is None else f" (one row per sample with {FEATURE_MASK} 1)")
                raise ConfigError(
                    f"{self.source}: features has shape {list(self.features.shape)}, expected {expected}",
                    file=self.source,
                    tensor="features",
                    hint=f"features holds one row per sample; for text-only samples give {FEATURE_MASK} (0 for "
                    "them) and leave their rows out"
                    if has is None
                    else f"give every sample with {FEATURE_MASK} 1 its features, in sample order, and no other rows",
                )
            if self.placeholder_id is None:
                raise ConfigError(
                    f"{self.source}: features are given but no placeholder_id",
                    file=self.source,
                    key="placeholder_id",
                    hint="record which token id marks the feature positions",
                )
        if self.placeholder_id is not None and (self.features is not None or has is not None):
            self._check_placeholders(has)
        # One form for one meaning: "every sample has features" and "none has, and there are none" need no mask.
        if has is not None and (bool(has.all()) if self.features is not None else not bool(has.any())):
            has = None
        self.feature_mask = has
        self._feature_row = None if has is None else has.long().cumsum(0) - 1

    def _check_feature_mask(self, samples: int) -> torch.Tensor | None:
        """``feature_mask`` as a bool [N], checked: 0/1 values, and no sample claiming features there are not."""
        has = self.feature_mask
        if has is None:
            return None
        has = torch.as_tensor(has)
        if tuple(has.shape) != (samples,) or has.dtype.is_floating_point or has.is_complex():
            raise ConfigError(
                f"{self.source}: {FEATURE_MASK} has shape {list(has.shape)} ({has.dtype}), expected [{samples}] "
                "integers",
                file=self.source,
                tensor=FEATURE_MASK,
                hint="one 0/1 integer per sample: 1 when it has features, 0 for a text-only sample",
            )
        bad = ((has != 0) & (has != 1)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ConfigError(
                f"{self.source}: sample {i} has {FEATURE_MASK} = {int(has[i])}",
                file=self.source,
                tensor=FEATURE_MASK,
                hint="1 when the sample has features, 0 for a text-only sample",
            )
        has = has.bool()
        if self.features is None and bool(has.any()):
            i = int(has.nonzero()[0])
            raise ConfigError(
                f"{self.source}: sample {i} has {FEATURE_MASK} = 1 but the data has no features",
                file=self.source,
                tensor="features",
                hint=f"add the features of the samples with {FEATURE_MASK} 1, or set it to 0 for text-only samples",
            )
        return has

    def _check_placeholders(self, has: torch.Tensor | None) -> None:
        """Each sample with features has one placeholder per feature vector; a text-only sample has none."""
        per_sample = (self.input_ids == self.placeholder_id).sum(1)
        per_feature = 0 if self.features is None else int(self.features.shape[1])
        expected = torch.full_like(per_sample, per_feature)
        if has is not None:
            expected = torch.where(has, expected, 0)
        bad = (per_sample != expected).nonzero()
        if bad.numel():
            i = int(bad[0])
            text_only = has is not None and not bool(has[i])
            raise ConfigError(
                f"{self.source}: sample {i} has {int(per_sample[i])} placeholder tokens "
                f"(id {self.placeholder_id}) but "
                + (f"is text-only ({FEATURE_MASK} 0)" if text_only else f"{per_feature} feature vectors"),
                file=self.source,
                tensor="input_ids",
                hint=f"a text-only sample has no placeholder token; give it features and {FEATURE_MASK} 1 if it "
                "has some"
                if text_only
                else "every sample needs exactly one placeholder per feature vector",
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def feature_dim(self) -> int | None:
        return None if self.features is None else int(self.features.shape[-1])

    # A dataclass's generated __eq__ would compare tensors; data sets compare by identity.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def _features_of(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(which of the samples ``index`` have features, their feature rows in that order)."""
        if self.features is None:
            return torch.zeros(len(index), dtype=torch.bool), None
        if self.feature_mask is None:
            return torch.ones(len(index), dtype=torch.bool), self.features[index]
        has = self.feature_mask[index]
        assert self._feature_row is not None
        return has, self.features[self._feature_row[index][has]]

    def subset(self, index: torch.Tensor) -> ExtendData:
        index = torch.as_tensor(index, dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        has, features = self._features_of(index)
        return ExtendData(
            self.input_ids[index],
            pick(self.labels),
            pick(self.attention_mask),
            features,
            pick(self.routing_mask),
            self.placeholder_id,
            self.source,
            None if self.feature_mask is None else has,
        )

    def fetch(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long)
        out = {
            "input_ids": self.input_ids[index],
            "labels": self.labels[index],
            "attention_mask": self.attention_mask[index],
        }
        if self.features is not None:
            out |= pack_features(*self._features_of(index))
        if self.routing_mask is not None:
            out["routing_mask"] = self.routing_mask[index]
        return out


def save_data(path: str | Path, data: ExtendData) -> Path:
    """Write ``data`` as one safetensors file (the format above)."""
    path = Path(path)
    tensors = {"input_ids": data.input_ids, "labels": data.labels, "attention_mask": data.attention_mask}
    if data.features is not None:
        tensors["features"] = data.features
    if data.feature_mask is not None:
        tensors[FEATURE_MASK] = data.feature_mask.long()
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
    known = set(TOKEN_TENSORS) | set(FEATURE_TENSORS)
    for name, info in infos.items():
        if name not in known:
            raise ConfigError(
                f"{path}: unknown tensor {name!r}", file=str(path), tensor=name, hint=f"known: {sorted(known)}"
            )
        if name in (*TOKEN_TENSORS, FEATURE_MASK) and info.dtype.is_floating_point:
            raise ConfigError(
                f"{path}: {name} must hold integers, not {info.dtype}",
                file=str(path),
                tensor=name,
                hint="write token ids, labels and masks as int64 (feature_mask: 0/1)",
            )
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
        tensors.get(FEATURE_MASK),
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
