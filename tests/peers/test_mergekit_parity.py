"""mmer's ``ties`` and ``task_arithmetic`` with mergekit's semantics equal mergekit's output, tensor for tensor.

mergekit (``merge_methods/generalized_task_arithmetic.py``, ``sparsify.py``) trims each tensor on its own to its
``max(1, int(d·numel))`` largest |τ|, multiplies by the weights, elects γ = sign(Σ wᵢτ̂ᵢ) with a zero sum going
to +, sums the agreeing weighted deltas, divides by the agreeing weights (``normalize: true``), scales by
``lambda`` and adds the base. The mmer options that say the same thing: ``method=ties, mask=none,
trim_scope=per-tensor, trim_count=exact, elect_on=weighted, zero_sign=positive, aggregate=mean, alpha=1, k=d``,
with the weights as ``ModelSpec.weight``. The deltas are continuous random floats, so no two magnitudes of a
tensor tie at the trim threshold (where mergekit's ``argsort`` would pick among them arbitrarily and mmer keeps
them all); the fixture checks that.

Runs only where mergekit is installed (``pip install mergekit``); elsewhere every test skips.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import base_state, write_model
from safetensors.torch import load_file

import mmer
from mmer.config import MergeOptions, ModelSpec, Recipe
from mmer.synthetic import TINY_LLAMA

N_MODELS = 3


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A float32 Llama base and three fine-tunes whose deltas are dense continuous noise, same vocabulary."""
    pytest.importorskip("mergekit")  # skip before building anything
    root = tmp_path_factory.mktemp("mergekit-models")
    base = base_state(seed=20)
    g = torch.Generator().manual_seed(21)
    finetunes = [{n: t + torch.randn(t.shape, generator=g) * 0.02 for n, t in base.items()} for _ in range(N_MODELS)]
    for ft in finetunes:
        for name, theta in ft.items():
            magnitudes = (theta - base[name]).abs().reshape(-1)
            assert magnitudes.unique().numel() == magnitudes.numel(), f"tied magnitudes in {name}"
    paths = [write_model(root / "base", base, config=TINY_LLAMA, extra_files=())]
    paths += [write_model(root / f"ft{i}", ft, config=TINY_LLAMA, extra_files=()) for i, ft in enumerate(finetunes)]
    return {"root": root, "base": base, "finetunes": finetunes, "base_dir": paths[0], "dirs": paths[1:]}


def _run_mergekit(models, out: Path, method: str, weights: list[float], parameters: dict, density: float | None):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions as MergekitOptions

    per_model = [
        {"model": str(path), "parameters": {"weight": w, **({"density": density} if density is not None else {})}}
        for path, w in zip(models["dirs"], weights, strict=True)
    ]
    config = MergeConfiguration.model_validate(
        {
            "merge_method": method,
            "base_model": str(models["base_dir"]),
            "models": per_model,
            "parameters": parameters,
            "dtype": "float32",
        }
    )
    run_merge(config, str(out), options=MergekitOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        state |= load_file(str(file))
    return state


def _run_mmer(models, out: Path, weights: list[float], **options) -> dict[str, torch.Tensor]:
    recipe = Recipe(
        ModelSpec(str(models["base_dir"])),
        tuple(
            ModelSpec(str(path), modality=f"m{i}", weight=w)
            for i, (path, w) in enumerate(zip(models["dirs"], weights, strict=True))
        ),
        MergeOptions(mask="none", hash_inputs=False, **options),
    )
    mmer.run_merge(recipe, out)
    return load_file(str(out / "model.safetensors"))


MERGEKIT_TIES = {
    "method": "ties",
    "trim_scope": "per-tensor",
    "trim_count": "exact",
    "elect_on": "weighted",
    "zero_sign": "positive",
    "aggregate": "mean",
    "alpha": 1.0,
}


def _assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(ours[name], tensor), name


@pytest.mark.peer
@pytest.mark.parametrize(
    ("density", "weights"),
    [
        (0.5, [1.0, 1.0, 1.0]),
        (0.3, [1.0, 0.5, 2.0]),
        (0.75, [0.25, 1.5, 1.0]),
        (0.01, [1.0, 1.0, 1.0]),  # small tensors keep max(1, ⌊d·numel⌋) = 1 entry
    ],
)
def test_ties_with_mergekit_semantics_equals_mergekit_tensor_for_tensor(dense_models, tmp_path, density, weights):
    pytest.importorskip("mergekit")
    theirs = _run_mergekit(
        dense_models, tmp_path / "mergekit", "ties", weights, {"normalize": True, "lambda": 1.0}, density
    )
    ours = _run_mmer(dense_models, tmp_path / "mmer", weights, k=density, **MERGEKIT_TIES)
    _assert_same_tensors(ours, theirs)
    # and the merge did something: it is neither the base nor any one of the models
    name = "model.layers.1.mlp.gate_proj.weight"
    assert not torch.equal(ours[name], dense_models["base"][name])


@pytest.mark.peer
@pytest.mark.parametrize(
    "knob",
    [{"elect_on": "raw"}, {"trim_count": "reference"}, {"trim_scope": "global"}, {"aggregate": "sum"}],
    ids=lambda knob: "-".join(f"{k}={v}" for k, v in knob.items()),
)
def test_each_ties_knob_set_to_the_papers_value_departs_from_mergekit(dense_models, tmp_path, knob):
    """The knobs are where mmer's defaults (the TIES paper's reference code) and mergekit differ on purpose:
    ``elect_on=raw`` elects γ on the unweighted trimmed τᵢ (TIES Algorithm 1, PEFT), mergekit on the weighted
    ones (mergekit#474), which flips entries once weights differ; ``trim_count=reference`` keeps ⌊d·numel⌋ + 1
    entries, mergekit ⌊d·numel⌋; ``trim_scope=global`` trims against one threshold over the whole model;
    ``aggregate=sum`` skips the division. Each alone moves the output away from mergekit's; all at mergekit's
    values reproduce it. (``zero_sign`` cannot be told apart here: with continuous deltas Σ wᵢτ̂ᵢ is exactly 0
    only where every τ̂ᵢ was trimmed, and there τ* = 0 whichever sign is elected.)"""
    pytest.importorskip("mergekit")
    weights = [1.0, 0.25, 3.0]
    theirs = _run_mergekit(
        dense_models, tmp_path / "mergekit", "ties", weights, {"normalize": True, "lambda": 1.0}, 0.5
    )
    ours = _run_mmer(dense_models, tmp_path / "mmer", weights, k=0.5, **{**MERGEKIT_TIES, **knob})
    assert set(ours) == set(theirs)
    assert sum(int((ours[n] != theirs[n]).sum()) for n in theirs) > 0
    same = _run_mmer(
        dense_models, tmp_path / "mmer-mergekit", weights, k=0.5, **{**MERGEKIT_TIES, "zero_sign": "zero"}
    )
    _assert_same_tensors(same, theirs)


@pytest.mark.peer
@pytest.mark.parametrize(
    ("weights", "lam"),
    [
        ([1.0, 1.0, 1.0], 1.0),
        ([0.5, 1.5, 1.0], 0.7),
        ([1.0, 1.0, 1.0], 0.3),
    ],
)
def test_task_arithmetic_equals_mergekit_task_arithmetic(dense_models, tmp_path, weights, lam):
    """θ* = θ_base + λ · Σ wᵢτᵢ in both (mergekit's ``normalize`` defaults to false for task_arithmetic)."""
    pytest.importorskip("mergekit")
    theirs = _run_mergekit(dense_models, tmp_path / "mergekit", "task_arithmetic", weights, {"lambda": lam}, None)
    ours = _run_mmer(dense_models, tmp_path / "mmer", weights, method="task_arithmetic", alpha=lam)
    _assert_same_tensors(ours, theirs)


@pytest.mark.peer
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 1.5, 1.0]])
def test_average_equals_mergekit_task_arithmetic_normalised(dense_models, tmp_path, weights):
    """NaiveMC θ* = θ_base + Σ wᵢτᵢ / Σ wᵢ is mergekit's task_arithmetic with ``normalize: true``."""
    pytest.importorskip("mergekit")
    theirs = _run_mergekit(
        dense_models, tmp_path / "mergekit", "task_arithmetic", weights, {"normalize": True, "lambda": 1.0}, None
    )
    ours = _run_mmer(dense_models, tmp_path / "mmer", weights, method="average")
    _assert_same_tensors(ours, theirs)
