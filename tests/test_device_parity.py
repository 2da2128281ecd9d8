"""A merge on a CUDA GPU writes the same bytes as the CPU merge of the same inputs (``MergeOptions(device=...)``).

The device only changes where the arithmetic runs, so every tensor file (base copy, τ*, masks, components,
private rows) and every config must be byte-identical. Exactly two files legitimately differ, and only by the
option itself: the manifest and the recipe record ``device`` (the manifest also carries its own sha256 file).
Those are compared with ``device`` set alike, so everything else they hold (the sha256 of every other file,
slots, densities) must still match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_state, component_state, finetune_state, write_model

import mmer
from mmer.config import MergeOptions, ModelSpec, Recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# The files that record the device option (the manifest's .sha256 follows the manifest).
RECORDS_DEVICE = {"mmer_manifest.json", "mmer_manifest.json.sha256", "mmer_recipe.yaml"}


def sha256s(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def merge_on(device: str, models: dict[str, Path], out: Path, **options: object) -> Path:
    recipe = Recipe(
        ModelSpec(str(models["base_dir"])),
        (
            ModelSpec(str(models["vision_dir"]), modality="vision"),
            ModelSpec(str(models["audio_dir"]), modality="audio"),
        ),
        MergeOptions(device=device, **options),
    )
    mmer.run_merge(recipe, out)
    return out


def without_device(directory: Path) -> tuple[dict, dict]:
    manifest = json.loads((directory / "mmer_manifest.json").read_text())
    recipe = yaml.safe_load((directory / "mmer_recipe.yaml").read_text())
    for options in (manifest["options"], recipe["options"]):
        options.pop("device")
    return manifest, recipe


def assert_same_merge(cpu: Path, gpu: Path) -> None:
    cpu_files, gpu_files = sha256s(cpu), sha256s(gpu)
    assert sorted(cpu_files) == sorted(gpu_files)
    differing = {name for name in cpu_files if cpu_files[name] != gpu_files[name]}
    assert differing <= RECORDS_DEVICE, f"the GPU merge wrote different bytes in {sorted(differing - RECORDS_DEVICE)}"
    assert without_device(cpu) == without_device(gpu)


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny fixtures' base and fine-tunes stored in bfloat16: the casts a bf16 merge does must agree too."""
    root = tmp_path_factory.mktemp("bf16")
    base = base_state(dtype=torch.bfloat16)
    vision = finetune_state(base, seed=1, density=0.6, extra_rows=2)
    audio = finetune_state(base, seed=2, density=0.3, extra_rows=1)
    return {
        "base_dir": write_model(root / "base", base),
        "vision_dir": write_model(root / "vision", vision, "hf_legacy", component_state(11)),
        "audio_dir": write_model(root / "audio", audio, "hf_legacy", component_state(12, prefix="audio_tower.")),
    }


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"trim_scope": "per-tensor"},
        {"method": "emr", "mask": "emr"},
        {"dare": 0.3, "dare_seed": 7},
        {"zero_sign": "majority", "mask": "magnitude_only"},
    ],
    ids=["defaults", "per-tensor-trim", "emr", "dare", "majority-census-magnitude-only"],
)
def test_a_cuda_merge_writes_the_bytes_of_the_cpu_merge(tiny_models, tmp_path, options):
    cpu = merge_on("cpu", tiny_models, tmp_path / "cpu", **options)
    gpu = merge_on("cuda", tiny_models, tmp_path / "cuda", **options)
    assert_same_merge(cpu, gpu)


def test_a_cuda_merge_of_bfloat16_models_writes_the_bytes_of_the_cpu_merge(bf16_models, tmp_path):
    cpu = merge_on("cpu", bf16_models, tmp_path / "cpu")
    gpu = merge_on("cuda", bf16_models, tmp_path / "cuda")
    assert_same_merge(cpu, gpu)
