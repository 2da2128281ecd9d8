"""mmer.extend on several processes: 2 CPU processes (gloo) train the pack one process trains, and the pieces.

The launch is torchrun's (``python -m torch.distributed.run``), which ``accelerate launch --multi_gpu`` also
uses on a GPU node; on a CPU, ``accelerate launch --cpu`` starts one process only. accelerate's Accelerator
inside the stages reads the launcher's environment and trains through DDP on gloo.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import run
from safetensors.torch import load_file
from tiny_moe import (
    build_lm,
    make_data,
    quick,
    single_thread,  # noqa: F401  (autouse: one thread per module)
)

from mmer.extend import lm_loss, load_balancing_loss
from mmer.extend.data import BatchPlan, MicroBatchSampler
from mmer.extend.distributed import global_balancing_loss, global_lm_loss
from mmer.extend.routing import RoutingTap, layer_top_k

WORKER = Path(__file__).with_name("ddp_worker.py")
# Float tolerance of the comparison. The processes sum the same terms in another order (per-process partial
# sums, then the all-reduce), so gradients agree to float32 rounding; AdamW then divides each gradient by its
# own running size, which amplifies the rounding of a near-zero component (up to ~1e-4 here, at lr 1e-2 on
# values up to 0.1). Every element agrees within ATOL + RTOL·|x|, and the mean difference stays at rounding.
ATOL, RTOL, MEAN_ATOL = 2e-4, 1e-4, 2e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(WORKER),
        *args,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_two_gloo_processes_write_the_pack_one_process_writes_for_the_same_global_batch(tmp_path):
    single = run(tmp_path / "single", tmp_path / "single-work")
    done = launch(2, str(tmp_path / "ddp"), str(tmp_path / "ddp-work"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("processes 2") == 2  # both ranks trained, each in a group of two

    one, two = (
        load_file(str(single.pack / "extension.safetensors")),
        load_file(str(tmp_path / "ddp" / "extension.safetensors")),
    )
    assert sorted(one) == sorted(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=ATOL, rtol=RTOL, msg=name)
        assert float((two[name] - one[name]).abs().mean()) < MEAN_ATOL, name
    manifest_one = json.loads((single.pack / "moextend_manifest.json").read_text())
    manifest_two = json.loads((tmp_path / "ddp" / "moextend_manifest.json").read_text())
    # Integer routing counts summed over the processes: the same statistics, scores, layers and sources exactly.
    for key in ("layers", "sources", "scores", "before", "after"):
        assert manifest_two["selection"][key] == manifest_one["selection"][key], key
    assert manifest_two["layers"] == manifest_one["layers"] and manifest_two["recipe"] == manifest_one["recipe"]
    for stage in ("align", "probe", "finetune"):
        report_one = (
            manifest_one["training"][stage] if stage != "probe" else manifest_one["selection"]["probe_training"]
        )
        report_two = (
            manifest_two["training"][stage] if stage != "probe" else manifest_two["selection"]["probe_training"]
        )
        assert (report_one["processes"], report_two["processes"]) == (1, 2)
        assert report_two["losses"] == pytest.approx(report_one["losses"], rel=1e-5), stage
    # Checkpoints were written once (by the main process), as the one-process run writes them.
    for stage in ("align", "probe", "finetune"):
        names = sorted(p.name for p in (tmp_path / "ddp-work" / stage).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "single-work" / stage).iterdir())


def test_the_processes_shares_cover_each_global_micro_batch_once_and_an_empty_share_carries_no_weight():
    world = 3
    plans = [BatchPlan(10, 4, seed=7, rank=r, world=world) for r in range(world)]
    one = BatchPlan(10, 4, seed=7)
    for micro in range(6):  # two epochs of 4 + 4 + 2 samples
        shares = [plan.share(micro) for plan in plans]
        real = [indices for indices, weighted in shares if weighted]
        assert torch.equal(torch.cat(real), one.global_indices(micro))
        if len(one.global_indices(micro)) < world:  # 2 samples over 3 processes: one runs a weightless sample
            assert [weighted for _, weighted in shares] == [True, True, False]
            assert len(shares[2][0]) == 1
    sampled = list(MicroBatchSampler(plans[1], 2, 5))
    assert sampled == [plans[1].share(m)[0].tolist() for m in range(2, 5)]


def test_on_one_process_the_global_losses_are_the_losses_of_the_batch():
    lm = build_lm()
    batch = make_data(6, features=False).batch(torch.arange(6))
    with torch.no_grad(), RoutingTap(lm) as tap:
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, value = global_lm_loss(logits, batch["labels"], world=1)
        assert float(loss) == pytest.approx(float(lm_loss(logits, batch["labels"])), rel=1e-6)
        assert value == pytest.approx(float(loss), rel=1e-6)
        top_k = layer_top_k(lm)
        for scale in ("layer", "max"):
            aux, aux_value = global_balancing_loss(tap.logits, top_k, batch["attention_mask"], scale, world=1)
            expected = load_balancing_loss(tap.logits, top_k, batch["attention_mask"], scale)
            assert float(aux) == pytest.approx(float(expected), rel=1e-6) and aux_value == pytest.approx(float(aux))


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_a_sharded_launch_is_refused_before_anything_trains_naming_the_engine(kind, monkeypatch):
    import accelerate
    from accelerate.utils import DistributedType

    from mmer.errors import ConfigError
    from mmer.extend.training import make_accelerator

    class Sharded:
        distributed_type = DistributedType[kind]

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "Accelerator", Sharded)
    with pytest.raises(ConfigError, match=DistributedType[kind].value) as info:
        make_accelerator(quick())
    assert "docs/moextend.md §5" in info.value.hint


def test_the_example_accelerate_config_is_a_multi_gpu_ddp_config_accelerate_reads():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    path = Path(__file__).parents[2] / "examples" / "moextend" / "accelerate_ddp.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == DistributedType.MULTI_GPU and config.mixed_precision == "bf16"
    assert "-m mmer_cli.main" in path.read_text()


def test_two_gloo_processes_align_on_text_only_samples_as_one_process_does(tmp_path):
    from ddp_worker import MIXED_BATCH, MIXED_SAMPLES, align_mixed
    from tiny_moe import make_mixed_data

    # The data makes some process's share of a micro-batch text alone: that process's projector gradient is
    # zero (the projector runs on no rows), so the exchange neither stalls nor changes the result.
    _, is_text = make_mixed_data(MIXED_SAMPLES, text_every=2)
    plan = BatchPlan(MIXED_SAMPLES, MIXED_BATCH, quick().seed, 0, 2)
    assert any(bool(is_text[plan.share(step)[0]].all()) for step in range(4))
    single = align_mixed(tmp_path / "single.safetensors")
    done = launch(2, "align-mixed", str(tmp_path / "ddp.safetensors"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("aligned") == 2
    two = load_file(str(tmp_path / "ddp.safetensors"))
    assert sorted(two) == sorted(single)
    for name in single:
        torch.testing.assert_close(two[name], single[name], atol=ATOL, rtol=RTOL, msg=name)
