"""``zero_sign: majority``: where Σᵢ τᵢ is exactly 0, γ is the sign most entries of the *whole model* elect (the TIES
authors' ``resolve_zero_signs(..., "majority")``, as ModelCompose and FusionBench call it), counted by one census
pass before any slot is merged, recorded in the manifest and the report, and identical on both engines.

The golden models move only two tensors. In ``q_proj`` entry 0 the two task vectors cancel exactly (+0.5 and
−0.5) and entry 1 elects +; in ``down_proj`` three entries elect the sign ``s`` the case chooses. So the tie in one
slot is decided by the other: s = −1 gives 1 positive and 3 negative (majority −1, τ* = −0.5 there), s = +1 gives
4 positive (majority +1, τ* = +0.5). Every value is a multiple of 1/16 below 2: exact in bf16 and float16.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml
from conftest import base_state, write_model
from test_pipeline import recipe_for

import mmer
from mmer.checkpoint.sources import checkpoint_options
from mmer.compare import run_compare

TIED = "model.layers.0.self_attn.q_proj.weight"
DECIDER = "model.layers.1.mlp.down_proj.weight"


def golden_models(root, decider_sign: float, dtype: torch.dtype = torch.bfloat16) -> dict[str, object]:
    base = {n: (t.float() * 16).round().clamp(-8, 8).div(16).to(dtype) for n, t in base_state().items()}
    taus = {m: {n: torch.zeros(t.shape) for n, t in base.items()} for m in ("vision", "audio")}
    taus["vision"][TIED].view(-1)[:2] = torch.tensor([0.5, 0.25])
    taus["audio"][TIED].view(-1)[0] = -0.5
    taus["vision"][DECIDER].view(-1)[:3] = decider_sign * 0.25
    taus["audio"][DECIDER].view(-1)[:3] = decider_sign * 0.125
    write_model(root / "base", base)
    dirs = {}
    for m, tau in taus.items():
        theta = {n: (base[n].float() + tau[n]).to(dtype) for n in base}
        assert all(torch.equal(theta[n].float() - base[n].float(), tau[n]) for n in base)  # exact
        dirs[m] = write_model(root / m, theta)
    return {"base": root / "base", "models": dirs}


@pytest.mark.parametrize(
    ("decider_sign", "census", "tied_value"),
    [
        (-1.0, {"positive": 1, "negative": 3, "majority_sign": -1}, -0.5),
        (1.0, {"positive": 4, "negative": 0, "majority_sign": 1}, 0.5),
    ],
)
def test_a_zero_sum_takes_the_majority_sign_that_another_tensor_decides(tmp_path, decider_sign, census, tied_value):
    models = golden_models(tmp_path, decider_sign)
    recipe = recipe_for(models["base"], models["models"], zero_sign="majority", k=1.0)
    report = mmer.run_merge(recipe, tmp_path / "out")
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        tau_star = ckpt.tau_star(TIED).float().reshape(-1)
        assert tau_star[:2].tolist() == [tied_value, 0.25]
        assert ckpt.tau_star(DECIDER).float().reshape(-1)[:4].tolist() == [decider_sign * 0.1875] * 3 + [0.0]
        # Eq. 3 against the stored τ*: only the model whose sign won the tie keeps the entry
        assert ckpt.mask("vision", TIED).reshape(-1)[0].item() is (tied_value > 0)
        assert ckpt.mask("audio", TIED).reshape(-1)[0].item() is (tied_value < 0)
        assert ckpt.manifest.options["sign_census"] == census
        assert checkpoint_options(ckpt).zero_sign == "majority"  # add and tune reopen it; they count anew
    assert report.plan["options"]["sign_census"] == census
    written = yaml.safe_load((tmp_path / "out" / "mmer_recipe.yaml").read_text())
    assert "sign_census" not in written["options"]  # counted, not set: a rerun counts it again


@pytest.mark.parametrize(("zero_sign", "tied_value"), [("zero", 0.0), ("positive", 0.5)])
def test_the_other_zero_sign_rules_need_no_census_and_record_none(tmp_path, zero_sign, tied_value):
    models = golden_models(tmp_path, -1.0)
    mmer.run_merge(recipe_for(models["base"], models["models"], zero_sign=zero_sign, k=1.0), tmp_path / "out")
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        assert ckpt.tau_star(TIED).float().reshape(-1)[0].item() == tied_value
        assert "sign_census" not in ckpt.manifest.options


@pytest.mark.parametrize(
    ("dtype", "options"),
    [(torch.bfloat16, {"k": 1.0}), (torch.float16, {"k": 0.8}), (torch.bfloat16, {"k": 0.8, "mask": "sign_only"})],
    ids=["bf16-untrimmed", "fp16-trimmed", "bf16-trimmed-sign_only"],
)
def test_both_engines_count_the_same_census_and_write_the_same_bytes(tmp_path, monkeypatch, dtype, options):
    pytest.importorskip("numba")
    import mmer.runtime as runtime
    from mmer.merge import one_pass

    models = golden_models(tmp_path, -1.0, dtype)
    recipe = recipe_for(models["base"], models["models"], zero_sign="majority", **options)
    monkeypatch.setattr(runtime, "CPU_CHUNK", 200)  # the larger tensors in several chunks, with ragged tails
    calls = []
    for name in ("census_chunk", "merge_chunk"):
        real = getattr(one_pass, name)
        monkeypatch.setattr(
            one_pass, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    used = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MMER_FUSED", flag)
        for cached in (one_pass._kernel, one_pass._census_kernel):
            cached.cache_clear()
        calls.clear()
        mmer.run_merge(recipe, tmp_path / f"out{flag}")
        used[flag] = set(calls)
    for cached in (one_pass._kernel, one_pass._census_kernel):
        cached.cache_clear()
    assert used == {"1": {"census_chunk", "merge_chunk"}, "0": set()}  # the kernels really ran, and really did not
    files = sorted(p.relative_to(tmp_path / "out1") for p in (tmp_path / "out1").rglob("*.safetensors"))
    for rel in files:
        assert (tmp_path / "out1" / rel).read_bytes() == (tmp_path / "out0" / rel).read_bytes(), rel
    census = [
        json.loads((tmp_path / f"out{f}" / "mmer_manifest.json").read_text())["options"]["sign_census"] for f in "10"
    ]
    assert census[0] == census[1] == {"positive": 1, "negative": 3, "majority_sign": -1}


def test_compare_counts_each_electing_variant_s_census_as_a_merge_would(tmp_path):
    models = golden_models(tmp_path, -1.0)
    recipe = recipe_for(models["base"], models["models"], zero_sign="majority", k=1.0)
    report = run_compare(recipe, ("ties/mmer", "ties/sign_only", "average/none")).to_dict()
    by_label = {v["variant"]: v for v in report["variants"]}
    expected = {"positive": 1, "negative": 3, "majority_sign": -1}
    assert by_label["ties/mmer"]["sign_census"] == by_label["ties/sign_only"]["sign_census"] == expected
    assert "sign_census" not in by_label["average/none"]  # averaging elects no signs
    mmer.run_merge(replace(recipe, options=replace(recipe.options, mask="sign_only")), tmp_path / "out")
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        assert ckpt.manifest.options["sign_census"] == expected
        assert ckpt.modality("audio").density == pytest.approx(
            by_label["ties/sign_only"]["modalities"]["audio"]["density"]
        )


def test_adding_a_model_recounts_the_census_over_every_task_vector(tmp_path):
    """The census belongs to one set of task vectors: ``mmer add`` counts it again with the new one, and ends where
    a merge of all three from scratch ends (the new model flips the majority here)."""
    from mmer.config import ModelSpec

    models = golden_models(tmp_path, -1.0)
    recipe = recipe_for(models["base"], models["models"], zero_sign="majority", k=1.0)
    mmer.run_merge(recipe, tmp_path / "two")
    with mmer.load_decoupled(tmp_path / "two") as ckpt:
        point = {s.name: ckpt.base_tensor(s.name).float() for s in ckpt.slots}
    point[DECIDER].view(-1)[3:8] += 0.25  # five more + elections: 6 positive against 3 negative
    write_model(tmp_path / "point", {n: t.to(torch.bfloat16) for n, t in point.items()})
    mmer.add_models(tmp_path / "two", [ModelSpec(str(tmp_path / "point"), modality="point")], tmp_path / "three")
    scratch = recipe_for(
        models["base"], {**models["models"], "point": tmp_path / "point"}, zero_sign="majority", k=1.0
    )
    mmer.run_merge(scratch, tmp_path / "scratch")
    with mmer.load_decoupled(tmp_path / "three") as added, mmer.load_decoupled(tmp_path / "scratch") as fresh:
        assert added.manifest.options["sign_census"] == {"positive": 6, "negative": 3, "majority_sign": 1}
        assert fresh.manifest.options["sign_census"] == added.manifest.options["sign_census"]
        assert added.tau_star(TIED).float().reshape(-1)[0].item() == 0.5
        for slot in fresh.slots:
            assert torch.equal(added.tau_star(slot.name), fresh.tau_star(slot.name)), slot.name
