"""A mergekit config whose models have different ``density`` values, merged by mergekit and by ``mmer merge``.

mmer reads each model's density as that model's own K (``ties``) or DARE p = 1 − density (``dare_ties``,
``dare_linear``), next to it in the recipe (mmer/mergekit_config.py). ``ties`` then agrees bit for bit: each τᵢ is
trimmed per tensor to its own ``max(1, ⌊density·numel⌋)`` largest magnitudes, as mergekit's ``sparsify`` does it.
DARE agrees in distribution only (mergekit draws from torch's global generator and rescales each tensor to its L1
norm, mmer draws seeded masks and rescales by 1/density: see test_mergekit_config_parity.py), so there the models
move disjoint entries (model 0 the even ones, model 1 the odd ones) and each model's share of τ* is compared: the
fraction dropped is its own 1 − density, and its mass agrees with mergekit's.

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


def _write(root: Path, base: dict, finetunes: list[dict]) -> dict:
    return {
        "base": base,
        "base_dir": write_model(root / "base", base, config=TINY_LLAMA, extra_files=()),
        "dirs": [
            write_model(root / f"ft{i}", ft, config=TINY_LLAMA, extra_files=()) for i, ft in enumerate(finetunes)
        ],
    }


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A float32 Llama base and three fine-tunes whose deltas are dense continuous noise (no ties at a threshold)."""
    pytest.importorskip("mergekit")
    base = base_state(seed=40)
    g = torch.Generator().manual_seed(41)
    finetunes = [{n: t + torch.randn(t.shape, generator=g) * 0.02 for n, t in base.items()} for _ in range(3)]
    return _write(tmp_path_factory.mktemp("per-model-density"), base, finetunes)


@pytest.fixture(scope="module")
def disjoint(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two fine-tunes moving disjoint entries: model 0 every even flat index, model 1 every odd one."""
    pytest.importorskip("mergekit")
    base = base_state(seed=42)
    g = torch.Generator().manual_seed(43)
    finetunes = []
    for parity in (0, 1):
        state = {}
        for name, t in base.items():
            moves = (torch.arange(t.numel()) % 2 == parity).reshape(t.shape)
            state[name] = t + torch.randn(t.shape, generator=g) * 0.02 * moves
        finetunes.append(state)
    return _write(tmp_path_factory.mktemp("disjoint"), base, finetunes)


def _config(models: dict, method: str, weights: list[float], densities: list[float | None], **top) -> dict:
    entries = []
    for path, weight, density in zip(models["dirs"], weights, densities, strict=True):
        parameters = {"weight": weight, **({"density": density} if density is not None else {})}
        entries.append({"model": str(path), "parameters": parameters})
    return {
        "merge_method": method,
        "base_model": str(models["base_dir"]),
        "models": entries,
        "dtype": "float32",
        **top,
    }


def _both(config: dict, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(mmer's tensors, mergekit's tensors) for one config file."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    result = cli("merge", str(path), "-o", str(tmp_path / "mmer"), "--json")
    assert result.exit_code == 0, str(result)
    ours = load_file(str(tmp_path / "mmer" / "model.safetensors"))
    out = tmp_path / "mergekit"
    run_merge(
        MergeConfiguration.model_validate(config),
        str(out),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    theirs: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        theirs |= load_file(str(file))
    assert set(ours) == set(theirs)
    return ours, theirs


@pytest.mark.parametrize(
    ("weights", "densities", "parameters"),
    [
        ([1.0, 0.5, 2.0], [0.2, 0.6, 0.9], {}),
        ([1.0, 1.0, 1.0], [0.5, None, 0.1], {"normalize": False, "lambda": 0.7}),  # None: mergekit keeps it whole
    ],
)
def test_a_ties_config_with_a_density_per_model_merges_to_the_same_tensors_as_mergekit(
    dense, tmp_path, weights, densities, parameters
) -> None:
    ours, theirs = _both(_config(dense, "ties", weights, densities, parameters=parameters), tmp_path)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(ours[name], tensor), name
    # and it is not the merge at one density: the smallest and the largest each give other tensors
    name = "model.layers.1.mlp.gate_proj.weight"
    for one in (min(d for d in densities if d), max(d for d in densities if d)):
        at_one = tmp_path / f"at-{one}"
        at_one.mkdir()
        single, _ = _both(_config(dense, "ties", weights, [one] * 3, parameters=parameters), at_one)
        assert not torch.equal(single[name], ours[name])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_a_dare_config_with_a_density_per_model_drops_each_models_own_share_as_mergekit_does(
    disjoint, tmp_path, method
) -> None:
    densities = [0.3, 0.8]
    torch.manual_seed(0)  # mergekit's draws
    ours, theirs = _both(_config(disjoint, method, [1.0, 1.0], densities), tmp_path)
    base = disjoint["base"]
    names = sorted(theirs)
    for parity, density in enumerate(densities):
        support = {n: (torch.arange(base[n].numel()) % 2 == parity).reshape(base[n].shape) for n in names}
        count = sum(int(support[n].sum()) for n in names)
        dropped = [sum(int(((t[n] == base[n]) & support[n]).sum()) for n in names) / count for t in (ours, theirs)]
        mass = [sum(float(((t[n] - base[n]).abs() * support[n]).sum()) for n in names) for t in (ours, theirs)]
        assert dropped[0] == pytest.approx(1 - density, abs=0.03), (parity, dropped)
        assert dropped[1] == pytest.approx(1 - density, abs=0.03), (parity, dropped)
        assert mass[0] == pytest.approx(mass[1], rel=0.05), (parity, mass)
