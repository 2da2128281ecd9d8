"""Text-only samples beside the modality's (LLaVA-665k's ShareGPT conversations): one data set, every form of it.

A text-only sample has ``feature_mask`` 0, no placeholder and no row in ``features``; a batch's features are
those of its samples that have them, in batch order, and each lands on its own sample's placeholders.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_runner import cli
from safetensors.torch import save_file
from tiny_moe import (
    FEATURE_DIM,
    FEATURES,
    HIDDEN,
    PLACEHOLDER,
    build_lm,
    make_data,
    make_mixed_data,
    quick,
    saved_lm,
    single_thread,  # noqa: F401  (autouse: one thread per module)
)
from torch import nn

from mmer.errors import ConfigError
from mmer.extend import (
    ExtendData,
    MoExtendModel,
    ShardedData,
    TorchData,
    load_data,
    load_extension_pack,
    save_data,
    save_shards,
    set_trainable,
    train,
)
from mmer.extend.data import DATA_FORMAT, samples_of
from mmer.extend.modality import Projector
from mmer.extend.probe import count_routing


def mixed(n: int = 12) -> tuple[ExtendData, torch.Tensor]:
    """``n`` samples, every third one (1, 4, 7, ...) text-only; (data, which samples are text-only)."""
    return make_mixed_data(n, text_every=3)


def model_with_projector(seed: int = 0) -> MoExtendModel:
    torch.manual_seed(seed)
    return MoExtendModel(build_lm(), Projector("mlp2x_gelu", FEATURE_DIM, HIDDEN), PLACEHOLDER).eval()


def assert_same_batches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------ the model path
def test_a_mixed_batch_gives_every_row_the_logits_it_has_alone():
    data, is_text = mixed()
    model = model_with_projector()
    batch = data.fetch(torch.arange(len(data)))
    assert (
        batch["features"].shape[0] == int((~is_text).sum()) and batch["feature_mask"].tolist() == (~is_text).tolist()
    )
    with torch.no_grad():
        together = model(batch["input_ids"], batch["attention_mask"], batch["features"]).logits
        digits = data.subset((~is_text).nonzero().flatten()).fetch(range(int((~is_text).sum())))
        digits_alone = model(digits["input_ids"], digits["attention_mask"], digits["features"]).logits
        text = data.subset(is_text.nonzero().flatten()).fetch(range(int(is_text.sum())))
        assert "features" not in text  # a batch of text-only samples carries none
        text_alone = model(text["input_ids"], text["attention_mask"]).logits
    torch.testing.assert_close(together[~is_text], digits_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[is_text], text_alone, rtol=1e-5, atol=1e-5)


def test_features_that_do_not_match_the_rows_with_placeholders_are_refused_by_the_model():
    data, _ = mixed()
    model = model_with_projector()
    batch = data.fetch(torch.arange(6))
    with pytest.raises(ConfigError, match="4 rows have placeholder tokens") as info:
        model(batch["input_ids"], batch["attention_mask"], batch["features"][:3])
    assert info.value.key == "features" and info.value.hint
    ids = batch["input_ids"].clone()
    ids[1, 5] = PLACEHOLDER  # a text-only row with one placeholder: the counts no longer line up row by row
    with pytest.raises(ConfigError, match="row 1 has 1 placeholder"):
        model(ids, batch["attention_mask"], batch["features"])


# ------------------------------------------------------------------------------------------------ every data form
def test_a_mixed_data_file_and_its_shards_give_the_same_batches(tmp_path):
    data, _ = mixed(13)
    loaded = load_data(save_data(tmp_path / "mixed.safetensors", data))
    save_shards(tmp_path / "shards", data, samples_per_shard=4)
    sharded = load_data(tmp_path / "shards")
    assert isinstance(sharded, ShardedData) and loaded.feature_dim == sharded.feature_dim == FEATURE_DIM
    for index in ([0, 1, 2], [1, 4, 7], [12, 3, 1, 8, 5], list(range(13))):
        expected = data.fetch(index)
        assert_same_batches(loaded.fetch(index), expected)
        assert_same_batches(sharded.fetch(index), expected)
    assert "feature_mask" not in data.fetch([0, 2])  # all with features: the plain form
    assert data.subset(torch.tensor([0, 2, 3])).feature_mask is None


def test_a_shard_of_text_alone_joins_shards_with_features(tmp_path):
    digits, text = make_data(6), make_data(5, seed=2, features=False)
    (tmp_path / "set").mkdir()
    save_data(tmp_path / "set" / "a.safetensors", digits)
    save_data(tmp_path / "set" / "b.safetensors", text)
    sharded = load_data(tmp_path / "set")
    assert sharded.feature_dim == FEATURE_DIM and len(sharded) == 11
    batch = sharded.fetch([7, 0, 10, 3])
    assert batch["feature_mask"].tolist() == [False, True, False, True]
    assert torch.equal(batch["features"], digits.features[[0, 3]])
    assert torch.equal(batch["input_ids"][0], text.input_ids[1])


def test_a_torch_dataset_with_text_only_samples_gives_the_file_s_batches():
    data, is_text = mixed()
    samples = samples_of(data.fetch(torch.arange(len(data))))
    assert all(("features" in s) != bool(t) for s, t in zip(samples, is_text, strict=True))
    torch_data = TorchData(samples, placeholder_id=PLACEHOLDER)
    assert torch_data.feature_dim == FEATURE_DIM
    for index in ([0, 1, 2], [1, 4], list(range(12))):
        assert_same_batches(torch_data.fetch(index), data.fetch(index))


def test_an_encoder_encodes_only_the_samples_that_have_inputs():
    data, is_text = mixed()
    raw = torch.randn(len(data), FEATURES, 4, generator=torch.Generator().manual_seed(5))
    encoder = nn.Linear(4, FEATURE_DIM)
    samples = [
        {k: v for k, v in s.items() if k != "features"} | ({} if t else {"encoder_inputs": raw[i]})
        for i, (s, t) in enumerate(zip(samples_of(data.fetch(torch.arange(len(data)))), is_text, strict=True))
    ]
    torch_data = TorchData(samples, placeholder_id=PLACEHOLDER, encoder=encoder)
    batch = torch_data.batch([0, 1, 2, 4])
    with torch.no_grad():
        expected = encoder(raw[[0, 2]])
    assert batch["feature_mask"].tolist() == [True, False, True, False]
    torch.testing.assert_close(batch["features"], expected)
    assert "features" not in torch_data.batch([1, 4])  # text only: nothing encoded


# ------------------------------------------------------------------------------------------------ hostile files
def write_raw(path, tensors, placeholder=PLACEHOLDER):
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        {"format": DATA_FORMAT} | ({} if placeholder is None else {"placeholder_id": str(placeholder)}),
    )
    return path


def raw_mixed() -> dict[str, torch.Tensor]:
    data, _ = mixed(6)
    return {
        "input_ids": data.input_ids,
        "attention_mask": data.attention_mask,
        "features": data.features,
        "feature_mask": data.feature_mask.long(),
    }


def placeholder_in_text(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = tensors["input_ids"].clone()
    ids[1, 6] = PLACEHOLDER  # sample 1 is text-only
    return tensors | {"input_ids": ids}


@pytest.mark.parametrize(
    ("change", "message", "tensor"),
    [
        (
            lambda t: t | {"features": t["features"][:-1]},
            r"features has shape \[3, 3, 10\], expected \[4,",
            "features",
        ),
        (lambda t: t | {"feature_mask": torch.ones(6, dtype=torch.long)}, r"expected \[6, F, d\]", "features"),
        (lambda t: {k: v for k, v in t.items() if k != "feature_mask"}, r"expected \[6, F, d\]", "features"),
        (lambda t: {k: v for k, v in t.items() if k != "features"}, "feature_mask = 1 but", "features"),
        (lambda t: t | {"feature_mask": t["feature_mask"] * 2}, "sample 0 has feature_mask = 2", "feature_mask"),
        (lambda t: t | {"feature_mask": t["feature_mask"][:5]}, r"feature_mask has shape \[5\]", "feature_mask"),
        (lambda t: t | {"feature_mask": t["feature_mask"].float()}, "must hold integers", "feature_mask"),
        (placeholder_in_text, r"sample 1 has 1 placeholder tokens \(id 3\) but is text-only", "input_ids"),
    ],
    ids=[
        "a-claimed-row-missing",
        "every-sample-claims-features",
        "no-mask-and-too-few-rows",
        "claims-without-features",
        "mask-not-0-or-1",
        "mask-of-the-wrong-length",
        "float-mask",
        "text-only-sample-with-a-placeholder",
    ],
)
def test_an_inconsistent_mixed_file_is_refused_naming_file_tensor_and_fix(tmp_path, change, message, tensor):
    for form in ("file", "shards"):
        (tmp_path / form).mkdir(exist_ok=True)
        path = write_raw(tmp_path / form / "data.safetensors", change(raw_mixed()))
        with pytest.raises(ConfigError, match=message) as info:
            data = load_data(path if form == "file" else tmp_path / form)
            data.fetch(range(len(data)))  # shards check rows as they are read
        assert info.value.file == str(path) and info.value.tensor == tensor and info.value.hint, form


def test_a_torch_sample_without_features_but_with_a_placeholder_is_refused():
    data, _ = mixed()
    samples = samples_of(data.fetch(torch.arange(3)))
    samples[1]["input_ids"] = samples[1]["input_ids"].clone()
    samples[1]["input_ids"][4] = PLACEHOLDER
    with pytest.raises(ConfigError, match="sample 1 has 1 placeholder tokens") as info:
        TorchData(samples, placeholder_id=PLACEHOLDER, source="mine").fetch([0, 1, 2])
    assert info.value.file == "mine" and info.value.tensor == "input_ids"


# ------------------------------------------------------------------------------------------------ statistics
def test_routing_counts_of_a_mix_are_the_sums_of_its_parts_and_prompt_counts_skip_labelled_text():
    data, is_text = mixed(12)
    model = model_with_projector()
    digits = data.subset((~is_text).nonzero().flatten())
    text = data.subset(is_text.nonzero().flatten())
    whole, parts = count_routing(model, data, 12), [count_routing(model, d, 12) for d in (digits, text)]
    assert whole.tokens == parts[0].tokens + parts[1].tokens
    for layer in whole.counts:
        assert torch.equal(whole.counts[layer], parts[0].counts[layer] + parts[1].counts[layer])
    # The text samples are labelled throughout: no prompt, so the prompt-only counts are the digit samples'.
    prompt, digit_prompt = count_routing(model, data, 12, "prompt"), count_routing(model, digits, 12, "prompt")
    assert prompt.tokens == digit_prompt.tokens > 0
    assert all(torch.equal(prompt.counts[k], digit_prompt.counts[k]) for k in prompt.counts)


# ------------------------------------------------------------------------------------------------ training
def test_a_micro_batch_of_text_alone_gives_a_projector_in_training_a_zero_gradient():
    data, is_text = mixed(12)
    text = data.subset(is_text.nonzero().flatten())
    assert text.feature_dim == FEATURE_DIM and "features" not in text.fetch(range(4))
    model = model_with_projector()
    set_trainable(model, "align")
    batch = text.fetch(range(4))
    model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss.backward()
    # Zero, not None: every step and every process has the projector in its graph (DDP exchanges its gradient).
    assert all(p.grad is not None and not p.grad.any() for p in model.projector.parameters())
    before = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    train(model, set_trainable(model, "align"), text, quick(steps=2, batch_size=4), stage="align")
    assert all(torch.equal(p, before[n]) for n, p in model.projector.named_parameters())
    with torch.no_grad():  # not training: the text takes the plain path
        plain = model.lm(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]).logits, plain)
    report = train(model, set_trainable(model, "align"), data, quick(steps=2, batch_size=4), stage="align")
    assert all(torch.isfinite(torch.tensor(report.losses)))
    assert any(not torch.equal(p, before[n]) for n, p in model.projector.named_parameters())


def test_mmer_extend_train_runs_on_a_mixed_data_file_end_to_end(tmp_path):
    data, _ = mixed(24)
    path = save_data(tmp_path / "mixed.safetensors", data)
    fast = ["--steps", "2", "--batch-size", "8", "--device", "cpu", "--mixed-precision", "no", "--quiet"]
    result = cli("extend", "train", saved_lm("mixtral"), path, "-o", tmp_path / "pack", *fast, "--json")
    assert result.exit_code == 0, result
    summary = result.json()
    assert summary["ok"] and {"align", "finetune"} <= set(summary["reports"]) and summary["layers"]
    model = load_extension_pack(saved_lm("mixtral"), tmp_path / "pack")
    evaluated = cli("extend", "eval", saved_lm("mixtral"), path, "--pack", tmp_path / "pack", "--json")
    assert evaluated.exit_code == 0, evaluated
    assert evaluated.json()["tokens"] > 0 and model.projector is not None


def test_mmer_extend_refuses_an_inconsistent_mixed_file_with_a_usage_error(tmp_path):
    tensors = raw_mixed()
    path = write_raw(tmp_path / "bad.safetensors", tensors | {"features": tensors["features"][:-1]})
    result = cli("extend", "train", saved_lm("mixtral"), path, "-o", tmp_path / "pack", "--quiet", "--json")
    assert result.exit_code == 2, result
    error = json.loads(result.stdout)
    assert "bad.safetensors" in json.dumps(error) and "feature_mask" in json.dumps(error)
