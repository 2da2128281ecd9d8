"""Every threshold search path streams: peak memory stays within the ``--dry-run`` estimate, never the inputs' size.

The windowed search, its two-pass fallback, DARE's histogram search and a per-tensor trim each read one slot at a
time and release it; a path that kept its inputs mapped would grow to the size of every input file. The models
here are tens of MB of bf16 with deltas shaped like a real fine-tune's (most entries unchanged, the rest
heavy-tailed and quantised), and the chunk size is lowered so that the estimate is well below the inputs' size:
mapping them all would break the bound.

Measured in one subprocess: the kernels and libraries are loaded by a merge of tiny models first, and one merge
of the real workload is run and thrown away (the first large merge in a process also pays one-time costs that are
not a merge's working set, the same whichever path comes first: the allocator's and the worker threads' first
buffers; the estimate bounds each merge, not the process's start-up), then for each
path the freed heap is returned to the OS, the peak (VmHWM) is reset through ``/proc/self/clear_refs``, and the
merge's growth above the resident memory it started from is compared with the plan's estimate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import write_model

from mmer.synthetic import llama_config, llama_shapes

ROOT = Path(__file__).resolve().parents[2]
CONFIG = llama_config(hidden=384, intermediate=768, layers=10, heads=6, kv_heads=2, vocab=768, max_positions=256)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK),
    reason="peak RSS is reset through /proc/self/clear_refs (Linux)",
)

PATHS = {
    "windowed": {"k": 0.2},
    "two-pass-fallback": {"k": 0.2, "_force_two_pass": True},
    "dare": {"k": 0.2, "dare": 0.3, "dare_seed": 1},
    "per-tensor": {"k": 0.2, "trim_scope": "per-tensor"},
    "guessed": {"k": 0.8},  # the sample pins every threshold to 0: the merge's own counts confirm it
}

CHILD = """
import ctypes, gc, importlib, json, sys
from pathlib import Path
import mmer, mmer.runtime
from mmer.progress import ProgressSink
from test_pipeline import recipe_for

mmer.runtime.CPU_CHUNK = 1 << 17  # small chunks: the estimate falls well below the inputs' size
trim = importlib.import_module("mmer.merge.trim")
libc = ctypes.CDLL("libc.so.6")
root, paths = Path(sys.argv[1]), json.loads(sys.argv[2])
models = {f"m{i}": root / f"ft{i}" for i in range(3)}
tiny = {f"m{i}": root / f"tiny{i}" for i in range(3)}

def status(key):
    return [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key)][0]

class Stages(ProgressSink):
    def __init__(self):
        self.seen = []
    def start(self, stage, total, unit="B"):
        self.seen.append(stage)

def missing_window(self):  # a window holding only denormal magnitudes: the two-pass search must run
    self._samples.clear()
    self._lo, self._hi = 1, 3

original = trim.WindowedThreshold.open_window
for options in paths.values():
    options = {k: v for k, v in options.items() if not k.startswith("_")}
    mmer.run_merge(recipe_for(root / "tinybase", tiny, **options), root / "warm", overwrite=True)
mmer.run_merge(recipe_for(root / "base", models, k=0.2), root / "warm", overwrite=True)
out = {}
for name, options in paths.items():
    force = options.pop("_force_two_pass", False)
    trim.WindowedThreshold.open_window = missing_window if force else original
    recipe = recipe_for(root / "base", models, **options)
    estimate = mmer.run_merge(recipe, None, dry_run=True).plan["estimate"]
    gc.collect()
    libc.malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")
    start = status("VmRSS:")
    stages = Stages()
    mmer.run_merge(recipe, root / "out", overwrite=True, progress=stages)
    out[name] = {"grew": status("VmHWM:") - start, "estimate": estimate["peak_bytes"], "stages": stages.seen}
print(json.dumps(out))
"""


def _write_workload(root: Path) -> int:
    """Base and three bf16 fine-tunes: unchanged entries where the update is under half a bf16 step, Laplace
    tails, whole embedding rows untouched; plus a tiny copy to warm up on. Returns the inputs' size in bytes."""
    shapes = llama_shapes(CONFIG)
    g = torch.Generator().manual_seed(0)
    base = {
        n: (1.0 + 0.05 * torch.randn(s, generator=g)) if len(s) == 1 else 0.02 * torch.randn(s, generator=g)
        for n, s in shapes.items()
    }
    stored = {n: t.to(torch.bfloat16) for n, t in base.items()}
    write_model(root / "base", stored, config=CONFIG)
    write_model(root / "tinybase", {n: t[:8].clone() for n, t in stored.items()}, config=CONFIG)
    for i, scale in enumerate((2e-5, 5e-5, 1.2e-4)):
        state = {}
        for n, t in base.items():
            u = torch.rand(t.shape, generator=g).clamp_min_(1e-12)
            delta = u.log_().neg_() * torch.sign(torch.rand(t.shape, generator=g) - 0.5) * scale
            if n.endswith("embed_tokens.weight"):
                delta[torch.rand(t.shape[0], generator=g) < 0.6] = 0.0
            state[n] = (stored[n].float() + delta).to(torch.bfloat16)
        write_model(root / f"ft{i}", state, config=CONFIG)
        write_model(root / f"tiny{i}", {n: t[:8].clone() for n, t in state.items()}, config=CONFIG)
    return 4 * sum(t.numel() * 2 for t in stored.values())


@pytest.mark.slow  # four merges of ~100 MB each, plus warm-ups: about a minute on two cores
def test_every_search_path_stays_within_the_dry_run_estimate_far_below_the_inputs_size(tmp_path):
    input_bytes = _write_workload(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(tmp_path), json.dumps(PATHS)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(m["grew"] <= m["estimate"] < input_bytes for m in measured.values()), (input_bytes, measured)
    # each path ran the search it is named for
    assert measured["guessed"]["stages"] == ["merge"]
    assert measured["windowed"]["stages"] == ["threshold", "merge"]
    assert "threshold pass 1/2" in measured["two-pass-fallback"]["stages"]
    assert "threshold pass 1/2" in measured["dare"]["stages"]
    assert measured["per-tensor"]["stages"] == ["merge"]
