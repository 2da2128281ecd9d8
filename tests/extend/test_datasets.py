"""mmer.extend.datasets: sharded data and on-the-fly features train what one in-memory file trains, lazily."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_moe import (
    FEATURE_DIM,
    build_lm,
    make_data,
    quick,
    single_thread,  # noqa: F401  (autouse: one thread per module)
    snapshot,
)
from torch import nn

import mmer.extend.datasets as datasets
from mmer.errors import ConfigError
from mmer.extend import (
    ExtendData,
    ExtendOptions,
    MoExtendRecipe,
    ShardedData,
    TorchData,
    align,
    extend_model,
    load_data,
    run_moextend,
    save_data,
    save_shards,
    set_trainable,
    train,
)
from mmer.progress import ProgressSink


def recipe(router_init: str = "copy") -> MoExtendRecipe:
    return MoExtendRecipe(
        align=quick(steps=2, batch_size=5),
        probe=quick(steps=2, batch_size=5),
        finetune=quick(steps=3, batch_size=5),
        extend=ExtendOptions(router_init=router_init),
    )


def pack_tensors(data, path, router_init: str = "copy") -> dict[str, torch.Tensor]:
    result = run_moextend(build_lm(), data, path, recipe(router_init))
    return load_file(str(result.pack / "extension.safetensors"))


def test_sharded_features_give_the_same_pack_as_the_single_file_bit_for_bit(tmp_path):
    data = make_data(25)
    save_data(tmp_path / "all.safetensors", data)
    save_shards(tmp_path / "shards", data, samples_per_shard=4)
    sharded = load_data(tmp_path / "shards")
    assert isinstance(sharded, ShardedData) and len(sharded) == 25 and len(sharded.shards) == 7
    one = pack_tensors(load_data(tmp_path / "all.safetensors"), tmp_path / "one")
    many = pack_tensors(sharded, tmp_path / "many")
    assert sorted(one) == sorted(many) and all(torch.equal(one[n], many[n]) for n in one)


class LiveHandles:
    """Counts the shard files open at once, by wrapping safetensors' safe_open as the data set uses it."""

    def __init__(self, real):
        self.real, self.live, self.most, self.opened = real, 0, 0, 0

    def __call__(self, *args, **kwargs):
        counter, handle = self, self.real(*args, **kwargs)
        counter.live += 1
        counter.opened += 1
        counter.most = max(counter.most, counter.live)

        class Handle:
            def __getattr__(self, name):
                return getattr(handle, name)

            def __exit__(self, *exc):
                counter.live -= 1
                return handle.__exit__(*exc)

        return Handle()


def test_training_on_many_shards_reads_them_lazily_with_one_open_at_a_time(tmp_path, monkeypatch):
    data = make_data(24)
    save_shards(tmp_path / "shards", data, samples_per_shard=2)
    handles = LiveHandles(datasets.safe_open)
    monkeypatch.setattr(datasets, "safe_open", handles)
    sharded = load_data(tmp_path / "shards")
    assert handles.opened == 0  # opening the directory reads the headers only
    model, _ = align(build_lm(), sharded, options=quick(steps=6, batch_size=4))
    assert handles.most == 1 and handles.opened > len(sharded.shards)  # shuffled batches: shards reopened
    in_memory, _ = align(build_lm(), data, options=quick(steps=6, batch_size=4))
    pairs = zip(model.projector.parameters(), in_memory.projector.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    sharded.close()
    assert handles.live == 0


def test_a_batch_reads_only_its_own_rows_of_a_shard(tmp_path, monkeypatch):
    save_shards(tmp_path / "shards", make_data(12), samples_per_shard=12)
    sharded = load_data(tmp_path / "shards")
    real, rows = datasets.safe_open, []

    class RowsOnly:
        def __init__(self, *args, **kwargs):
            self.handle = real(*args, **kwargs)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, name):
            sliced = self.handle.get_slice(name)

            class Rows:
                def __getitem__(self, item):
                    rows.append(item.stop - item.start)
                    return sliced[item]

            return Rows()

        def get_tensor(self, name):
            raise AssertionError(f"{name} read whole")

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(datasets, "safe_open", RowsOnly)
    batch = sharded.fetch([7, 2])
    expected = make_data(12).fetch([7, 2])
    assert all(torch.equal(batch[k], expected[k]) for k in expected)
    assert set(rows) == {1} and len(rows) == 2 * 4  # one row at a time, of each of the file's 4 tensors


def test_shards_padded_to_other_lengths_train_to_the_same_losses(tmp_path):
    data = make_data(12)
    save_shards(tmp_path / "even", data, samples_per_shard=6)
    longer = data.subset(torch.arange(6, 12))
    pad = 4  # the second shard is right-padded 4 tokens longer: no loss, attention or count sees them
    longer = ExtendData(
        torch.nn.functional.pad(longer.input_ids, (0, pad)),
        torch.nn.functional.pad(longer.labels, (0, pad), value=-100),
        torch.nn.functional.pad(longer.attention_mask, (0, pad)),
        longer.features,
        placeholder_id=longer.placeholder_id,
    )
    (tmp_path / "uneven").mkdir()
    save_data(tmp_path / "uneven" / "a.safetensors", data.subset(torch.arange(6)))
    save_data(tmp_path / "uneven" / "b.safetensors", longer)
    reports = [
        align(build_lm(), load_data(tmp_path / name), options=quick(steps=3, batch_size=4))[1]
        for name in ("even", "uneven")
    ]
    assert reports[1].losses == pytest.approx(reports[0].losses, rel=1e-5)


def test_shards_that_disagree_on_the_features_are_refused_naming_the_shard(tmp_path):
    (tmp_path / "bad").mkdir()
    save_data(tmp_path / "bad" / "a.safetensors", make_data(4))
    narrow = make_data(4)
    narrow.features = narrow.features[..., :5]  # another feature width (a shard without features is text-only)
    save_data(tmp_path / "bad" / "b.safetensors", narrow)
    with pytest.raises(ConfigError, match="b.safetensors") as info:
        load_data(tmp_path / "bad")
    assert info.value.file.endswith("b.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no data files"):
        load_data(tmp_path / "empty")


class RawSamples(torch.utils.data.Dataset):
    """Samples as a user's Dataset gives them: tokens, and the encoder's raw input (no features stored)."""

    def __init__(self, data: ExtendData, raw: torch.Tensor) -> None:
        self.data, self.raw = data, raw

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return {
            "input_ids": self.data.input_ids[i],
            "labels": self.data.labels[i],
            "attention_mask": self.data.attention_mask[i],
            "encoder_inputs": self.raw[i],
        }


def test_features_computed_on_the_fly_by_a_frozen_encoder_train_what_precomputed_features_train(tmp_path):
    torch.manual_seed(5)
    encoder = nn.Sequential(nn.Linear(6, FEATURE_DIM), nn.Tanh())
    frozen = snapshot(encoder)
    raw = torch.randn(25, 3, 6)
    tokens = make_data(25)
    with torch.no_grad():
        precomputed = ExtendData(
            tokens.input_ids, tokens.labels, tokens.attention_mask, encoder(raw), placeholder_id=tokens.placeholder_id
        )
    streamed = TorchData(RawSamples(tokens, raw), placeholder_id=tokens.placeholder_id, encoder=encoder)
    assert streamed.feature_dim == FEATURE_DIM and streamed.has_features
    # The mean router row: a copied row's tie with its source is broken by rounding (docs/moextend.md §5).
    one = pack_tensors(precomputed, tmp_path / "one", "mean")
    two = pack_tensors(streamed, tmp_path / "two", "mean")
    for name in one:  # the encoder ran on each batch instead of all samples at once: float rounding only
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(frozen[n], t) for n, t in encoder.state_dict().items())
    assert not any(p.requires_grad for p in encoder.parameters())


def test_a_torch_dataset_of_samples_with_features_and_dataloader_workers_train_like_the_file(tmp_path):
    data = make_data(20)
    samples = [{k: v[0] for k, v in data.fetch([i]).items()} for i in range(20)]
    wrapped = TorchData(samples, placeholder_id=data.placeholder_id)
    save_shards(tmp_path / "shards", data, samples_per_shard=3)
    runs = {}
    for name, source, workers in (("file", data, 0), ("torch", wrapped, 0), ("shards+workers", None, 2)):
        model, _ = align(build_lm(), source or load_data(tmp_path / "shards"), options=quick(steps=1))
        extend_model(model, {1: [0]}, ExtendOptions(layers="all"))
        report = train(
            model,
            set_trainable(model, "finetune"),
            source or load_data(tmp_path / "shards"),
            quick(steps=3, num_workers=workers),
            stage="finetune",
        )
        runs[name] = report.losses
    assert runs["torch"] == runs["file"] and runs["shards+workers"] == runs["file"]


class Seen(ProgressSink):
    """Records whether the LM's layers were set to recompute activations while the stage trained."""

    def __init__(self, lm) -> None:
        self.lm, self.during = lm, []

    def advance(self, stage, amount):
        self.during.append(any(getattr(m, "gradient_checkpointing", False) for m in self.lm.modules()))


def test_gradient_checkpointing_gives_the_same_training_and_runs_with_bf16():
    losses = {}
    for checkpointing in (False, True):
        lm = build_lm()
        seen = Seen(lm)
        model, report = align(
            lm, make_data(), options=quick(steps=3, gradient_checkpointing=checkpointing), progress=seen
        )
        losses[checkpointing] = report.losses
        assert set(seen.during) == {checkpointing}
        assert not model.lm.is_activation_checkpointing  # switched off again after the stage
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    _, report = align(
        build_lm(), make_data(), options=quick(steps=2, gradient_checkpointing=True, mixed_precision="bf16")
    )
    assert report.mixed_precision == "bf16" and len(report.losses) == 2
