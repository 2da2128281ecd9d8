"""DARE (Drop And REscale): drop each entry of a task vector with probability p, scale the rest by 1/(1−p).

Applied to each τᵢ before the merge method (and before its trim), as MergeLM and the MMER paper's "w/ DARE"
baselines do; with K = 1 on TIES this is mergekit's ``dare_ties``. The random mask of a tensor depends only on
(seed, model position, tensor name), drawn on the CPU, so it is identical across runs, devices, thread counts,
shard sizes and the order tensors are visited in.
"""

from __future__ import annotations

import hashlib

import torch


def dare_seed(seed: int, model_index: int, name: str) -> int:
    """A 63-bit seed for one tensor of one model, stable across processes and platforms."""
    digest = hashlib.sha256(f"mmer-dare:{seed}:{model_index}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare(tau: torch.Tensor, p: float, seed: int, model_index: int, name: str) -> torch.Tensor:
    """τ ⊙ Bernoulli(1 − p) / (1 − p); ``p = 0`` returns ``tau`` unchanged."""
    if p <= 0.0:
        return tau
    if p >= 1.0:
        raise ValueError(f"DARE drop rate must be < 1, got {p}")
    generator = torch.Generator(device="cpu").manual_seed(dare_seed(seed, model_index, name))
    keep = torch.rand(tau.shape, generator=generator) >= p
    return torch.where(keep.to(tau.device), tau / (1.0 - p), torch.zeros((), dtype=tau.dtype, device=tau.device))
