"""Every supported (method, mask) combination through ``mmer.run_merge`` on the tiny fixtures: it streams, writes a
checkpoint ``load_decoupled`` reads, and holds what an in-memory computation of the same variant holds.

Unsupported combinations are refused before any output exists; ``mask: none`` writes a plain Hugging Face model
that transformers loads; EMR's per-modality rescaler in the manifest equals a hand computation over the whole
model; DARE is bit-reproducible from its seed.
"""

from __future__ import annotations

import json

import pytest
import torch

import mmer
from mmer.config import MergeOptions, ModelSpec, Recipe
from mmer.errors import ConfigError, DecoupledFormatError
from mmer.merge.masks import rebuild_weight
from mmer.merge.slot import apply_dare, merge_slot
from mmer.merge.trim import rank_to_threshold
from mmer.plan import resolve_variant

MODALITIES = ("vision", "audio")


def recipe_for(tiny_models, weights: dict[str, float] | None = None, **options) -> Recipe:
    weights = weights or {}
    return Recipe(
        ModelSpec(str(tiny_models["base_dir"])),
        tuple(ModelSpec(str(tiny_models[f"{m}_dir"]), modality=m, weight=weights.get(m)) for m in MODALITIES),
        MergeOptions(**{"hash_inputs": False, **options}),
    )


def raw_task_vectors(tiny_models) -> dict[str, list[torch.Tensor]]:
    """τᵢ = θᵢ − θ_base over the base's rows, float32, per canonical tensor name."""
    base = tiny_models["base"]
    return {n: [tiny_models[m][n][: b.shape[0]].float() - b.float() for m in MODALITIES] for n, b in base.items()}


def in_memory(tiny_models, recipe: Recipe) -> dict[str, object]:
    """The same variant merged with the whole model in memory: global thresholds by ``kthvalue`` over the
    concatenation, then the slot math per tensor."""
    variant = resolve_variant(recipe)
    taus = raw_task_vectors(tiny_models)
    thresholds = None
    if variant.needs_global_threshold:
        dared = {n: apply_dare(t, variant, n) for n, t in taus.items()}
        thresholds = []
        for i in range(len(MODALITIES)):
            flat = torch.cat([dared[n][i].reshape(-1) for n in taus]).abs()
            thresholds.append(float(flat.kthvalue(rank_to_threshold(flat.numel(), variant.k, variant.trim_count))[0]))
    return {n: merge_slot(t, variant, n, torch.float32, thresholds) for n, t in taus.items()}


def _combinations() -> list[tuple[str, str, float]]:
    combos = [
        (method, mask, 0.0) for method in ("average", "task_arithmetic", "ties", "emr") for mask in ("mmer", "tall")
    ]
    combos += [(method, "none", 0.0) for method in ("average", "task_arithmetic", "ties", "emr")]
    combos += [("emr", "emr", 0.0)]
    combos += [
        ("ties", "mmer", 0.3),
        ("ties", "none", 0.2),
        ("average", "tall", 0.5),
        ("task_arithmetic", "mmer", 0.1),
    ]
    return combos


@pytest.mark.parametrize(
    ("method", "mask", "p"),
    _combinations(),
    ids=[f"{m}{'+dare' if p else ''}/{k}" for m, k, p in _combinations()],
)
def test_every_supported_combination_writes_a_readable_checkpoint_equal_to_the_in_memory_merge(
    tiny_models, tmp_path, method, mask, p
):
    seed = {"dare_seed": 3} if p else {}  # a DARE seed without DARE is refused: it would change nothing
    recipe = recipe_for(tiny_models, method=method, mask=mask, dare=p, shard_size=8192, **seed)
    report = mmer.run_merge(recipe, tmp_path / "out")
    expected = in_memory(tiny_models, recipe)
    base = tiny_models["base"]
    manifest = json.loads((tmp_path / "out" / "mmer_manifest.json").read_text())
    assert manifest["options"]["method"] == method and manifest["options"]["mask"] == mask
    assert manifest["options"]["dare"] == p
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        assert ckpt.modalities == list(MODALITIES)
        assert ckpt.is_single_model is (mask == "none")
        for name, result in expected.items():
            if mask == "none":
                merged = ckpt.merged_tensor(name)
                assert torch.equal(merged, base[name] + result.stored), name
                for modality in MODALITIES:
                    rebuilt = ckpt.llm_tensor(modality, name)
                    assert torch.equal(rebuilt[: base[name].shape[0]], merged)
                    assert rebuilt.shape == tiny_models[modality][name].shape
                continue
            assert torch.equal(ckpt.tau_star(name), result.stored), name
            for i, modality in enumerate(MODALITIES):
                mask_i = ckpt.mask(modality, name)
                assert torch.equal(mask_i, result.masks[i]), (modality, name)
                scale = ckpt.modality(modality).scale
                rebuilt = ckpt.llm_tensor(modality, name)
                want = rebuild_weight(base[name], result.stored, mask_i, scale=scale)
                assert torch.equal(rebuilt[: base[name].shape[0]], want)
                # private vocabulary rows come back untouched
                assert torch.equal(rebuilt[base[name].shape[0] :], tiny_models[modality][name][base[name].shape[0] :])
        if mask == "none":
            with pytest.raises(DecoupledFormatError, match="no τ"):
                ckpt.tau_star("lm_head.weight")
        else:
            for modality in MODALITIES:
                kept = sum(int(r.masks[MODALITIES.index(modality)].sum()) for r in expected.values())
                assert ckpt.modality(modality).kept == kept
    assert [m.name for m in report.modalities] == list(MODALITIES)


@pytest.mark.parametrize("method", ["ties", "average", "task_arithmetic"])
def test_mask_emr_with_another_method_is_refused_before_any_output_exists(tiny_models, tmp_path, method):
    with pytest.raises(ConfigError, match="mask emr with method") as info:
        mmer.run_merge(recipe_for(tiny_models, method=method, mask="emr"), tmp_path / "out")
    assert info.value.hint and "--method emr" in info.value.hint
    assert list(tmp_path.iterdir()) == []


def test_unknown_mask_is_refused_before_any_output_exists(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="unknown mask rule"):
        mmer.run_merge(recipe_for(tiny_models, mask="tal"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_method_emr_with_per_model_weights_is_refused_before_any_output_exists(tiny_models, tmp_path):
    recipe = recipe_for(tiny_models, weights={"vision": 2.0}, method="emr", mask="emr")
    with pytest.raises(ConfigError, match="weights"):
        mmer.run_merge(recipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("method", "weights", "hand"),
    [
        # NaiveMC: θ* = θ_base + (τ_v + τ_a) / 2
        ("average", None, lambda tv, ta: (tv + ta) / 2),
        # weighted NaiveMC, w = (1, 3): θ* = θ_base + (1·τ_v + 3·τ_a) / 4
        ("average", {"vision": 1.0, "audio": 3.0}, lambda tv, ta: (tv * 1.0 + ta * 3.0) / 4.0),
        # task arithmetic at its default α = 0.3: θ* = θ_base + 0.3 (τ_v + τ_a)
        ("task_arithmetic", None, lambda tv, ta: (tv + ta) * 0.3),
    ],
)
def test_mask_none_writes_a_model_transformers_loads_with_weights_base_plus_tau_star(
    tiny_models, tmp_path, method, weights, hand
):
    from transformers import LlamaForCausalLM

    mmer.run_merge(recipe_for(tiny_models, weights=weights, method=method, mask="none"), tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
    assert not (tmp_path / "out" / "tau_star").exists() and not (tmp_path / "out" / "masks").exists()
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    state = model.state_dict()
    taus = raw_task_vectors(tiny_models)
    assert set(state) == set(tiny_models["base"])
    for name, base in tiny_models["base"].items():
        expected = base + hand(*taus[name])
        assert torch.equal(state[name], expected), name
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 40) and bool(torch.isfinite(logits).all())


def test_emr_rescaler_in_the_manifest_equals_a_hand_computation_over_the_whole_model(tiny_models, tmp_path):
    """sᵢ = Σₙ mean|τᵢ,ₙ| / Σₙ mean|Mᵢ,ₙ∘τ_uni,ₙ|, n over every merged tensor; computed here in float64."""
    report = mmer.run_merge(recipe_for(tiny_models, method="emr", mask="emr"), tmp_path / "out")
    taus = raw_task_vectors(tiny_models)
    num = dict.fromkeys(MODALITIES, 0.0)
    den = dict.fromkeys(MODALITIES, 0.0)
    for stack in taus.values():
        t = torch.stack(stack).double()
        gamma = torch.where(t.sum(0) > 0, 1.0, -1.0).double()
        unified = gamma * torch.where(t * gamma > 0, t.abs(), 0.0).amax(0)
        for i, modality in enumerate(MODALITIES):
            num[modality] += t[i].abs().mean().item()
            den[modality] += torch.where(t[i] * unified > 0, unified.abs(), 0.0).mean().item()
    manifest = json.loads((tmp_path / "out" / "mmer_manifest.json").read_text())
    for modality in MODALITIES:
        expected = num[modality] / den[modality]
        assert expected != pytest.approx(1.0, abs=1e-3)  # a real rescale, not the identity
        assert manifest["modalities"][modality]["scale"] == pytest.approx(expected, rel=1e-6)
        assert (
            next(m for m in report.modalities if m.name == modality).scale == manifest["modalities"][modality]["scale"]
        )
    with mmer.load_decoupled(tmp_path / "out") as ckpt:
        name = "model.layers.0.mlp.down_proj.weight"
        scale = manifest["modalities"]["audio"]["scale"]
        want = rebuild_weight(tiny_models["base"][name], ckpt.tau_star(name), ckpt.mask("audio", name), scale=scale)
        assert torch.equal(ckpt.llm_tensor("audio", name), want)


@pytest.mark.parametrize("mask", ["mmer", "none"])
def test_dare_with_the_same_seed_gives_bit_identical_files_and_another_seed_differs(tiny_models, tmp_path, mask):
    def files(out: str, seed: int) -> dict[str, str]:
        mmer.run_merge(recipe_for(tiny_models, method="ties", mask=mask, dare=0.3, dare_seed=seed), tmp_path / out)
        return json.loads((tmp_path / out / "mmer_manifest.json").read_text())["files"]

    first, again, other = files("a", 7), files("b", 7), files("c", 8)
    assert first == again
    weights = "tau_star/model.safetensors" if mask != "none" else "model.safetensors"
    assert first[weights] != other[weights]
    if mask != "none":
        assert first["masks/vision.safetensors"] != other["masks/vision.safetensors"]


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_a_weight_out_of_range_given_through_the_python_api_is_refused_before_any_output(
    tiny_models, tmp_path, weight
):
    with pytest.raises(ConfigError, match="weight"):
        recipe = recipe_for(tiny_models, weights={"vision": weight}, method="average", mask="mmer")
        mmer.run_merge(recipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
