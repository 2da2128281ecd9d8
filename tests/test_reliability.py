"""Faults lose nothing, output is deterministic across processes and thread counts, and memory stays bounded.

Each scenario runs the real CLI or library in a subprocess where the process matters (signals, thread counts,
peak RSS), so the test sees exactly what a user or a CI job would.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import base_state, finetune_state, write_model
from test_pipeline import recipe_for

import mmer
from mmer.errors import DiskFullError
from mmer.synthetic import TINY_LLAMA
from mmer.verify import verify

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "mmer-staging" in p.name or p.name == "out"]


def test_sigterm_mid_merge_removes_the_partial_output_and_says_so(tiny_models, tmp_path):
    """A CI job cancelled mid-merge (SIGTERM) leaves neither the output nor the staging directory."""
    script = f"""
        import sys, time
        import mmer.pipeline as pipeline
        from mmer_cli.main import app

        real = pipeline.merge_slots

        def slow(plan, staging, *args, **kwargs):
            out = real(plan, staging, *args, **kwargs)
            print("STAGED", flush=True)
            time.sleep(60)
            return out

        pipeline.merge_slots = slow
        sys.argv = ["mmer", "merge", "{tmp_path / "base.yaml"}", "{tmp_path / "vision.yaml"}",
                    "-o", "{tmp_path / "out"}", "--quiet", "--no-hash-inputs"]
        app()
    """
    (tmp_path / "base.yaml").write_text(f"model: {tiny_models['base_dir']}\n")
    (tmp_path / "vision.yaml").write_text(f"model: {tiny_models['vision_dir']}\nmodality: vision\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "STAGED" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "STAGED" in line, proc.stderr.read()
    assert [p for p in tmp_path.iterdir() if "mmer-staging" in p.name], "the merge should be writing by now"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "nothing was written" in stderr
    assert _leftovers(tmp_path) == []


def test_a_full_disk_is_reported_and_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    recipe = recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]})
    with pytest.raises(DiskFullError, match="no space left") as info:
        mmer.run_merge(recipe, tmp_path / "out")
    assert "nothing partial was kept" in info.value.hint
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    mmer.run_merge(recipe, tmp_path / "out")  # a rerun after the failure works
    assert (tmp_path / "out" / "mmer_manifest.json").is_file()


def test_outputs_are_bit_identical_across_processes_and_thread_counts(tiny_models, tmp_path):
    script = """
        import sys, torch, mmer
        from test_pipeline import recipe_for
        from pathlib import Path
        torch.set_num_threads(int(sys.argv[1]))
        models = {"vision": Path(sys.argv[3]), "audio": Path(sys.argv[4])}
        mmer.run_merge(recipe_for(Path(sys.argv[2]), models, shard_size=int(sys.argv[6])), Path(sys.argv[5]))
    """
    files = {}
    for threads, shard in (("1", "1000000000"), ("2", "1000000000"), ("2", "8192")):
        out = tmp_path / f"out-{threads}-{shard}"
        args = (str(tiny_models["base_dir"]), str(tiny_models["vision_dir"]), str(tiny_models["audio_dir"]))
        result = _run(script, threads, *args, str(out), shard)
        assert result.returncode == 0, result.stderr
        files[(threads, shard)] = json.loads((out / "mmer_manifest.json").read_text())["files"]
    assert files[("1", "1000000000")] == files[("2", "1000000000")]
    sharded = files[("2", "8192")]
    for name in ("masks/vision.safetensors", "masks/audio.safetensors", "components/vision/llm_private.safetensors"):
        assert sharded[name] == files[("1", "1000000000")][name]


def test_eight_modalities_merge_at_once(tmp_path):
    base = base_state(seed=3)
    write_model(tmp_path / "base", base)
    models = {}
    for i in range(8):
        models[f"m{i}"] = write_model(tmp_path / f"m{i}", finetune_state(base, seed=100 + i, density=0.1 + 0.1 * i))
    report = mmer.run_merge(recipe_for(tmp_path / "base", models), tmp_path / "out")
    densities = [m.density for m in report.modalities]
    assert len(densities) == 8 and all(0 < d < 1 for d in densities)
    assert densities[-1] > densities[0]  # the model that changed most keeps most of τ*
    assert verify(tmp_path / "out").ok


def test_a_256k_row_vocabulary_merges_within_the_streaming_memory_bound(tmp_path):
    """Peak RSS above the interpreter's own stays under the plan's estimate (one slot across models)."""
    vocab = 256_000
    config = {**TINY_LLAMA, "vocab_size": vocab}
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, 16),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.norm.weight": (16,),
        "lm_head.weight": (vocab, 16),
    }
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    write_model(tmp_path / "base", base, config=config)
    for i in range(2):
        write_model(tmp_path / f"m{i}", finetune_state(base, seed=i, density=0.3), config=config)
    script = """
        import resource, sys, json, torch, mmer
        from pathlib import Path
        from test_pipeline import recipe_for
        root = Path(sys.argv[1])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report = mmer.run_merge(recipe_for(root / "base", {"a": root / "m0", "b": root / "m1"}), root / "out")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"grew": after - before, "estimate": report.plan["estimate"]["peak_bytes"]}))
    """
    result = _run(script, str(tmp_path))
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    whole_models = 3 * 2 * vocab * 16 * 4  # what holding base + 2 models' embeddings and heads would take
    assert measured["grew"] < measured["estimate"] * 1.5, measured
    assert measured["estimate"] < 10 * whole_models
