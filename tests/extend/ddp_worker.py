"""Run MoExtend's three stages on the tiny fixtures, in however many processes this was launched with.

``tests/extend/test_distributed.py`` launches it on 2 CPU processes (``accelerate launch --cpu``) and compares
the pack with a one-process run of :func:`run` on the same global batch. Arguments: OUTPUT WORKDIR, or
``align-mixed OUTPUT``: the alignment stage alone on data with text-only samples (:func:`align_mixed`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_moe import build_lm, make_data, make_mixed_data, quick  # noqa: E402

from mmer.extend import ExtendOptions, MoExtendRecipe, ProbeOptions, align, run_moextend  # noqa: E402
from mmer.extend.distributed import is_main_process  # noqa: E402

SAMPLES = 25  # the last micro-batch of an epoch is 1 sample for align (batch 8) and finetune (batch 6)


def recipe() -> MoExtendRecipe:
    return MoExtendRecipe(
        align=quick(steps=4, batch_size=8),
        probe=quick(steps=3, batch_size=8, save_every=1, learning_rate=0.2),
        finetune=quick(steps=3, batch_size=6, grad_accum=2, warmup_ratio=0.3, save_every=2),
        selection=ProbeOptions(fraction=0.5),
        # A copied router row ties with its source up to the router matmul's rounding, which depends on the
        # batch shape a process runs (docs/moextend.md §5); the mean row has no such tie.
        extend=ExtendOptions(router_init="mean"),
    )


def run(output: Path, workdir: Path | None = None):
    return run_moextend(build_lm(), make_data(SAMPLES), output, recipe(), workdir=workdir)


MIXED_SAMPLES, MIXED_BATCH = 16, 4  # every other sample text-only: some process shares hold text alone


def align_mixed(output: Path) -> dict[str, torch.Tensor]:
    """Stage a on a mix of feature and text-only samples; the projector's tensors (written by the main process)."""
    model, report = align(
        build_lm(), make_mixed_data(MIXED_SAMPLES, text_every=2)[0], options=quick(steps=4, batch_size=MIXED_BATCH)
    )
    tensors = {n: p.detach().contiguous() for n, p in model.projector.state_dict().items()}
    if is_main_process():
        save_file(tensors, str(output))
    return tensors


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "align-mixed":
        align_mixed(Path(sys.argv[2]))
        os.write(sys.stdout.fileno(), b"aligned\n")
        sys.exit(0)
    result = run(Path(sys.argv[1]), Path(sys.argv[2]))
    # One write(2) of a short line is atomic on a pipe: the two ranks' lines cannot interleave (print's pieces can).
    line = f"processes {result.reports['finetune'].processes} layers {result.plan.layers}\n"
    os.write(sys.stdout.fileno(), line.encode())
