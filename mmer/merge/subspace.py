"""Merge methods that work on each weight matrix as a whole: its singular vectors, or an objective over it.

TIES and its kin decide entry by entry; the data-free methods that followed them treat a weight matrix as a
linear map and merge the task vectors' subspaces:

- **TSV-M** (Task Singular Vectors, arXiv 2412.00081 §4): keep each τᵢ's top 1/n singular triplets, place them
  side by side, and replace the stacked left and right singular vectors by their nearest orthonormal matrices
  (Procrustes, §4.2), so no two tasks' directions interfere.
- **Iso-C** (Isotropic merging, arXiv 2502.04959 §3.1): the sum Σᵢ τᵢ with every singular value set to their mean
  (a flat spectrum: no direction of one task drowns the others).
- **Iso-CTS** (§3.2): Iso-C on a common subspace (the top ``common_space`` fraction of the sum's directions) plus
  each task's own top directions outside it, orthonormalised as in TSV-M, with a flat spectrum.
- **CART** (Revisiting weight averaging, arXiv 2412.12153 §4): the average of the task vectors plus λ times the
  sum of each task's low-rank deviation from that average (its top ``rank_fraction`` of singular directions).
- **WUDI** (arXiv 2503.08099 §3): τ* minimises Σᵢ ‖(τ* − τᵢ) τᵢᵀ‖² / ‖τᵢ‖² by Adam from Σᵢ τᵢ, a data-free
  stand-in for each task's inputs (they lie near the span of its task vector's rows).

Each takes the float32 task vectors of one tensor slot and returns τ*, like every registered method. A tensor
that is not a matrix (norms, biases) is averaged, as the authors' code and FusionBench do. The arithmetic
follows FusionBench's implementations step for step (``tests/peers`` checks each against it), float32
throughout, on the task vectors' device. LAPACK's SVD (and BLAS's products) block their work by the thread count,
so these methods give the same bits on every run on one machine at one thread count, and within float32 rounding
of them at another thread count or BLAS build. CART has no implementation
in FusionBench; it is checked against the paper's formula on hand-computed cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmer.merge.methods import _weights, as_stack, register_method

# Defaults as the papers' released configurations (and FusionBench's) set them.
ISO_COMMON_SPACE = 0.8  # Iso-CTS: fraction of the directions given to the common subspace
WUDI_ITERATIONS = 400  # FusionBench's configuration (the paper's code: 300)
WUDI_LEARNING_RATE = 1e-5
CART_RANK_FRACTION = 0.1  # share of each matrix's rank kept per task's centred deviation (the paper sweeps it)


def _sum(stacked: torch.Tensor) -> torch.Tensor:
    """Σᵢ τᵢ added one model at a time, as the authors' ``sum(task_vectors)`` adds them."""
    total = stacked[0].clone()
    for i in range(1, stacked.shape[0]):
        total += stacked[i]
    return total


def _running_mean(stacked: torch.Tensor) -> torch.Tensor:
    """The mean of the task vectors in the authors' incremental form (so the bits match their code)."""
    mean = stacked[0].clone()
    for i in range(1, stacked.shape[0]):
        mean += (stacked[i] - mean) / (i + 1)
    return mean


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest ``matrix`` (U Vᵀ of its SVD): the Procrustes step of TSV-M and Iso-CTS."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def _scaled(merged: torch.Tensor, alpha: float) -> torch.Tensor:
    return merged * alpha if alpha != 1.0 else merged


@register_method(
    "tsv_m",
    accepts=("alpha", "weights"),
    elementwise=False,
    summary="TSV-M: each task's top 1/n singular vectors, orthonormalised together (per weight matrix)",
)
def tsv_m(
    taus: Sequence[torch.Tensor] | torch.Tensor, *, weights: Sequence[float] | None = None, alpha: float = 1.0
) -> torch.Tensor:
    """τ* = U⊥ Σ V⊥ᵀ from each τᵢ's top ⌊r/n⌋ singular triplets (r = min of the matrix's sides); per-model
    ``weights`` scale each τᵢ before its SVD (FusionBench's list-valued α), ``alpha`` scales τ*."""
    stacked = as_stack(taus)
    if weights is not None:  # FusionBench's list-valued α: each τᵢ scaled before its SVD
        stacked = stacked * _weights(list(stacked), weights)
    if stacked.dim() != 3:
        return _scaled(_running_mean(stacked), alpha)
    n, rows, cols = stacked.shape
    rank = min(rows, cols)
    keep = int(rank * (1 / n))
    sum_u = stacked.new_zeros(rows, rank)
    sum_s = stacked.new_zeros(rank)
    sum_vh = stacked.new_zeros(rank, cols)
    for i in range(n):
        u, s, vh = torch.linalg.svd(stacked[i], full_matrices=False)
        sum_u[:, i * keep : (i + 1) * keep] = u[:, :keep]
        sum_s[i * keep : (i + 1) * keep] = s[:keep]
        sum_vh[i * keep : (i + 1) * keep, :] = vh[:keep, :]
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_vh, _, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
    merged = torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))
    return _scaled(merged, alpha)


@register_method(
    "iso_c",
    accepts=("alpha",),
    elementwise=False,
    summary="Iso-C: Σᵢ τᵢ with a flat spectrum (every singular value set to their mean), per weight matrix",
)
def iso_c(taus: Sequence[torch.Tensor] | torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """τ* = α · U diag(mean σ) Vᵀ where U Σ Vᵀ = Σᵢ τᵢ; the mean of the τᵢ for a tensor that is not a matrix."""
    stacked = as_stack(taus)
    n = stacked.shape[0]
    merged = _sum(stacked) / n
    if stacked.dim() != 3:
        return _scaled(merged, alpha)
    merged *= n
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    flat = torch.ones_like(s) * s.mean()
    return _scaled(torch.linalg.multi_dot((u, torch.diag(flat), vh)), alpha)


@register_method(
    "iso_cts",
    accepts=("alpha", "common_space"),
    elementwise=False,
    summary="Iso-CTS: a common subspace of Σᵢ τᵢ plus each task's own directions, flat spectrum, per matrix",
)
def iso_cts(
    taus: Sequence[torch.Tensor] | torch.Tensor, *, alpha: float = 1.0, common_space: float = ISO_COMMON_SPACE
) -> torch.Tensor:
    """τ* = α · U⊥ diag(mean σ) V⊥ᵀ over the top ``common_space`` fraction of Σᵢ τᵢ's directions and, for each
    task, the top directions of τᵢ projected off that subspace (the rest of the rank, split evenly)."""
    stacked = as_stack(taus)
    if stacked.dim() != 3:
        return _scaled(_running_mean(stacked), alpha)
    n, rows, cols = stacked.shape
    rank = min(rows, cols)
    common = int(rank * common_space)
    common = rank - round((rank - common) / n) * n  # the task-specific part splits evenly over the n tasks
    per_task = int((rank - common) / n)
    u, s, vh = torch.linalg.svd(_sum(stacked), full_matrices=False)
    common_u, common_s, common_vh = u[:, :common], s[:common], vh[:common, :]
    space_u = space_s = space_vh = None
    for i in range(n):
        own = stacked[i] - common_u @ common_u.T @ stacked[i]
        u_i, s_i, vh_i = torch.linalg.svd(own, full_matrices=False)
        if space_u is None:
            space_u, space_s, space_vh = torch.zeros_like(u_i), torch.zeros_like(s_i), torch.zeros_like(vh_i)
        space_u[:, i * per_task : (i + 1) * per_task] = u_i[:, :per_task]
        space_s[i * per_task : (i + 1) * per_task] = s_i[:per_task]
        space_vh[i * per_task : (i + 1) * per_task, :] = vh_i[:per_task, :]
    assert space_u is not None and space_s is not None and space_vh is not None
    start = n * per_task
    space_u[:, start : start + common] = common_u
    space_s[start : start + common] = common_s
    space_vh[start : start + common, :] = common_vh
    flat = torch.ones_like(space_s) * space_s.mean()
    merged = torch.linalg.multi_dot((_orthonormal(space_u), torch.diag(flat), _orthonormal(space_vh)))
    return _scaled(merged, alpha)


@register_method(
    "cart",
    accepts=("alpha", "rank_fraction"),
    elementwise=False,
    summary="CART: the mean task vector plus α · each task's low-rank deviation from it, per weight matrix",
)
def cart(
    taus: Sequence[torch.Tensor] | torch.Tensor, *, alpha: float = 1.0, rank_fraction: float = CART_RANK_FRACTION
) -> torch.Tensor:
    """τ* = τ̄ + α · Σᵢ SVD_r(τᵢ − τ̄), τ̄ the mean task vector and SVD_r the best rank-r approximation with
    r = max(1, round(rank_fraction · min(rows, cols))). In weights: θ* = θ_avg + α Σᵢ SVD_r(θᵢ − θ_avg), the
    paper's Eq. 5, with α its λ (α → 0 is plain weight averaging). The mean for a tensor that is not a matrix."""
    stacked = as_stack(taus)
    n = stacked.shape[0]
    mean = _sum(stacked) / n
    if stacked.dim() != 3:
        return mean
    rank = max(1, round(rank_fraction * min(stacked.shape[1:])))
    deviations = stacked.new_zeros(stacked.shape[1:])
    for i in range(n):
        u, s, vh = torch.linalg.svd(stacked[i] - mean, full_matrices=False)
        deviations += (u[:, :rank] * s[:rank]) @ vh[:rank, :]
    return mean + alpha * deviations


@register_method(
    "wudi",
    accepts=("alpha", "iterations"),
    elementwise=False,
    summary="WUDI: τ* fitted by Adam so that (τ* − τᵢ)τᵢᵀ vanishes for every task, per weight matrix",
)
def wudi(
    taus: Sequence[torch.Tensor] | torch.Tensor, *, alpha: float = 1.0, iterations: int = WUDI_ITERATIONS
) -> torch.Tensor:
    """τ* = α · argmin Σᵢ ‖(τ* − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F from Σᵢ τᵢ, ``iterations`` Adam steps at lr 1e-5 (the
    authors' and FusionBench's optimiser); the mean of the τᵢ for a tensor that is not a matrix."""
    stacked = as_stack(taus)
    if stacked.dim() != 3:
        return _scaled(_sum(stacked) / stacked.shape[0], alpha)
    # The engine merges under inference mode; the fit needs autograd on tensors created outside it.
    with torch.inference_mode(False), torch.enable_grad():
        tvs = stacked.clone()
        merged = torch.nn.Parameter(torch.sum(tvs, dim=0))
        optimizer = torch.optim.Adam([merged], lr=WUDI_LEARNING_RATE, weight_decay=0)
        norms = torch.square(torch.norm(tvs.reshape(tvs.shape[0], -1), p=2, dim=-1))
        # A task that left this matrix untouched interferes with nothing: its term is 0, not the authors' 0/0.
        norms = torch.where(norms == 0, torch.ones_like(norms), norms)
        # ‖Dτᵢᵀ‖² (D = τ* − τᵢ) as the authors write it costs rows × rows per task: for a tall matrix (a
        # vocabulary's embeddings, 32k rows) that is gigabytes. ⟨DᵀD, τᵢᵀτᵢ⟩ is the same number from
        # cols × cols Gram matrices; the authors' form is kept where it is the smaller one.
        tall = tvs.shape[1] > tvs.shape[2]
        grams = torch.matmul(tvs.transpose(1, 2), tvs) if tall else None
        for _ in range(iterations):
            disturbing = merged.unsqueeze(0) - tvs
            if grams is None:
                product = torch.matmul(disturbing, tvs.transpose(1, 2))
                per_task = torch.square(product)
            else:
                per_task = torch.matmul(disturbing.transpose(1, 2), disturbing) * grams
            loss = torch.sum(per_task / norms.unsqueeze(-1).unsqueeze(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        result = merged.detach().clone()
    return _scaled(result, alpha)
