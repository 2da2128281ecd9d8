"""One training loop for all three stages: accelerate for device and mixed precision, resumable, seeded.

Only the parameters handed in are given to the optimiser (everything else has ``requires_grad`` off), so the
frozen model cannot move. The order of micro-batches is a pure function of (seed, step), the learning rate of
the step number (linear warm-up, then cosine to 0, the paper's schedule), and a checkpoint holds the trained
tensors, AdamW's moments, torch's RNG state and the loss history. A run resumed from step s is therefore bit
for bit the run that was never interrupted. Checkpoints are plain safetensors + JSON (no pickle) written
atomically; loading one refuses a checkpoint made with other options or other trainable tensors.
"""

from __future__ import annotations

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
from mmer.extend.data import ExtendData
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
BOOKKEEPING_OPTIONS = ("log_every", "save_every", "keep_checkpoints")


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"final_loss": self.losses[-1] if self.losses else None}


def learning_rate_at(step: int, total: int, options: TrainOptions) -> float:
    """Linear warm-up over ⌈warmup_ratio·total⌉ steps, then cosine decay to 0 (HF Trainer's rule)."""
    warmup = math.ceil(total * options.warmup_ratio)
    if step < warmup:
        return options.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return options.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(options: TrainOptions, data: ExtendData) -> int:
    if options.steps is not None:
        return options.steps
    micro = math.ceil(options.epochs * data.batches_per_epoch(options.batch_size))
    return max(1, math.ceil(micro / options.grad_accum))


def make_accelerator(options: TrainOptions) -> Any:
    """An ``accelerate.Accelerator`` for these options (re-initialising accelerate's process-wide state when an
    earlier stage asked for another precision)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = options.device == "cpu" or (options.device == "auto" and not torch.cuda.is_available())
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' asked for, but no CUDA GPU is available", key="device", hint="use cpu")
    precision = options.mixed_precision
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=precision)
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=cpu, mixed_precision=precision)
    if accelerator.num_processes > 1:
        raise ConfigError(
            f"{accelerator.num_processes} processes: MoExtend training runs in one process",
            hint="launch it without torchrun/accelerate launch (one GPU)",
        )
    return accelerator


def train(
    model: MoExtendModel,
    trainable: Mapping[str, nn.Parameter],
    data: ExtendData,
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
    model.to(accelerator.device)
    optimizer = torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=options.weight_decay)
    optimizer = accelerator.prepare(optimizer)
    total = total_steps(options, data)
    report = TrainReport(
        stage, total, sum(p.numel() for p in params), 0.0, str(accelerator.device), accelerator.mixed_precision
    )
    start = 0
    torch.manual_seed(options.seed)
    if checkpoint_dir is not None and resume:
        found = latest_checkpoint(checkpoint_dir)
        if found is not None:
            start = load_checkpoint(found, stage, options, trainable, optimizer, report, accelerator)
            report.resumed_from = start
    top_k = layer_top_k(model.lm)
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
                    batch = data.micro_batch(
                        step * options.grad_accum + micro, options.batch_size, options.seed, accelerator.device
                    )
                    tap.clear()
                    with accelerator.autocast():
                        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("features")).logits
                        loss_lm = lm_loss(logits, batch["labels"])
                        loss = loss_lm
                        if options.aux_loss_coef > 0:
                            aux = load_balancing_loss(tap.logits, top_k, batch["attention_mask"], aux_scale)
                            loss = loss + options.aux_loss_coef * aux
                            aux_sum += float(aux.detach())
                    accelerator.backward(loss / options.grad_accum)
                    lm_sum += float(loss_lm.detach())
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
                    save_checkpoint(checkpoint_dir, done, stage, options, trainable, optimizer, report, accelerator)
    finally:
        progress.end(stage)
        model.eval()
    report.seconds = time.perf_counter() - started
    return report


@torch.no_grad()
def evaluate(model: MoExtendModel, data: ExtendData, batch_size: int = 8) -> dict[str, float]:
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
