"""One training loop for all three stages: accelerate for devices, processes and mixed precision; resumable.

Only the parameters handed in are given to the optimiser (everything else has ``requires_grad`` off), so the
frozen model cannot move. The order of micro-batches is a pure function of (seed, step), the learning rate of
the step number (linear warm-up, then cosine to 0, the paper's schedule), and a checkpoint holds the trained
tensors, AdamW's moments, torch's RNG state and the loss history. A run resumed from step s is therefore bit
for bit the run that was never interrupted. Checkpoints are plain safetensors + JSON (no pickle) written
atomically; loading one refuses a checkpoint made with other options or other trainable tensors.

Launched on several processes (``accelerate launch``, ``torchrun``), the same loop is data-parallel through
accelerate's DDP: ``batch_size`` stays the *global* micro-batch, each process runs its fixed share
(:class:`mmer.extend.data.BatchPlan`, read through a ``DataLoader``), the losses are the global batch's
(:mod:`mmer.extend.distributed`), and only the main process writes checkpoints. The result is the
one-process run's up to float rounding, and a run may resume on another number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmer.errors import CheckpointFormatError, ConfigError
from mmer.extend.data import BatchPlan, ExtendDataset, MicroBatchSampler
from mmer.extend.distributed import global_balancing_loss, global_lm_loss
from mmer.extend.losses import IGNORE_INDEX, lm_loss, load_balancing_loss
from mmer.extend.modality import MoExtendModel
from mmer.extend.options import TrainOptions
from mmer.extend.routing import RoutingTap, layer_top_k
from mmer.io.jsonfile import read_json_file
from mmer.io.outputs import is_mmer_output
from mmer.io.reader import read_safetensors_header
from mmer.io.writer import StagedOutput
from mmer.progress import NULL_PROGRESS, ProgressSink

STATE_FORMAT = "mmer-extend-train-state/1"
# Options that may differ between the interrupted run and its resumption without changing the result.
BOOKKEEPING_OPTIONS = ("log_every", "save_every", "keep_checkpoints", "gradient_checkpointing", "num_workers")


@dataclass
class TrainReport:
    """What a stage did: returned to Python callers, rendered by the CLI, recorded in the pack."""

    stage: str
    steps: int
    trainable_parameters: int
    seconds: float
    device: str
    mixed_precision: str
    losses: list[float] = field(default_factory=list)
    lm_losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"final_loss": self.losses[-1] if self.losses else None}


def learning_rate_at(step: int, total: int, options: TrainOptions) -> float:
    """Linear warm-up over ⌈warmup_ratio·total⌉ steps, then cosine decay to 0 (HF Trainer's rule)."""
    warmup = math.ceil(total * options.warmup_ratio)
    if step < warmup:
        return options.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return options.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(options: TrainOptions, data: ExtendDataset) -> int:
    if options.steps is not None:
        return options.steps
    micro = math.ceil(options.epochs * data.batches_per_epoch(options.batch_size))
    return max(1, math.ceil(micro / options.grad_accum))


def make_accelerator(options: TrainOptions) -> Any:
    """An ``accelerate.Accelerator`` for these options (re-initialising accelerate's process-wide state when an
    earlier stage asked for another precision; a launcher's process group is kept).

    Under a multi-process launch it is accelerate's DDP. DDP looks for unused parameters: a new expert that
    no token of a process's share chose gets no gradient there, and that must not stall the exchange.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    cpu = options.device == "cpu" or (options.device == "auto" and not torch.cuda.is_available())
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' asked for, but no CUDA GPU is available", key="device", hint="use cpu")
    precision = options.mixed_precision
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=precision, kwargs_handlers=handlers)
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
        accelerator = Accelerator(cpu=cpu, mixed_precision=precision, kwargs_handlers=handlers)
    if accelerator.distributed_type not in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
        DistributedType.MULTI_GPU,
    ):
        raise ConfigError(
            f"accelerate is configured for {accelerator.distributed_type.value}: MoExtend trains data-parallel "
            "(DDP) only",
            key="distributed_type",
            hint="launch with a multi-GPU (DDP) accelerate config; see docs/moextend.md §5 for models that do not "
            "fit one GPU",
        )
    return accelerator


def train(
    model: MoExtendModel,
    trainable: Mapping[str, nn.Parameter],
    data: ExtendDataset,
    options: TrainOptions,
    *,
    stage: str,
    aux_scale: str = "layer",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: ProgressSink | None = None,
) -> TrainReport:
    """Train ``trainable`` (and nothing else) on ``data``; LM loss + ``aux_loss_coef`` × load balancing."""
    progress = progress or NULL_PROGRESS
    started = time.perf_counter()
    if not trainable:
        raise ConfigError(f"stage {stage}: nothing to train", hint="check the stage and the model (a projector?)")
    names = list(trainable)
    params = [trainable[n] for n in names]
    accelerator = make_accelerator(options)
    rank, world = accelerator.process_index, accelerator.num_processes
    if not accelerator.is_main_process:
        progress = NULL_PROGRESS
    model.to(accelerator.device)
    optimizer = torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=options.weight_decay)
    if world > 1:
        runner, optimizer = accelerator.prepare(model, optimizer)
    else:
        runner, optimizer = model, accelerator.prepare(optimizer)
    total = total_steps(options, data)
    report = TrainReport(
        stage, total, sum(p.numel() for p in params), 0.0, str(accelerator.device), accelerator.mixed_precision
    )
    report.processes = world
    start = 0
    torch.manual_seed(options.seed)
    if checkpoint_dir is not None and resume:
        found = latest_checkpoint(checkpoint_dir)
        if found is not None:
            start = load_checkpoint(found, stage, options, trainable, optimizer, report, accelerator)
            report.resumed_from = start
    top_k = layer_top_k(model.lm)
    plan = BatchPlan(len(data), options.batch_size, options.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        data,
        batch_sampler=MicroBatchSampler(plan, start * options.grad_accum, total * options.grad_accum),
        collate_fn=_collated,
        num_workers=options.num_workers,
    )
    batches = iter(loader)
    if options.gradient_checkpointing:
        checkpointing(model.lm, True)
    model.train()
    progress.start(stage, total, unit="step")
    progress.advance(stage, start)
    try:
        with RoutingTap(model.lm) as tap:
            for step in range(start, total):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(step, total, options)
                lm_sum = aux_sum = 0.0
                for micro in range(options.grad_accum):
                    index = step * options.grad_accum + micro
                    batch = data.to_device(next(batches), accelerator.device)
                    last = micro == options.grad_accum - 1
                    with contextlib.nullcontext() if world == 1 or last else accelerator.no_sync(runner):
                        tap.clear()
                        with accelerator.autocast():
                            logits = runner(batch["input_ids"], batch["attention_mask"], batch.get("features")).logits
                            if world == 1:
                                loss_lm = lm_loss(logits, batch["labels"])
                                lm_value = float(loss_lm.detach())
                            else:
                                real = plan.share(index)[1]
                                labels = batch["labels"] if real else torch.full_like(batch["labels"], IGNORE_INDEX)
                                loss_lm, lm_value = global_lm_loss(logits, labels, world)
                            loss = loss_lm
                            if options.aux_loss_coef > 0:
                                mask = batch["attention_mask"]
                                if world == 1:
                                    aux = load_balancing_loss(tap.logits, top_k, mask, aux_scale)
                                    aux_value = float(aux.detach())
                                else:
                                    weight = mask if real else torch.zeros_like(mask)
                                    aux, aux_value = global_balancing_loss(tap.logits, top_k, weight, aux_scale, world)
                                loss = loss + options.aux_loss_coef * aux
                                aux_sum += aux_value
                        accelerator.backward(loss / options.grad_accum)
                    lm_sum += lm_value
                if options.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, options.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                report.lm_losses.append(lm_sum / options.grad_accum)
                report.aux_losses.append(aux_sum / options.grad_accum)
                report.losses.append(report.lm_losses[-1] + options.aux_loss_coef * report.aux_losses[-1])
                progress.advance(stage, 1)
                done = step + 1
                if options.log_every and (done % options.log_every == 0 or done == total):
                    progress.note(f"{stage} step {done}/{total}: loss {report.losses[-1]:.4f}")
                if checkpoint_dir is not None and (
                    (options.save_every and done % options.save_every == 0) or done == total
                ):
                    if accelerator.is_main_process:
                        save_checkpoint(
                            checkpoint_dir, done, stage, options, trainable, optimizer, report, accelerator
                        )
                    accelerator.wait_for_everyone()
    finally:
        progress.end(stage)
        if options.gradient_checkpointing:
            checkpointing(model.lm, False)
        if world > 1:
            accelerator.unwrap_model(runner, keep_fp32_wrapper=False)  # puts back the forward accelerate wrapped
            # Drop the DDP wrapper (and with it its gradient hooks): the next stage trains other tensors.
            accelerator.free_memory()
            del runner
        model.eval()
    report.seconds = time.perf_counter() - started
    return report


def checkpointing(lm: nn.Module, enable: bool) -> None:
    """Switch transformers' activation (gradient) checkpointing on or off, non-reentrant: frozen inputs that need
    no gradient still give the trainable tensors inside a layer theirs. (transformers 5 renamed the methods.)"""
    if enable and hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif enable:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(lm, "activation_checkpointing_disable", None) or lm.gradient_checkpointing_disable)()


def _collated(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DataLoader's collate_fn: the data set's ``__getitems__`` already returns a collated micro-batch."""
    return batch


@torch.no_grad()
def evaluate(model: MoExtendModel, data: ExtendDataset, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean next-token loss and accuracy over every labelled token of ``data`` (in file order)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for batch in data.in_order(batch_size, device):
            logits = model(batch["input_ids"], batch["attention_mask"], batch.get("features")).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            valid = labels != IGNORE_INDEX
            if not bool(valid.any()):
                continue
            loss_sum += float(torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum"))
            correct += int((logits[valid].argmax(-1) == labels[valid]).sum())
            count += int(valid.sum())
    finally:
        model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "tokens": count}


# --------------------------------------------------------------------------------------------------- checkpoints
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``directory`` (staging leftovers are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()
    ]
    return max(steps)[1] if steps else None


def _comparable(options: TrainOptions) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in BOOKKEEPING_OPTIONS}


def save_checkpoint(
    directory: str | Path,
    step: int,
    stage: str,
    options: TrainOptions,
    trainable: Mapping[str, nn.Parameter],
    optimizer: Any,
    report: TrainReport,
    accelerator: Any,
) -> Path:
    """Write ``step-XXXXXXXX/`` atomically, then drop checkpoints beyond ``keep_checkpoints``."""
    directory = Path(directory)
    target = directory / f"step-{step:08d}"
    names = list(trainable)
    optimizer_state = optimizer.state_dict()["state"]
    moments = {
        f"{names[i]}::{key}": value.detach().cpu().contiguous()
        for i, state in optimizer_state.items()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    state = {
        "format": STATE_FORMAT,
        "stage": stage,
        "step": step,
        "options": _comparable(options),
        "trainable": {n: list(p.shape) for n, p in trainable.items()},
        "losses": report.losses,
        "lm_losses": report.lm_losses,
        "aux_losses": report.aux_losses,
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
    }
    with StagedOutput(target, overwrite=True, kind="training-checkpoint") as staging:
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in trainable.items()}, str(staging / "trainable.safetensors")
        )
        save_file(moments, str(staging / "optimizer.safetensors"))
        save_file(rng, str(staging / "rng.safetensors"))
        (staging / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    # Only step directories mmer wrote go (its marker, or a pre-marker checkpoint's state.json): the directory is
    # the user's choice and may hold anything else.
    kept = sorted(
        (
            p
            for p in directory.iterdir()
            if _STEP_DIR.match(p.name) and (is_mmer_output(p) or (p / "state.json").is_file() and not p.is_symlink())
        ),
        key=lambda p: p.name,
    )
    for old in kept[: -options.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _read(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointFormatError(
            f"{file}: missing from the checkpoint", file=str(file), hint="resume from another step"
        )
    read_safetensors_header(file)
    return load_file(str(file))


def load_checkpoint(
    path: Path,
    stage: str,
    options: TrainOptions,
    trainable: Mapping[str, nn.Parameter],
    optimizer: Any,
    report: TrainReport,
    accelerator: Any,
) -> int:
    """Restore a checkpoint into the live parameters, optimiser and RNG; returns the step to continue from."""
    state_file = path / "state.json"
    state = read_json_file(
        state_file, what="training state", hint="the checkpoint is damaged; remove it to resume from an earlier one"
    )
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{state_file}: not a JSON object", file=str(state_file))
    if state.get("format") != STATE_FORMAT or state.get("stage") != stage:
        raise CheckpointFormatError(
            f"{path}: a checkpoint of stage {state.get('stage')!r} ({state.get('format')}), not of {stage!r}",
            file=str(path),
            hint="point --checkpoint-dir at this stage's own directory",
        )
    for key, kind in (("options", dict), ("trainable", dict), ("step", int)) + tuple(
        (name, list) for name in ("losses", "lm_losses", "aux_losses")
    ):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointFormatError(
                f"{state_file}: {key} is missing or not a JSON {'integer' if kind is int else kind.__name__}",
                file=str(state_file),
                key=key,
                hint="the checkpoint is damaged; remove it to resume from an earlier one",
            )
    saved, now = state["options"], _comparable(options)
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise ConfigError(
                f"{path}: the checkpoint was made with {key} = {saved.get(key)!r}, this run has {now.get(key)!r}",
                file=str(path),
                key=key,
                hint="resume with the same options, or start afresh in another checkpoint directory",
            )
    shapes = {n: list(p.shape) for n, p in trainable.items()}
    if state["trainable"] != shapes:
        missing = sorted(set(state["trainable"]) ^ set(shapes)) or sorted(
            n for n in shapes if shapes[n] != state["trainable"].get(n)
        )
        raise ConfigError(
            f"{path}: the checkpoint's trainable tensors differ from this model's (first: {missing[0]!r})",
            file=str(path),
            tensor=missing[0],
            hint="resume with the same base model, layers and extension options",
        )
    tensors = _read(path / "trainable.safetensors")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(tensors[name].to(param.device))
    moments = _read(path / "optimizer.safetensors")
    names = list(trainable)
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        name, _, slot = key.rpartition("::")
        optimizer_state.setdefault(names.index(name), {})[slot] = value
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": optimizer.state_dict()["param_groups"]})
    rng = _read(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    report.losses = list(state["losses"])
    report.lm_losses = list(state["lm_losses"])
    report.aux_losses = list(state["aux_losses"])
    return int(state["step"])
