"""Specifies per-model K and DARE p: each fine-tune trimmed at its own K (global or per tensor) and dropped at its
own p, a model spec's ``k:``/``dare:`` over the recipe's (TIES-Merging, arXiv 2306.01708 §3; DARE, arXiv
2311.03099 §3: both act on each task vector alone).

The goldens are computed by hand: task vectors whose magnitudes are 1, 2, 3... steps make every threshold a
closed form, so the expected τ* is written down without ranking anything. Models that all take one K are the
merge-wide K bit for bit, and the fused kernel and windowed search give what the eager definition does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import cli
from conftest import base_state, write_model
from test_pipeline import recipe_for

import mmer
import mmer.runtime
from mmer.config import MergeOptions, ModelSpec, Recipe, build_recipe, spec_from_dict
from mmer.engine import read_slot
from mmer.errors import ConfigError
from mmer.merge.dare import dare
from mmer.merge.slot import Variant, apply_dare, merge_slot, per_model
from mmer.plan import build_plan, check_registries, resolve_variant

STEP = 2.0**-16  # (j + 1)·STEP is exact in float32 for every j of the tiny model


def _variant(ks, dares=(0.0, 0.0), scope="per-tensor", mask="mmer", lam=1.0) -> Variant:
    k, model_k = per_model(ks, min)
    p, model_dare = per_model(dares, max)
    return Variant(
        method="ties",
        mask=mask,
        k=k,
        model_k=model_k,
        alpha=1.0,
        trim_scope=scope,
        trim_count="reference",
        zero_sign="zero",
        elect_on="raw",
        aggregate="mean",
        mask_source="trimmed",
        dare=p,
        model_dare=model_dare,
        dare_seed=0,
        lambdas=(lam, lam),
    )


# ----------------------------------------------------------------------------------------- one slot, by hand


def test_two_models_at_different_k_are_each_trimmed_at_their_own_k_in_one_tensor() -> None:
    """d = 8. A at K = 0.5: rank 8 − 4 = 4, the 4th smallest |τ| is 0.4, so |τ| ≥ 0.4 stays. B at K = 0.25:
    rank 8 − 2 = 6, the 6th smallest is 0.7, so |τ| ≥ 0.7 stays. Then TIES: entry 6 has A = +0.7, B = −0.8, the sum
    elects −, B's −0.8 alone agrees; entry 2 keeps nothing of either."""
    tau_a = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8])
    tau_b = torch.tensor([0.9, 0.7, -0.6, 0.5, -0.4, 0.3, -0.8, 0.1])
    result = merge_slot([tau_a, tau_b], _variant((0.5, 0.25)), "w", torch.float32)
    assert torch.equal(result.stored, torch.tensor([0.9, 0.7, 0.0, -0.4, 0.5, -0.6, -0.8, -0.8]))
    # λ = 1: sgn(τᵢ) = sgn(τ*) ≠ 0 and |τᵢ| ≥ 0.5·|τ*|, on the trimmed τᵢ
    assert result.masks[0].tolist() == [False, False, False, True, True, True, False, True]
    assert result.masks[1].tolist() == [True, True, False, False, False, False, True, False]
    both_at_half = merge_slot([tau_a, tau_b], _variant((0.5, 0.5)), "w", torch.float32)
    assert both_at_half.stored[2] == -0.6  # B at K = 0.5 keeps its −0.6: the K really is each model's


def test_a_model_at_k_1_is_not_trimmed_while_the_other_is() -> None:
    tau_a = torch.tensor([0.1, -0.2, 0.3, -0.4])
    tau_b = torch.tensor([0.4, 0.3, -0.2, 0.1])
    result = merge_slot([tau_a, tau_b], _variant((1.0, 0.5), mask="none"), "w", torch.float32)
    # A whole; B at K = 0.5: rank 4 − 2 = 2, |τ| ≥ 0.2 stays: [0.4, 0.3, −0.2, 0]. Entries 1 and 2 disagree and
    # elect + (Σ = 0.1), so the positive one alone is kept; entry 0 agrees: the mean of 0.1 and 0.4.
    mean = (torch.tensor(0.1) + torch.tensor(0.4)) / 2
    assert torch.equal(result.stored, torch.tensor([float(mean), 0.3, 0.3, -0.4]))


def test_each_model_is_dropped_at_its_own_dare_rate_with_its_own_seeded_mask() -> None:
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(4096, generator=g), torch.randn(4096, generator=g)]
    variant = _variant((1.0, 1.0), dares=(0.5, 0.0))
    dropped = apply_dare(taus, variant, "w")
    assert torch.equal(dropped[0], dare(taus[0], 0.5, 0, 0, "w"))  # the same draw a merge-wide p = 0.5 makes
    assert dropped[1] is taus[1]  # p = 0: untouched
    assert variant.dare == 0.5 and variant.dare_of(1) == 0.0


def test_equal_per_model_values_are_one_merge_wide_value() -> None:
    assert per_model((0.6, 0.6), min) == (0.6, None)
    assert per_model((0.6, 0.4), min) == (0.4, (0.6, 0.4))
    assert per_model((0.1, 0.3), max) == (0.3, (0.1, 0.3))
    with pytest.raises(ValueError):
        dataclasses.replace(_variant((0.6, 0.4)), k=0.6)  # k must be the smallest K, or `k < 1` would lie


# ------------------------------------------------------------------------------------- a whole model, by hand


@pytest.fixture(scope="module")
def ramp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A zero base and two fine-tunes whose τ over the whole model (names sorted, row-major) is a ramp: entry j of
    A is (j + 1)·STEP, of B (−1)ʲ·(j + 1)·STEP. Every magnitude is distinct and every threshold a closed form."""
    root = tmp_path_factory.mktemp("ramp")
    base = {n: torch.zeros_like(t) for n, t in base_state().items()}
    a, b, offset = {}, {}, 0
    for name in sorted(base):
        shape = base[name].shape
        j = torch.arange(offset, offset + base[name].numel(), dtype=torch.float64)
        a[name] = ((j + 1) * STEP).float().reshape(shape)
        b[name] = ((j + 1) * STEP * (1 - 2 * (j % 2))).float().reshape(shape)
        offset += base[name].numel()
    return {
        "base": write_model(root / "base", base),
        "models": {"vision": write_model(root / "vision", a), "audio": write_model(root / "audio", b)},
        "numel": offset,
        "shapes": {n: t.shape for n, t in base.items()},
    }


def _ramp_recipe(ramp: dict, ks: tuple[float, float], **options) -> Recipe:
    recipe = recipe_for(ramp["base"], ramp["models"], **options)
    models = tuple(dataclasses.replace(m, k=k) for m, k in zip(recipe.models, ks, strict=True))
    return dataclasses.replace(recipe, models=models)


def _expected_ramp(j: torch.Tensor, numel: int, k_a: float, k_b: float) -> torch.Tensor:
    """A keeps j + 1 ≥ d − ⌊d·K_A⌋ (its ⌊d·K_A⌋ + 1 largest), B likewise; where both keep an entry of odd j their
    signs cancel (Σ = 0, γ = 0: τ* = 0), where both keep an even one they agree (the mean is the value), where one
    keeps it τ* is its value."""
    value = (j + 1) * STEP
    kept_a = j + 1 >= numel - int(numel * k_a)
    kept_b = j + 1 >= numel - int(numel * k_b)
    sign_b = 1 - 2 * (j % 2)
    out = torch.where(kept_a & kept_b, torch.where(sign_b > 0, value, 0.0), torch.zeros_like(value))
    out = torch.where(kept_a & ~kept_b, value, out)
    return torch.where(kept_b & ~kept_a, value * sign_b, out).float()


@pytest.mark.parametrize(("k_a", "k_b"), [(0.5, 0.25), (0.25, 0.5), (0.9, 1.0)])
def test_a_global_trim_ranks_each_model_over_the_whole_model_at_its_own_k(ramp, tmp_path, k_a, k_b) -> None:
    mmer.run_merge(_ramp_recipe(ramp, (k_a, k_b)), tmp_path / "out")
    offset = 0
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        for name in sorted(ramp["shapes"]):
            shape = ramp["shapes"][name]
            j = torch.arange(offset, offset + shape.numel(), dtype=torch.float64)
            expected = _expected_ramp(j, ramp["numel"], k_a, k_b).reshape(shape)
            assert torch.equal(ckpt.tau_star(name), expected), name
            offset += shape.numel()
        assert ckpt.modality("vision").k == k_a and ckpt.modality("audio").k == k_b


@pytest.mark.parametrize("chunk", [None, 64])
def test_a_per_tensor_trim_ranks_each_tensor_at_each_models_own_k(ramp, tmp_path, monkeypatch, chunk) -> None:
    """Per tensor the ramp restarts its ranks: the same closed form with the tensor's own d (the ramp's offset
    shifts every magnitude of a tensor alike, so only the local rank matters)."""
    if chunk is not None:
        monkeypatch.setattr(mmer.runtime, "CPU_CHUNK", chunk)  # thresholds found in chunks, by the window search
    mmer.run_merge(_ramp_recipe(ramp, (0.5, 0.2), trim_scope="per-tensor"), tmp_path / "out")
    offset = 0
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        for name in sorted(ramp["shapes"]):
            shape = ramp["shapes"][name]
            d = shape.numel()
            local = torch.arange(d, dtype=torch.float64)
            j = local + offset
            value, sign_b = (j + 1) * STEP, 1 - 2 * (j % 2)
            kept_a = local + 1 >= d - int(d * 0.5)
            kept_b = local + 1 >= d - int(d * 0.2)
            expected = torch.where(kept_a & kept_b, torch.where(sign_b > 0, value, 0.0), torch.zeros_like(value))
            expected = torch.where(kept_a & ~kept_b, value, expected)
            expected = torch.where(kept_b & ~kept_a, value * sign_b, expected).float().reshape(shape)
            assert torch.equal(ckpt.tau_star(name), expected), name
            offset += d


# ------------------------------------------------------------------------- the kernel paths, and equal values


def _bf16_models(root: Path) -> dict:
    """A bf16 base and two fine-tunes moving 60 % of their entries by whole bf16 steps (the fused kernel's
    inputs, with magnitudes in tied blocks as real fine-tunes have them)."""
    base = base_state(5, dtype=torch.bfloat16)
    write_model(root / "base", base)
    g = torch.Generator().manual_seed(6)
    models = {}
    for label in ("vision", "audio"):
        state = {}
        for name, t in base.items():
            steps = torch.randint(-3, 4, t.shape, generator=g) * (torch.rand(t.shape, generator=g) >= 0.4)
            state[name] = (t.view(torch.int16) + steps.to(torch.int16)).view(torch.bfloat16)
        models[label] = write_model(root / label, state)
    return models


def _with_own(recipe: Recipe, ks=None, dares=None) -> Recipe:
    ks, dares = ks or (None,) * len(recipe.models), dares or (None,) * len(recipe.models)
    models = tuple(dataclasses.replace(m, k=k, dare=p) for m, k, p in zip(recipe.models, ks, dares, strict=True))
    return dataclasses.replace(recipe, models=models)


def _global_thresholds(plan, ks) -> list[float]:
    """Each model's global threshold the obvious way: every τᵢ in memory, one kthvalue at its own K."""
    out = []
    for i, k in enumerate(ks):
        flat = torch.cat(
            [read_slot(plan, s.name, torch.device("cpu"))[1][i].reshape(-1) for s in plan.merged_slots]
        ).abs()
        d = flat.numel()
        out.append(float(flat.kthvalue(d - int(d * k)).values))
    return out


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
def test_the_fused_kernel_and_windowed_search_merge_per_model_k_as_the_eager_definition(
    tmp_path, monkeypatch, scope
) -> None:
    models = _bf16_models(tmp_path)
    monkeypatch.setattr(mmer.runtime, "CPU_CHUNK", 64)  # every tensor spans several chunks
    recipe = _with_own(recipe_for(tmp_path / "base", models, trim_scope=scope), ks=(0.7, 0.3))
    mmer.run_merge(recipe, tmp_path / "out")
    with build_plan(recipe) as plan, mmer.load_decoupled(tmp_path / "out") as ckpt:
        assert plan.variant.model_k == (0.7, 0.3)
        thresholds = _global_thresholds(plan, (0.7, 0.3)) if scope == "global" else None
        for slot in plan.merged_slots:
            _, raw = read_slot(plan, slot.name, torch.device("cpu"))
            expected = merge_slot(raw, plan.variant, slot.name, slot.dtype, thresholds)
            assert torch.equal(ckpt.tau_star(slot.name).view(torch.int16), expected.stored.view(torch.int16))
            for label, mask in zip(("vision", "audio"), expected.masks, strict=True):
                assert torch.equal(ckpt.mask(label, slot.name), mask), (label, slot.name)


def _weights(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.safetensors"))}


@pytest.mark.parametrize(
    ("options", "own"),
    [
        ({"k": 0.6}, {"ks": (0.6, 0.6)}),
        ({"k": 0.6, "trim_scope": "per-tensor"}, {"ks": (0.6, 0.6)}),
        ({"k": 1.0, "dare": 0.3}, {"dares": (0.3, 0.3)}),
    ],
)
def test_every_model_at_one_own_value_is_the_merge_wide_value_bit_for_bit(tmp_path, options, own) -> None:
    models = _bf16_models(tmp_path)
    wide = recipe_for(tmp_path / "base", models, **options)
    reset = {"k": 0.8} if "ks" in own else {"dare": 0.0}  # the merge-wide value left at its default
    per = _with_own(recipe_for(tmp_path / "base", models, **{**options, **reset}), **own)
    assert resolve_variant(per) == resolve_variant(wide)
    mmer.run_merge(wide, tmp_path / "wide")
    mmer.run_merge(per, tmp_path / "per")
    assert _weights(tmp_path / "wide") == _weights(tmp_path / "per")
    with mmer.load_decoupled(tmp_path / "per") as ckpt:
        recorded = ckpt.modality("vision")
        assert (recorded.k, recorded.dare) == (own.get("ks", (None,))[0], own.get("dares", (None,))[0])


def test_per_model_dare_drops_each_model_at_its_own_rate_through_the_whole_merge(tmp_path) -> None:
    models = _bf16_models(tmp_path)
    recipe = _with_own(recipe_for(tmp_path / "base", models, k=1.0, mask="none"), dares=(0.5, None))
    mmer.run_merge(recipe, tmp_path / "out")
    with build_plan(recipe) as plan:
        assert (plan.variant.dare_of(0), plan.variant.dare_of(1)) == (0.5, 0.0)
        from safetensors.torch import load_file

        merged = load_file(str(tmp_path / "out" / "model.safetensors"))
        for slot in plan.merged_slots:
            base, raw = read_slot(plan, slot.name, torch.device("cpu"))
            taus = [dare(raw[0], 0.5, 0, 0, slot.name), raw[1]]
            expected = merge_slot(taus, dataclasses.replace(_variant((1.0, 1.0), mask="none")), slot.name, slot.dtype)
            assert torch.equal(merged[slot.name], (base.float() + expected.stored.float()).to(slot.dtype))


# ------------------------------------------------------------------------------------------- the recipe


def test_a_recipe_file_gives_each_model_its_own_k_and_dare_and_writes_them_back(tmp_path, tiny_models) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        yaml.safe_dump(
            {
                "base": str(tiny_models["base_dir"]),
                "models": [
                    {"model": str(tiny_models["vision_dir"]), "modality": "vision", "k": 0.5, "dare": 0.1},
                    {"model": str(tiny_models["audio_dir"]), "modality": "audio"},
                ],
                "options": {"k": 0.8, "dare": 0.2},
            }
        )
    )
    recipe = build_recipe([recipe_file])
    assert recipe.ks == (0.5, 0.8) and recipe.dares == (0.1, 0.2)
    assert build_recipe([_written(tmp_path, recipe)]) == recipe
    result = cli("merge", str(recipe_file), "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, str(result)
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        assert (ckpt.modality("vision").k, ckpt.modality("vision").dare) == (0.5, 0.1)
        assert (ckpt.modality("audio").k, ckpt.modality("audio").dare) == (None, None)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "K = 0.8 (per model: vision 0.5)" in card and "DARE p = 0.2 (per model: vision 0.1)" in card
    written = yaml.safe_load((tmp_path / "out" / "mmer_recipe.yaml").read_text())
    assert written["models"][0]["k"] == 0.5 and "k" not in written["models"][1]


def _written(tmp_path: Path, recipe: Recipe) -> Path:
    path = tmp_path / "again.yaml"
    path.write_text(recipe.to_compact_yaml(), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("entry", "key", "says"),
    [
        ({"k": 0}, "k", "k of m = 0.0 is out of range"),
        ({"k": 1.5}, "k", "out of range"),
        ({"k": float("nan")}, "k", "out of range"),
        ({"dare": 1.0}, "dare", "dare of m = 1.0 is out of range"),
        ({"dare": -0.1}, "dare", "out of range"),
        ({"k": "half"}, "k", "must be int or float"),
        ({"k": True}, "k", "boolean"),
    ],
)
def test_a_bad_per_model_value_is_refused_naming_the_file_the_key_and_the_range(tmp_path, entry, key, says) -> None:
    with pytest.raises(ConfigError) as info:
        spec_from_dict({"model": "m", "modality": "vision", **entry}, file="vision.yaml")
    err = info.value
    assert err.key == key and says in err.message and err.file == "vision.yaml" and err.hint


def test_a_per_model_value_built_in_python_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="k of m = 2"):
        ModelSpec("m", modality="vision", k=2.0)
    with pytest.raises(ConfigError, match="dare of m = 1"):
        ModelSpec("m", modality="vision", dare=1.0)


def test_a_per_model_k_on_a_method_that_does_not_trim_is_refused_like_the_recipes(tiny_models) -> None:
    recipe = Recipe(
        ModelSpec(str(tiny_models["base_dir"])),
        (
            ModelSpec(str(tiny_models["vision_dir"]), modality="vision", k=0.5),
            ModelSpec(str(tiny_models["audio_dir"]), modality="audio"),
        ),
        MergeOptions(method="average", mask="none"),
    )
    with pytest.raises(ConfigError) as info:
        check_registries(recipe)
    assert info.value.key == "k" and "does not apply to method average" in info.value.message
    assert "model specs" in info.value.hint


# ------------------------------------------------------------------------------------------- the manifest


@pytest.mark.parametrize(
    ("key", "value"), [("k", 0.0), ("k", 1.5), ("k", "0.5"), ("dare", 1.0), ("dare", -0.1), ("dare", True)]
)
def test_a_manifest_whose_per_model_k_or_dare_is_out_of_range_is_refused_naming_the_key(
    tmp_path, tiny_models, key, value
) -> None:
    import json

    from mmer.checkpoint.manifest import MANIFEST_NAME, Manifest
    from mmer.errors import DecoupledFormatError

    recipe = _with_own(
        recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}),
        ks=(0.5, None),
        dares=(0.1, None),
    )
    mmer.run_merge(recipe, tmp_path / "out")
    written = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert (written["modalities"]["vision"]["k"], written["modalities"]["vision"]["dare"]) == (0.5, 0.1)
    assert "k" not in written["modalities"]["audio"] and "dare" not in written["modalities"]["audio"]
    assert Manifest.from_dict(written).to_dict() == written
    written["modalities"]["vision"][key] = value
    with pytest.raises(DecoupledFormatError) as info:
        Manifest.from_dict(written, "ckpt/mmer_manifest.json")
    assert info.value.key == f"modalities.vision.{key}"


def test_a_zero_threshold_warning_names_the_models_own_k_in_merge_and_compare(tmp_path, tiny_models) -> None:
    """audio moves 30 % of its entries: at its own K = 0.9 its global threshold is 0 (more than 10 % is zero);
    vision at K = 0.3 trims."""
    from mmer.compare import run_compare

    recipe = _with_own(
        recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}),
        ks=(0.3, 0.9),
    )
    merged = mmer.run_merge(recipe, tmp_path / "out")
    compared = run_compare(recipe, ["ties/mmer"])
    for warnings in (merged.warnings, compared.warnings):
        zero = [w for w in warnings if "threshold is 0" in w]
        assert len(zero) == 1 and zero[0].startswith("audio:") and "more than 10%" in zero[0], warnings


def test_mmer_add_keeps_each_old_models_own_k_and_takes_the_new_ones(tmp_path, tiny_models) -> None:
    """The add of a model with its own K equals the from-scratch merge of all of them at their own K, bit for bit:
    the manifest's per-model K is read back into the old models' specs."""
    from mmer.add import add_models

    base = tiny_models["base_dir"]
    vision = _with_own(recipe_for(base, {"vision": tiny_models["vision_dir"]}, hash_inputs=True), ks=(0.5,))
    mmer.run_merge(vision, tmp_path / "merged")
    spec = tmp_path / "audio.yaml"
    spec.write_text(yaml.safe_dump({"model": str(tiny_models["audio_dir"]), "modality": "audio", "k": 0.3}))
    add_models(tmp_path / "merged", [spec], tmp_path / "added")
    both = recipe_for(base, {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}, hash_inputs=True)
    mmer.run_merge(_with_own(both, ks=(0.5, 0.3)), tmp_path / "scratch")
    assert _weights(tmp_path / "added") == _weights(tmp_path / "scratch")
    with mmer.load_decoupled(tmp_path / "added") as ckpt:
        assert (ckpt.modality("vision").k, ckpt.modality("audio").k) == (0.5, 0.3)


@pytest.mark.parametrize("key", ["k", "dare"])
def test_a_k_or_dare_on_the_base_is_refused_with_where_to_put_it(tmp_path, key) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        yaml.safe_dump({"base": {"model": "org/base", key: 0.5}, "models": [{"model": "org/a", "modality": "vision"}]})
    )
    with pytest.raises(ConfigError) as info:
        build_recipe([recipe_file])
    assert info.value.key == key and "base" in info.value.message and "fine-tuned" in info.value.hint
    assert info.value.file == str(recipe_file)


def test_mmer_merge_refuses_a_bad_per_model_k_with_exit_code_2_and_json(tmp_path, tiny_models) -> None:
    import json

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        yaml.safe_dump(
            {
                "base": str(tiny_models["base_dir"]),
                "models": [{"model": str(tiny_models["vision_dir"]), "modality": "vision", "k": 1.2}],
            }
        )
    )
    result = cli("merge", str(recipe_file), "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 2, str(result)
    error = json.loads(result.stdout)
    assert error["error"] == "ConfigError" and error["key"] == "k" and error["file"] == str(recipe_file)
    assert "out of range" in error["message"] and error["hint"]
    assert not (tmp_path / "out").exists()
