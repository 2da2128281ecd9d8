"""mmer.extend.training / stages: only the new tensors train, runs repeat bit for bit, and resume exactly."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from tiny_moe import (
    FAMILY_NAMES,
    build_lm,
    make_data,
    quick,
    single_thread,  # noqa: F401  (autouse: one thread per module)
    snapshot,
)

from mmer.errors import CheckpointFormatError, ConfigError
from mmer.extend import (
    ExtendOptions,
    MoExtendModel,
    MoExtendRecipe,
    align,
    expected_new_parameter_count,
    extend_model,
    finetune,
    plan_extension,
    set_trainable,
    train,
)
from mmer.extend.training import latest_checkpoint, learning_rate_at
from mmer.progress import ProgressSink


def extended(family: str = "mixtral", layers=(0, 2), seed: int = 0) -> MoExtendModel:
    """An aligned tiny model with one new expert (a copy of expert 1) in each of ``layers``."""
    model, _ = align(build_lm(family, seed), make_data(), options=quick(steps=1))
    extend_model(model, {layer: [1] for layer in layers}, ExtendOptions(layers="all"))
    return model


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_changes_only_the_new_tensors_and_their_count_is_experts_router_rows_calibration_projector(family):
    model = extended(family)
    before = snapshot(model)
    base_names = [
        n for n in before if ".new_" not in n and ".calibration." not in n and not n.startswith("projector.")
    ]
    trainable = set_trainable(model, "finetune", train_projector=True)
    report = train(model, trainable, make_data(), quick(steps=3), stage="finetune")
    after = model.state_dict()
    for name in base_names:
        assert torch.equal(before[name], after[name]), f"pretrained tensor {name} changed"
    for name in trainable:
        assert not torch.equal(before[name], after[name]), f"new tensor {name} did not train"
    hidden, intermediate = 32, model.lm.model.layers[0].mlp.experts.down_proj.shape[-1]
    per_layer = 3 * hidden * intermediate + hidden + 2 * 5 * 16  # expert + router row + 5-wide calibration MLP
    projector = sum(p.numel() for p in model.projector.parameters())
    assert report.trainable_parameters == 2 * per_layer + projector == expected_new_parameter_count(model)


def test_without_the_projector_only_experts_router_rows_and_calibration_train():
    model = extended()
    trainable = set_trainable(model, "finetune", train_projector=False)
    assert not any(n.startswith("projector.") for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected_new_parameter_count(model, train_projector=False)


def test_align_trains_the_projector_and_nothing_else():
    lm = build_lm()
    before = snapshot(lm)
    model, report = align(lm, make_data(), options=quick(steps=3))
    assert all(torch.equal(before[n], t) for n, t in lm.state_dict().items())
    assert report.trainable_parameters == sum(p.numel() for p in model.projector.parameters())
    assert len(report.losses) == 3 and all(loss > 0 for loss in report.losses)


def test_two_runs_with_the_same_seed_are_bit_identical():
    results = []
    for _ in range(2):
        model = extended()
        report = train(model, set_trainable(model, "finetune"), make_data(), quick(steps=3), stage="finetune")
        results.append((snapshot(model), report.losses))
    assert results[0][1] == results[1][1]
    assert all(torch.equal(results[0][0][n], results[1][0][n]) for n in results[0][0])


class StopAfter(ProgressSink):
    """Interrupts training like Ctrl-C once ``steps`` optimiser steps are done."""

    def __init__(self, steps: int) -> None:
        self.steps, self.done, self.events = steps, 0, []

    def start(self, stage, total, unit="B"):
        self.events.append(("start", stage, total, unit))

    def advance(self, stage, amount):
        self.done += amount
        if self.done > self.steps:
            raise KeyboardInterrupt

    def end(self, stage):
        self.events.append(("end", stage))


def test_a_resumed_run_ends_bit_for_bit_where_the_uninterrupted_one_does(tmp_path):
    options = quick(steps=6, save_every=2, grad_accum=2, batch_size=5, warmup_ratio=0.2)
    straight = extended()
    report = train(straight, set_trainable(straight, "finetune"), make_data(), options, stage="finetune")

    interrupted = extended()
    with pytest.raises(KeyboardInterrupt):
        train(
            interrupted,
            set_trainable(interrupted, "finetune"),
            make_data(),
            options,
            stage="finetune",
            checkpoint_dir=tmp_path,
            progress=StopAfter(3),
        )
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    resumed = extended()
    resumed_report = train(
        resumed,
        set_trainable(resumed, "finetune"),
        make_data(),
        options,
        stage="finetune",
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert resumed_report.resumed_from == 2
    assert resumed_report.losses == report.losses
    expected, got = snapshot(straight), snapshot(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]  # keep_checkpoints = 2


def test_resuming_with_other_options_is_refused_naming_the_option(tmp_path):
    model = extended()
    train(
        model, set_trainable(model, "finetune"), make_data(), quick(steps=2), stage="finetune", checkpoint_dir=tmp_path
    )
    other = extended()
    with pytest.raises(ConfigError, match="learning_rate") as info:
        train(
            other,
            set_trainable(other, "finetune"),
            make_data(),
            quick(steps=2, learning_rate=0.5),
            stage="finetune",
            checkpoint_dir=tmp_path,
            resume=True,
        )
    assert info.value.key == "learning_rate"
    with pytest.raises(CheckpointFormatError, match="not of 'align'"):
        train(
            other,
            set_trainable(other, "align"),
            make_data(),
            quick(steps=2),
            stage="align",
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_resuming_a_model_with_other_new_tensors_is_refused(tmp_path):
    model = extended()
    train(
        model, set_trainable(model, "finetune"), make_data(), quick(steps=1), stage="finetune", checkpoint_dir=tmp_path
    )
    other = extended(layers=(1, 3))
    with pytest.raises(ConfigError, match="trainable tensors differ"):
        train(
            other,
            set_trainable(other, "finetune"),
            make_data(),
            quick(steps=1),
            stage="finetune",
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_a_checkpoint_is_plain_safetensors_and_json():
    with tempfile.TemporaryDirectory() as tmp:
        model = extended()
        train(
            model, set_trainable(model, "finetune"), make_data(), quick(steps=1), stage="finetune", checkpoint_dir=tmp
        )
        step = Path(tmp) / "step-00000001"
        state_files = sorted(p.name for p in step.iterdir())
        state = json.loads((step / "state.json").read_text())
    plain = ["optimizer.safetensors", "rng.safetensors", "state.json", "trainable.safetensors"]
    assert state_files == [".mmer-output", *plain]  # plus mmer's marker, so only mmer ever removes it
    assert state["step"] == 1 and state["stage"] == "finetune"


def test_progress_is_reported_in_steps_through_the_sink():
    model = extended()
    sink = StopAfter(100)
    train(model, set_trainable(model, "finetune"), make_data(), quick(steps=3), stage="finetune", progress=sink)
    assert sink.events == [("start", "finetune", 3, "step"), ("end", "finetune")] and sink.done == 3


def test_the_schedule_warms_up_linearly_then_decays_along_a_cosine_to_zero():
    options = quick(steps=10, learning_rate=1.0, warmup_ratio=0.2)
    rates = [learning_rate_at(s, 10, options) for s in range(10)]
    assert rates[:2] == [0.5, 1.0]
    assert rates[2] == 1.0 and rates[-1] == pytest.approx(0.5 * (1 + math.cos(7 / 8 * math.pi)))
    assert all(a >= b for a, b in zip(rates[1:], rates[2:], strict=False))


def test_finetune_trains_the_planned_extension_end_to_end():
    model, _ = align(build_lm(), make_data(), options=quick(steps=1))
    recipe = MoExtendRecipe(finetune=quick(steps=2), extend=ExtendOptions(layers=(1, 3)))
    plan = plan_extension(model, recipe.extend, stats_data=make_data())
    report = finetune(model, make_data(), plan, recipe)
    assert report.steps == 2 and not any(p.requires_grad for p in model.parameters())
    assert sorted(i for i, layer in enumerate(model.lm.model.layers) if hasattr(layer.mlp, "new_experts")) == [1, 3]


def test_nothing_to_train_is_an_error_not_a_silent_no_op():
    model = MoExtendModel(build_lm())
    with pytest.raises(ConfigError, match="nothing to train"):
        train(model, set_trainable(model, "align"), make_data(features=False), quick(), stage="align")


def test_bf16_mixed_precision_trains_on_cpu_and_leaves_the_base_untouched():
    model = extended()
    before = snapshot(model.lm)
    trainable = set_trainable(model, "finetune")
    report = train(model, trainable, make_data(), quick(steps=2, mixed_precision="bf16"), stage="finetune")
    assert report.mixed_precision == "bf16" and len(report.losses) == 2
    after = model.lm.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before if ".new_" not in n and ".calibration." not in n)
    assert all(p.dtype == torch.float32 for p in trainable.values())  # autocast computes in bf16, weights stay fp32
    again = extended()
    train(again, set_trainable(again, "finetune"), make_data(), quick(steps=1), stage="finetune")  # back to "no"
