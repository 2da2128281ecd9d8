"""mmer's subspace methods (TSV-M, Iso-C, Iso-CTS, WUDI) equal FusionBench's implementations of them, run on
the same task vectors: τ* of every tensor, through a whole ``mmer merge`` (the streaming engine, one slot at a
time) against FusionBench's state-dict functions.

The arithmetic is float32 SVDs, products and Adam steps, done in the same order on the same inputs, so the
results are compared bit for bit where both sides call the same torch routines in the same order, and to float32
rounding otherwise (named per test). Runs only where fusion-bench is installed; elsewhere every test skips.
"""

# ruff: noqa: F811  (dyadic_models is a fixture imported from the TIES parity tests)
from __future__ import annotations

import pytest
import torch
from test_fusion_bench_parity import _run_mmer, dyadic_models  # noqa: F401

import mmer


def _task_vectors(models) -> list[dict[str, torch.Tensor]]:
    base = models["base"]
    return [{n: ft[n] - base[n] for n in base} for ft in models["finetunes"]]


def _tau_star(out) -> dict[str, torch.Tensor]:
    with mmer.load_decoupled(out) as ckpt:
        return {s.name: ckpt.tau_star(s.name) for s in ckpt.merged_slots}


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], exact: bool) -> None:
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        want = theirs[name].to(tensor.dtype)
        if exact:
            assert torch.equal(tensor, want), name
        else:
            torch.testing.assert_close(tensor, want, rtol=1e-5, atol=1e-6, msg=name)
    assert any(t.abs().sum() > 0 for t in ours.values())


@pytest.mark.peer
def test_tsv_m_equals_fusion_bench_task_singular_vector_merging(dyadic_models, tmp_path):
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

    theirs = compute_and_sum_svd_mem_reduction(_task_vectors(dyadic_models), accelerator="cpu")
    out = _run_mmer(dyadic_models, tmp_path / "out", method="tsv_m", mask="mmer")
    _assert_same(_tau_star(out), theirs, exact=True)


@pytest.mark.peer
def test_iso_c_equals_fusion_bench_iso_c(dyadic_models, tmp_path):
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c

    theirs = iso_c(_task_vectors(dyadic_models), accelerator="cpu")
    out = _run_mmer(dyadic_models, tmp_path / "out", method="iso_c", mask="mmer")
    _assert_same(_tau_star(out), theirs, exact=True)


@pytest.mark.peer
@pytest.mark.parametrize("common_space", [0.8, 0.5])
def test_iso_cts_equals_fusion_bench_iso_cts(dyadic_models, tmp_path, common_space):
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.isotropic_merging.iso_utils import iso_cts

    theirs = iso_cts(_task_vectors(dyadic_models), common_space_fraction=common_space, accelerator="cpu")
    out = _run_mmer(dyadic_models, tmp_path / "out", method="iso_cts", mask="mmer", common_space=common_space)
    _assert_same(_tau_star(out), theirs, exact=True)


@pytest.mark.peer
def test_wudi_equals_fusion_bench_wudi_merging(dyadic_models, tmp_path):
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.wudi.wudi import wudi_merging

    theirs = {
        n: t.detach() for n, t in wudi_merging(_task_vectors(dyadic_models), iter_num=20, accelerator="cpu").items()
    }
    out = _run_mmer(dyadic_models, tmp_path / "out", method="wudi", mask="mmer", iterations=20)
    ours = _tau_star(out)
    # Bit for bit where mmer computes the objective as written (rows ≤ cols); a taller matrix goes through the
    # column Gram form (same objective, no rows × rows product), so its Adam steps agree to float32 rounding.
    wide = {n for n, t in ours.items() if t.dim() != 2 or t.shape[0] <= t.shape[1]}
    assert wide and wide != set(ours)
    _assert_same({n: ours[n] for n in wide}, {n: theirs[n] for n in wide}, exact=True)
    tall = set(ours) - wide
    _assert_same({n: ours[n] for n in tall}, {n: theirs[n] for n in tall}, exact=False)
