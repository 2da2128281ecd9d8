"""One mergekit config, merged by mergekit and by ``mmer merge config.yml``: the same tensors.

The config file is the user's, unchanged: mmer reads it as the mmer recipe that computes the same merge
(mmer/mergekit_config.py) and mergekit reads it as itself. ties, task_arithmetic and the DARE methods without a
drop agree bit for bit (mmer's options then run the very operations mergekit runs, in the same order); ``linear``
agrees within float32 rounding (mergekit sums Σ wᵢθᵢ / W, mmer adds θ_base + Σ wᵢτᵢ / W: |Δ| ≤ 1e-6 + 1e-5·|θ|);
DARE with a drop agrees in distribution only (mergekit draws from torch's global generator and rescales each tensor
to its L1 norm, mmer draws seeded masks and rescales by 1/density), so that case compares the fraction dropped and
the mass of τ*. The deltas are continuous random floats, so no two magnitudes of a tensor tie at a trim threshold.

Runs only where mergekit is installed (the ``peer`` extra); elsewhere every test skips.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import cli
from conftest import base_state, write_model
from safetensors.torch import load_file

from mmer.synthetic import TINY_LLAMA

pytestmark = pytest.mark.peer

N_MODELS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A float32 Llama base and three fine-tunes whose deltas are dense continuous noise."""
    pytest.importorskip("mergekit")
    root = tmp_path_factory.mktemp("mergekit-config-models")
    base = base_state(seed=30)
    g = torch.Generator().manual_seed(31)
    finetunes = [{n: t + torch.randn(t.shape, generator=g) * 0.02 for n, t in base.items()} for _ in range(N_MODELS)]
    base_dir = write_model(root / "base", base, config=TINY_LLAMA, extra_files=())
    dirs = [write_model(root / f"ft{i}", ft, config=TINY_LLAMA, extra_files=()) for i, ft in enumerate(finetunes)]
    return {"base": base, "base_dir": base_dir, "dirs": dirs}


def _config(models, method: str, weights, per_model: dict | None = None, **top) -> dict:
    entries = [
        {"model": str(path), "parameters": {"weight": w, **(per_model or {})}}
        for path, w in zip(models["dirs"], weights, strict=True)
    ]
    return {
        "merge_method": method,
        "base_model": str(models["base_dir"]),
        "models": entries,
        "dtype": "float32",
        **top,
    }


def _both(config: dict, tmp_path: Path, mergekit_config: dict | None = None):
    """(mmer's tensors, mergekit's tensors) for one config file."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    result = cli("merge", str(path), "-o", str(tmp_path / "mmer"), "--json")
    assert result.exit_code == 0, str(result)
    ours = load_file(str(tmp_path / "mmer" / "model.safetensors"))
    theirs_config = MergeConfiguration.model_validate(mergekit_config or yaml.safe_load(path.read_text()))
    out = tmp_path / "mergekit"
    run_merge(theirs_config, str(out), options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    theirs: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        theirs |= load_file(str(file))
    assert set(ours) == set(theirs)
    return ours, theirs


def _assert_equal(ours, theirs) -> None:
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize(
    ("weights", "density", "parameters"),
    [
        ([1.0, 0.5, 2.0], 0.3, {}),
        ([1.0, 1.0, 1.0], 0.5, {"normalize": False, "lambda": 0.7}),
        ([0.25, 1.5, 1.0], 1.0, {}),
    ],
)
def test_a_mergekit_ties_config_merges_to_the_same_tensors_as_mergekit(
    models, tmp_path, weights, density, parameters
) -> None:
    config = _config(models, "ties", weights, {"density": density}, parameters=parameters)
    ours, theirs = _both(config, tmp_path)
    _assert_equal(ours, theirs)
    name = "model.layers.1.mlp.gate_proj.weight"
    assert not torch.equal(ours[name], models["base"][name])


@pytest.mark.parametrize("parameters", [{"lambda": 0.5}, {"normalize": True}, {"normalize": True, "lambda": 0.8}])
def test_a_mergekit_task_arithmetic_config_merges_to_the_same_tensors_as_mergekit(models, tmp_path, parameters):
    ours, theirs = _both(_config(models, "task_arithmetic", [1.0, 0.5, 1.5], parameters=parameters), tmp_path)
    _assert_equal(ours, theirs)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_a_dare_config_without_a_drop_merges_to_the_same_tensors_as_mergekit(models, tmp_path, method) -> None:
    """density 1: no drop, so what is left is the rest of the method (dare_ties: TIES election, summed)."""
    ours, theirs = _both(_config(models, method, [1.0, 0.5, 2.0], {"density": 1.0}), tmp_path)
    _assert_equal(ours, theirs)


def test_a_mergekit_linear_config_merges_to_the_same_tensors_within_float32_rounding(models, tmp_path) -> None:
    config = _config(models, "linear", [1.0, 3.0, 0.5])
    config["models"].insert(0, {"model": str(models["base_dir"]), "parameters": {"weight": 2.0}})
    ours, theirs = _both(config, tmp_path)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_linear_config_whose_base_is_not_listed_is_the_weighted_average_of_the_fine_tunes(models, tmp_path):
    """mergekit refuses a linear config whose base has no weight; without ``base_model`` it averages the listed
    models, which is what mmer does with the base named and unweighted."""
    config = _config(models, "linear", [1.0, 3.0, 0.5])
    without_base = {k: v for k, v in config.items() if k != "base_model"}
    ours, theirs = _both(config, tmp_path, mergekit_config=without_base)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_a_dare_config_drops_the_same_fraction_and_keeps_the_same_mass_as_mergekit(models, tmp_path, method) -> None:
    """One fine-tune, density 0.5: about half of τ* is zero in both, and ‖τ*‖₁ agrees to a few percent (the
    rescalings differ by draw: 1/density against each tensor's L1 ratio)."""
    config = _config(models, method, [1.0, 1.0, 1.0], {"density": 0.5})
    config["models"] = config["models"][:1]
    torch.manual_seed(0)  # mergekit's draws
    ours, theirs = _both(config, tmp_path)
    base = models["base"]
    names = sorted(theirs)
    numel = sum(theirs[n].numel() for n in names)
    dropped = [sum(int((t[n] == base[n]).sum()) for n in names) / numel for t in (ours, theirs)]
    mass = [sum(float((t[n] - base[n]).abs().sum()) for n in names) for t in (ours, theirs)]
    assert dropped[0] == pytest.approx(0.5, abs=0.03) and dropped[1] == pytest.approx(0.5, abs=0.03)
    assert mass[0] == pytest.approx(mass[1], rel=0.05)
    assert sum(int((ours[n] != theirs[n]).sum()) for n in names) > 0  # different draws, as said
