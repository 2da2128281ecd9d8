"""Every byte mmer writes, pinned: the sha256 of each output file of a fixed set of merges, adds and rebuilds.

Written before the engine was restructured so that a refactor can prove it changed nothing: each method and mask
rule, both trim scopes, DARE, float32 and bfloat16 inputs (the fused kernel and the eager engine), ``add`` and
``reconstruct``, plus the numbers ``compare`` and ``tune`` report. A change that is *meant* to change outputs
regenerates the pins with ``MMER_UPDATE_PINS=1 pytest tests/test_output_hashes.py`` and says why in its commit.

Outputs record where their inputs were (absolute paths in the manifest, recipe and card), so text files are
hashed with the run's temporary root replaced by ``<root>``; weight and mask files are hashed byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import base_state, component_state, finetune_state, write_model
from test_pipeline import recipe_for

import mmer

PINS = Path(__file__).parent / "data" / "output_hashes.json"
UPDATE = os.environ.get("MMER_UPDATE_PINS") == "1"
TEXT_SUFFIXES = {".json", ".yaml", ".md", ".sha256", ".txt", ""}

MERGES = {
    "ties-mmer-global": {},
    "ties-mmer-per-tensor": {"trim_scope": "per-tensor"},
    "ties-tall": {"mask": "tall"},
    "ties-mmer-dare": {"dare": 0.3, "dare_seed": 7},
    "average-none": {"method": "average", "mask": "none"},
    "task_arithmetic-mmer": {"method": "task_arithmetic"},
    "emr-emr": {"method": "emr", "mask": "emr"},
    "ties-mmer-raw-source": {"mask_source": "raw", "k": 0.5},
    "ties-mmer-float32-deltas": {"delta_dtype": "float32"},
    "ties-mmer-exclude-vocab": {"vocab_policy": "exclude"},
}


def _normalised_hash(path: Path, root: Path) -> str:
    data = path.read_bytes()
    if path.suffix in TEXT_SUFFIXES and path.name != "model.safetensors":
        text = data.decode("utf-8").replace(str(root), "<root>")
        if path.name == "mmer_manifest.json":
            manifest = json.loads(text)
            # Hashes of files that themselves name the root (card, recipe) differ with it: pinned through the files.
            for rel in list(manifest.get("files", {})):
                if Path(rel).suffix in (".md", ".yaml", ".json"):
                    manifest["files"][rel] = "<normalised>"
            text = json.dumps(manifest, indent=2, sort_keys=True)
        elif path.name == "mmer_add.json":
            text = json.dumps(_without_run_facts(json.loads(text)), indent=2, sort_keys=True)
        if path.name == "mmer_manifest.json.sha256":
            return "<sidecar of the normalised manifest>"
        data = text.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


# What differs between two runs of the same work: wall time, memory, and hashes of files that name the root.
RUN_FACTS = {"seconds", "peak_rss_bytes", "timings", "manifest_sha256"}


def _without_run_facts(data):
    if isinstance(data, dict):
        return {k: _without_run_facts(v) for k, v in data.items() if k not in RUN_FACTS}
    if isinstance(data, list):
        return [_without_run_facts(v) for v in data]
    return data


def _report_hash(report, root: Path) -> dict[str, str]:
    text = json.dumps(_without_run_facts(report.to_dict()), sort_keys=True).replace(str(root), "<root>")
    return {"report": hashlib.sha256(text.encode()).hexdigest()}


def tree_hashes(directory: Path, root: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): _normalised_hash(p, root)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """float32 and bfloat16 versions of a base and two fine-tunes (vision adds two vocabulary rows, audio one)."""
    root = tmp_path_factory.mktemp("pins")
    out = {"root": root}
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).removeprefix("torch.")
        base = base_state(dtype=dtype)
        vision = finetune_state(base, seed=1, density=0.6, extra_rows=2)
        audio = finetune_state(base, seed=2, density=0.3, extra_rows=1)
        out[tag] = {
            "base": write_model(root / tag / "base", base),
            "vision": write_model(root / tag / "vision", vision, "hf_legacy", component_state(11)),
            "audio": write_model(root / tag / "audio", audio, "hf_legacy", component_state(12, prefix="audio_tower.")),
        }
    return out


def observed(models) -> dict[str, dict[str, str]]:
    root: Path = models["root"]
    runs: dict[str, dict[str, str]] = {}
    for tag in ("float32", "bfloat16"):
        m = models[tag]
        for name, options in MERGES.items():
            if tag == "bfloat16" and name not in ("ties-mmer-global", "ties-mmer-per-tensor", "emr-emr"):
                continue
            out = root / "out" / tag / name
            mmer.run_merge(recipe_for(m["base"], {"vision": m["vision"], "audio": m["audio"]}, **options), out)
            runs[f"merge/{tag}/{name}"] = tree_hashes(out, root)
    m = models["float32"]
    first = root / "out" / "add" / "first"
    mmer.run_merge(recipe_for(m["base"], {"vision": m["vision"]}), first)
    added = root / "out" / "add" / "added"
    mmer.add_models(first, [mmer.ModelSpec(str(m["audio"]), modality="audio")], added, check_sources=False)
    runs["add/float32/audio-onto-vision"] = tree_hashes(added, root)
    rebuilt = root / "out" / "rebuilt"
    mmer.reconstruct(root / "out" / "float32" / "ties-mmer-global", rebuilt)
    runs["reconstruct/float32/all"] = tree_hashes(rebuilt, root)
    recipe = recipe_for(m["base"], {"vision": m["vision"], "audio": m["audio"]})
    report = mmer.run_compare(recipe, ("ties/mmer", "ties/tall", "average/none", "ties+dare=0.2/mmer"))
    runs["compare/float32"] = _report_hash(report, root)
    tuned = mmer.run_tune(recipe, lambdas=(0.6, 0.9), ks=(0.6, 0.8), workdir=root)
    runs["tune/float32"] = _report_hash(tuned, root)
    return runs


def test_every_output_byte_is_what_it_was_when_pinned(models):
    runs = observed(models)
    if UPDATE:
        PINS.parent.mkdir(exist_ok=True)
        PINS.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"pins rewritten: {PINS}")
    pinned = json.loads(PINS.read_text())
    assert sorted(runs) == sorted(pinned), "the set of pinned runs changed"
    changed = {
        run: sorted(f for f in set(runs[run]) | set(pinned[run]) if runs[run].get(f) != pinned[run].get(f))
        for run in runs
    }
    assert not any(changed.values()), {run: files for run, files in changed.items() if files}
