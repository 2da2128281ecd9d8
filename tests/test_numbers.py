"""Numbers a merge must not get silently wrong: every LLM weight is floating point, and τᵢ, τ* and the rebuilt
weights θ_base + sᵢ·τ* never overflow to ±inf in the dtype they are stored in, on the eager engine and the fused
kernel alike, unless the user asks for it with ``allow_nonfinite``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import base_state, component_state, finetune_state, write_model
from safetensors.torch import load_file
from test_pipeline import recipe_for

import mmer
from mmer.add import add_models
from mmer.config import ModelSpec
from mmer.errors import CheckpointFormatError, IncompatibleBaseError, NonFiniteError
from mmer.merge import one_pass, window_pass
from mmer.merge.overflow import check_merged, max_abs, provably_finite, rebuilt_overflow

Q = "model.layers.0.self_attn.q_proj.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"


@pytest.fixture(params=["eager", "fused"])
def engine(request, monkeypatch):
    """Run the merge on one engine: ``MMER_FUSED=0`` turns the numba kernels off (they read it when built)."""
    if request.param == "eager":
        monkeypatch.setenv("MMER_FUSED", "0")
    else:
        monkeypatch.delenv("MMER_FUSED", raising=False)
    _clear_kernels()
    calls = []
    original = one_pass.merge_chunk

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(one_pass, "merge_chunk", spy)
    yield request.param, calls
    monkeypatch.undo()
    _clear_kernels()


def _clear_kernels() -> None:
    """Every compiled kernel reads MMER_FUSED when first built: forget them so the next build reads it again."""
    for cached in (one_pass._kernel, one_pass._census_kernel, window_pass._count_kernel_compiled):
        cached.cache_clear()


def models_with(
    tmp_path: Path, dtype: torch.dtype, base_value: float, vision_value: float, audio_value: float | None = None
) -> tuple[Path, dict]:
    """A base and two fine-tunes in ``dtype``; entry [0, 0] of layer 0's q_proj is ``base_value`` in the base,
    ``vision_value`` in the vision model and ``audio_value`` in the audio model (default: the base's, τ = 0
    there); everything else is ordinary."""
    base = base_state(dtype=dtype)
    vision = finetune_state(base, seed=1, density=0.6)
    audio = finetune_state(base, seed=2, density=0.3)
    audio_value = base_value if audio_value is None else audio_value
    for state, value in ((base, base_value), (audio, audio_value), (vision, vision_value)):
        state[Q] = state[Q].clone()
        state[Q][0, 0] = value
    dirs = {
        "vision": write_model(tmp_path / "vision", vision, "hf_legacy", component_state(11)),
        "audio": write_model(tmp_path / "audio", audio, "hf_legacy", component_state(12, prefix="audio_tower.")),
    }
    return write_model(tmp_path / "base", base), dirs


def no_output(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "mmer-staging" in p.name]


# ----------------------------------------------------------------------------------------- floating point only


def test_an_llm_tensor_stored_as_integers_is_refused_by_its_header_naming_model_and_tensor(tiny_models, tmp_path):
    state = dict(tiny_models["vision"])
    state[Q] = (state[Q] * 1e9).to(torch.int32)  # a fine-tune whose weights were written as raw integers
    bad = write_model(tmp_path / "bad", state, "hf_legacy", component_state(11))
    recipe = recipe_for(tiny_models["base_dir"], {"vision": bad, "audio": tiny_models["audio_dir"]})
    with pytest.raises(CheckpointFormatError, match="must be floating point") as info:
        mmer.run_merge(recipe, tmp_path / "out", dry_run=True)  # the plan alone finds it: no weight is read
    err = info.value
    assert err.tensor == "language_model.model.layers.0.self_attn.q_proj.weight"
    assert "vision" in err.message and "I32" in err.message and str(bad) in err.message
    assert err.file.endswith("model.safetensors") and err.hint
    no_output(tmp_path)


def test_an_integer_slot_the_base_stores_as_integers_too_is_kept_out_of_the_merge(tiny_models, tmp_path):
    base = dict(tiny_models["base"]) | {GATE: torch.arange(32 * 16, dtype=torch.int32).reshape(32, 16)}
    vision = dict(tiny_models["vision"]) | {GATE: base[GATE].clone()}
    base_dir = write_model(tmp_path / "base", base)
    vision_dir = write_model(tmp_path / "vision", vision, "hf_legacy")
    report = mmer.run_merge(recipe_for(base_dir, {"vision": vision_dir}), tmp_path / "out")
    assert report.plan["not_merged"][GATE] == "integer dtype"


def test_a_float_tensor_where_the_base_stores_integers_is_refused_as_another_kind(tiny_models, tmp_path):
    base = dict(tiny_models["base"]) | {GATE: torch.arange(32 * 16, dtype=torch.int32).reshape(32, 16)}
    base_dir = write_model(tmp_path / "base", base)
    with pytest.raises(IncompatibleBaseError, match="not the same kind") as info:
        mmer.run_merge(recipe_for(base_dir, {"vision": tiny_models["vision_dir"]}), tmp_path / "out")
    assert info.value.tensor == "language_model.model.layers.0.mlp.gate_proj.weight" and info.value.hint


# ------------------------------------------------------------------------------------------------ overflow


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_finite_weights_whose_task_vector_overflows_float32_are_refused_naming_model_and_tensor(
    tmp_path, engine, dtype
):
    base_dir, dirs = models_with(tmp_path, dtype, -3e38, 3e38)  # each finite; θ − θ_base = 6e38 is not
    with pytest.raises(NonFiniteError, match="task vector of vision overflows float32") as info:
        mmer.run_merge(recipe_for(base_dir, dirs), tmp_path / "out")
    assert info.value.tensor == "language_model.model.layers.0.self_attn.q_proj.weight"
    assert info.value.file == str(dirs["vision"] / "model.safetensors")
    assert "--allow-nonfinite" in info.value.hint
    no_output(tmp_path)


def test_a_tau_star_that_overflows_float16_as_stored_is_refused(tmp_path, engine):
    name, calls = engine
    base_dir, dirs = models_with(tmp_path, torch.float16, -60000.0, 60000.0)  # τ* = 1.2e5: inf in float16
    with pytest.raises(
        NonFiniteError, match="τ\\* merged from vision .* is ±inf/NaN at 1 entries as stored in float16"
    ) as info:
        mmer.run_merge(recipe_for(base_dir, dirs), tmp_path / "out")
    assert info.value.tensor == Q and "--delta-dtype float32" in info.value.hint
    assert bool(calls) == (name == "fused")  # the fused kernel's own output was checked, not an eager rerun
    no_output(tmp_path)


def test_the_same_tau_star_stored_in_float32_rebuilds_finite_weights_and_is_merged(tmp_path, engine):
    base_dir, dirs = models_with(tmp_path, torch.float16, -60000.0, 60000.0)
    mmer.run_merge(recipe_for(base_dir, dirs, delta_dtype="float32"), tmp_path / "out")
    tau = load_file(str(tmp_path / "out" / "tau_star" / "model.safetensors"))[Q]
    assert tau.dtype == torch.float32 and float(tau[0, 0]) == 120000.0  # θ_base + τ* = 60000 fits float16


@pytest.mark.parametrize("mask", ["mmer", "none"])
def test_rebuilt_weights_that_overflow_the_base_dtype_are_refused_naming_the_modality(tmp_path, engine, mask):
    name, calls = engine
    base_dir, dirs = models_with(tmp_path, torch.float16, 30000.0, 60000.0)  # τ* = 2·30000 fits; θ_base + τ* not
    with pytest.raises(NonFiniteError, match="rebuilt as θ_base \\+ τ\\* overflows float16") as info:
        mmer.run_merge(recipe_for(base_dir, dirs, alpha=2.0, mask=mask), tmp_path / "out")
    assert info.value.tensor == Q and "alpha" in info.value.hint
    assert f"vision ({dirs['vision']})" in info.value.message
    if mask == "mmer":
        assert "audio" not in info.value.message  # audio's mask does not keep the entry: its weights are fine
    assert bool(calls) == (name == "fused" and mask == "mmer")
    no_output(tmp_path)


@pytest.mark.parametrize(
    "base_value,vision_value,options",
    [(-3e38, 3e38, {}), (-60000.0, 60000.0, {}), (30000.0, 60000.0, {"alpha": 2.0})],
    ids=["tau", "tau_star", "rebuilt"],
)
def test_every_overflow_is_written_as_inf_when_explicitly_allowed(tmp_path, engine, base_value, vision_value, options):
    dtype = torch.float32 if abs(base_value) > 1e6 else torch.float16
    base_dir, dirs = models_with(tmp_path, dtype, base_value, vision_value)
    mmer.run_merge(recipe_for(base_dir, dirs, allow_nonfinite=True, **options), tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "mmer_manifest.json").read_text())
    assert manifest["options"]["allow_nonfinite"] is True
    tau = load_file(str(tmp_path / "out" / "tau_star" / "model.safetensors"))[Q]
    base = load_file(str(tmp_path / "out" / "base" / "model.safetensors"))[Q]
    assert not math.isfinite(float((base.float() + tau.float()).to(dtype)[0, 0]))


def emr_models(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """float16 models where EMR's rescaler of vision is about 8: audio outvotes vision on 7/8 of q_proj, so
    vision keeps 1/8 of its entries, each of τ* = 15000, and 8·15000 + θ_base overflows float16."""
    base = base_state(dtype=torch.float16)
    vision, audio = dict(base), dict(base)
    vision[Q] = base[Q] + 15000
    audio[Q] = base[Q].clone()
    audio[Q].view(-1)[: Q_NUMEL * 7 // 8] -= 30000
    audio[Q].view(-1)[Q_NUMEL * 7 // 8 :] += 1000
    dirs = {
        "vision": write_model(tmp_path / "vision", vision, "hf_legacy"),
        "audio": write_model(tmp_path / "audio", audio, "hf_legacy"),
    }
    return write_model(tmp_path / "base", base), dirs


Q_NUMEL = 16 * 16


def test_emr_weights_that_its_rescaler_makes_overflow_are_refused(tmp_path):
    base_dir, dirs = emr_models(tmp_path)
    with pytest.raises(NonFiniteError, match="rebuilt as θ_base \\+ [0-9.]+·τ\\* overflows float16") as info:
        mmer.run_merge(recipe_for(base_dir, dirs, method="emr", mask="emr"), tmp_path / "out")
    assert info.value.tensor == Q and f"vision ({dirs['vision']})" in info.value.message
    assert "audio" not in info.value.message
    no_output(tmp_path)
    mmer.run_merge(recipe_for(base_dir, dirs, method="emr", mask="emr", allow_nonfinite=True), tmp_path / "out")


def test_add_refuses_a_new_model_whose_task_vector_overflows(tmp_path):
    base_dir, dirs = models_with(tmp_path, torch.float32, -3e38, -3e38, audio_value=3e38)
    merged = tmp_path / "merged"
    mmer.run_merge(recipe_for(base_dir, {"vision": dirs["vision"]}), merged)
    with pytest.raises(NonFiniteError, match="task vector of audio overflows float32"):
        add_models(merged, [ModelSpec(str(dirs["audio"]), modality="audio")], tmp_path / "out")
    no_output(tmp_path)


# ------------------------------------------------------------------------------------ the checks themselves


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_bound_never_proves_finite_a_rebuild_that_overflows(dtype):
    g = torch.Generator().manual_seed(0)
    top = torch.finfo(dtype).max
    for scale in (1.0, 0.5, 3.0):
        for _ in range(200):
            base = ((torch.rand(64, generator=g) * 2 - 1) * top).to(dtype)
            tau = ((torch.rand(64, generator=g) * 2 - 1) * top / scale).to(dtype)
            if provably_finite(max_abs(base), max_abs(tau), scale, dtype):
                assert not bool(rebuilt_overflow(base, tau, scale).any())


def test_max_abs_reports_inf_and_nan():
    assert max_abs(torch.tensor([1.0, -float("inf")], dtype=torch.float16)) == math.inf
    assert math.isnan(max_abs(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)))
    assert max_abs(torch.tensor([-3.0, 2.0])) == 3.0 and max_abs(torch.zeros(0)) == 0.0


def test_check_merged_passes_ordinary_weights_and_names_only_the_modalities_hit():
    base = torch.tensor([60000.0, 1.0, 2.0], dtype=torch.float16)
    tau = torch.tensor([10000.0, 0.5, -0.5], dtype=torch.float16)
    assert check_merged(base[1:], tau[1:], [1.0, 1.0], tensor="t", file="f", labels=["a", "b"]) == (2.0, 0.5)
    masks = [torch.tensor([False, True, True]), torch.tensor([True, False, False])]
    with pytest.raises(NonFiniteError) as info:
        check_merged(base, tau, [1.0, 1.0], tensor="t", file="f", labels=["a", "b"], masks=masks)
    assert info.value.message.endswith("the weights of b") and info.value.tensor == "t"


@pytest.mark.parametrize("scale", [2e6, 0.0, float("nan"), float("inf")])
def test_an_emr_rescaler_that_readers_would_refuse_is_never_written(tmp_path, scale):
    from types import SimpleNamespace

    from mmer.engine.merge_pass import _check_rescaled

    plan = SimpleNamespace(models=[SimpleNamespace(label="vision", path=tmp_path)], merged_slots=[])
    with pytest.raises(NonFiniteError, match="rescaler"):
        _check_rescaled(plan, tmp_path, {"vision": scale}, None)
