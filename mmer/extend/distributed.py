"""Data parallelism for the three stages: which process this is, losses over the global batch, summed counts.

A data-parallel run (``accelerate launch``, ``torchrun``) must train exactly what one process trains on the
same global batch: each process runs its share of every micro-batch (:class:`mmer.extend.data.BatchPlan`),
and the losses here are those of the *whole* micro-batch. The next-token loss is a mean over the global
batch's labelled tokens and the load-balancing term (:mod:`mmer.extend.losses`) multiplies per-expert
selection shares f by mean router probabilities P over the global batch's tokens, so neither is the mean of
the processes' own losses when their token counts differ. Token counts and f (which carries no gradient) are
summed over the processes first; each process's loss is then its part of the global loss, scaled by the
number of processes because DDP averages gradients. The sum of the parts' gradients is the global loss's
gradient: the same update, up to the order of float additions.

Routing statistics (the Extender's κ and κ′ counts, docs/moextend.md §2) are integer counts summed over the
processes, so every process selects the same layers and source experts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.nn import functional as F

from mmer.extend.losses import IGNORE_INDEX


def launched_world() -> int:
    """Processes the launcher started (``WORLD_SIZE``), whether or not the process group exists yet."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def ensure_process_group(cpu: bool | None = None) -> None:
    """Join the launcher's process group (through accelerate, gloo on CPU) if launched on several processes."""
    if launched_world() > 1 and not dist.is_initialized():
        from accelerate.state import PartialState

        PartialState(cpu=not torch.cuda.is_available() if cpu is None else cpu)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def _collective_device(tensor: torch.device) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    backend = str(dist.get_backend())
    if "nccl" in backend and tensor.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if "nccl" not in backend and tensor.type != "cpu":
        return torch.device("cpu")
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over every process (a new tensor; ``tensor`` itself without a process group)."""
    if rank_and_world()[1] == 1:
        return tensor
    device = _collective_device(tensor.device)
    out = tensor.detach().to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def global_lm_loss(logits: torch.Tensor, labels: torch.Tensor, world: int) -> tuple[torch.Tensor, float]:
    """(this process's part of the global next-token loss, × ``world``; the global loss's value).

    The global loss is Σ cross-entropy / N over the labelled tokens of every process's share (what
    :func:`mmer.extend.losses.lm_loss` computes on the whole micro-batch).
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    counted = all_reduce_sum((shift_labels != IGNORE_INDEX).sum().to(torch.float64))
    ce_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if float(counted) == 0:
        return shift_logits.sum() * 0.0, 0.0
    value = float(all_reduce_sum(ce_sum.detach().to(torch.float64))) / float(counted)
    return ce_sum * (world / float(counted)), value


def global_balancing_loss(
    router_logits: Mapping[int, torch.Tensor],
    top_k: Mapping[int, int],
    weight: torch.Tensor,
    scale: str,
    world: int,
) -> tuple[torch.Tensor, float]:
    """(this process's part of the global load-balancing loss, × ``world``; the global loss's value).

    ``weight`` is 1 for each counted token of this process's share, 0 for padding (and for a share that only
    keeps a process in step, see :class:`~mmer.extend.data.BatchPlan`). f, the token count and P's value are
    summed over the processes in one exchange each; P's gradient flows only through this process's tokens.
    """
    layers = sorted(router_logits)
    widest = max(router_logits[layer].shape[-1] for layer in layers)
    device = router_logits[layers[0]].device
    weight = weight.reshape(-1).to(device=device, dtype=torch.float32)
    probs, chosen = {}, []
    for layer in layers:
        k = top_k[layer]
        p = torch.softmax(router_logits[layer].float(), dim=-1)
        selected = torch.topk(p, k, dim=-1).indices
        counts = torch.zeros(p.shape[-1], dtype=torch.float32, device=device)
        chosen.append(counts.scatter_add(0, selected.reshape(-1), weight.repeat_interleave(k)))
        probs[layer] = (p * weight.unsqueeze(-1)).sum(0)
    widths = [t.numel() for t in chosen]
    summed = all_reduce_sum(torch.cat([weight.sum().reshape(1), *chosen]))
    tokens = summed[0].clamp(min=1.0)
    f_all = (summed[1:] / tokens).split(widths)
    p_all = (all_reduce_sum(torch.cat([probs[layer].detach() for layer in layers])) / tokens).split(widths)
    terms, values = [], []
    for layer, f, p_global in zip(layers, f_all, p_all, strict=True):
        s = f.numel() if scale == "layer" else widest
        terms.append(s * (f * (probs[layer] / tokens)).sum())
        values.append(float(s * (f * p_global).sum()))
    return torch.stack(terms).mean() * world, sum(values) / len(values)
