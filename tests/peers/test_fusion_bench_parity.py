"""mmer's ``ties`` with the TIES paper's semantics, its ``tall`` masks and its ``emr`` merge equal FusionBench's
implementations (copies of the original TIES notebook, TALL-masks' and EMR-Merging's code), compared with
``torch.equal`` on flattened state dicts the way FusionBench flattens them (sorted keys, ``parameters_to_vector``).

Every weight is a small integer × 2⁻¹⁰ and each model's task vector is an odd integer × 2^(i−10) (model i), with
tensors of 2ᵏ entries: every sum, difference and mean either library takes is exact in float32, so the order in
which they add things up cannot matter, and a sum of task-vector entries is exactly 0 only where all of them are
0 (the lowest set bit of the model with the smallest exponent cannot cancel).

Runs only where fusion-bench is installed (``pip install fusion-bench``); elsewhere every test skips. Importing
fusion_bench takes ~25 s (it pulls in lightning and the model pools).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import canonical_shapes, write_model

import mmer
from mmer.config import MergeOptions, ModelSpec, Recipe
from mmer.synthetic import TINY_LLAMA

VOCAB = 32  # with hidden 16 and intermediate 32, every tensor then has 2ᵏ entries
N_MODELS = 3
MODALITIES = tuple(f"m{i}" for i in range(N_MODELS))


@pytest.fixture(scope="module")
def dyadic_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    pytest.importorskip("fusion_bench")  # skip before building anything
    root = tmp_path_factory.mktemp("fusion-bench-models")
    shapes = canonical_shapes(vocab=VOCAB)
    assert all(n & (n - 1) == 0 for n in (torch.Size(s).numel() for s in shapes.values()))
    g = torch.Generator().manual_seed(30)
    base = {n: torch.randint(-512, 513, s, generator=g).float() * 2.0**-10 for n, s in shapes.items()}
    finetunes = []
    for i in range(N_MODELS):
        ft = {}
        for n, s in shapes.items():
            odd = torch.randint(0, 16, s, generator=g) * 2 + 1
            sign = torch.randint(0, 2, s, generator=g) * 2 - 1
            keep = torch.rand(s, generator=g) >= 0.25  # a quarter of the entries untouched
            tau = (odd * sign * keep).float() * 2.0 ** (i - 10)
            ft[n] = base[n] + tau
            assert torch.equal(ft[n] - base[n], tau)  # exact
        finetunes.append(ft)
    config = {**TINY_LLAMA, "vocab_size": VOCAB}
    base_dir = write_model(root / "base", base, config=config, extra_files=())
    dirs = [write_model(root / f"ft{i}", ft, config=config, extra_files=()) for i, ft in enumerate(finetunes)]
    return {"base": base, "finetunes": finetunes, "base_dir": base_dir, "dirs": dirs}


def _run_mmer(models, out: Path, **options) -> Path:
    recipe = Recipe(
        ModelSpec(str(models["base_dir"])),
        tuple(ModelSpec(str(p), modality=m) for m, p in zip(MODALITIES, models["dirs"], strict=True)),
        MergeOptions(hash_inputs=False, **options),
    )
    mmer.run_merge(recipe, out)
    return out


def _flat_inputs(models) -> dict[str, torch.Tensor]:
    """FusionBench's flattened inputs: θ₀, every θₜ, every τₜ = θₜ − θ₀ (sorted keys, one vector each)."""
    from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector

    base = models["base"]
    tvs = [{n: ft[n] - base[n] for n in base} for ft in models["finetunes"]]
    return {
        "ptm": state_dict_to_vector(base),
        "ft": torch.vstack([state_dict_to_vector(ft) for ft in models["finetunes"]]),
        "tv": torch.vstack([state_dict_to_vector(tv) for tv in tvs]),
        "tv_dicts": tvs,
    }


def _flat_tau_star(out: Path, names) -> torch.Tensor:
    with mmer.load_decoupled(out) as ckpt:
        return torch.cat([ckpt.tau_star(n).reshape(-1) for n in sorted(names)])


def _flat_masks(out: Path, names) -> torch.Tensor:
    with mmer.load_decoupled(out) as ckpt:
        return torch.vstack([torch.cat([ckpt.mask(m, n).reshape(-1) for n in sorted(names)]) for m in MODALITIES])


# ==================================================================================================== TIES


@pytest.mark.peer
@pytest.mark.parametrize("k", [0.8, 0.5, 0.2])
@pytest.mark.parametrize(("merge_func", "aggregate"), [("dis-mean", "mean"), ("dis-sum", "sum")])
def test_ties_with_the_papers_semantics_equals_fusion_bench_ties_merging(
    dyadic_models, tmp_path, k, merge_func, aggregate
):
    """Global trim (one top-K over the concatenation, keeping |τ| ≥ the (d − ⌊d·K⌋)-th smallest), γ = sgn(Σ τᵢ)
    on the raw trimmed τᵢ, disjoint mean (or sum): mmer's defaults, and FusionBench's ``ties_merging``.

    One difference on purpose: where Σ τᵢ is exactly 0, FusionBench's ``resolve_zero_signs`` sets γ to the
    majority sign of the whole model, while mmer's default ``zero_sign=zero`` keeps γ = 0 (TIES Algorithm 1) so τ*
    is 0 there. It cannot matter with continuous deltas, nor with these inputs: the sum is 0 only where every
    trimmed τᵢ is 0, and then no entry agrees with either sign and both give 0. ``zero_sign=majority`` follows
    FusionBench there too; the tied models below show it.
    """
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging

    flat = _flat_inputs(dyadic_models)
    theirs = ties_merging(flat["tv"].clone(), reset_thresh=k, merge_func=merge_func)
    out = _run_mmer(dyadic_models, tmp_path / "out", method="ties", mask="mmer", k=k, aggregate=aggregate)
    ours = _flat_tau_star(out, dyadic_models["base"])
    assert torch.equal(ours, theirs)
    assert int((ours != 0).sum()) > 0
    options = json.loads((out / "mmer_manifest.json").read_text())["options"]
    assert (options["trim_scope"], options["trim_count"], options["elect_on"], options["zero_sign"]) == (
        "global",
        "reference",
        "raw",
        "zero",
    )


# ==================================================================================================== TALL


@pytest.mark.peer
@pytest.mark.parametrize("lam", [0.2, 0.4, 0.6, 1.0])
def test_tall_masks_on_the_task_arithmetic_vector_equal_fusion_bench_generate_task_masks(dyadic_models, tmp_path, lam):
    """τ_MTL = Σ τₜ (task arithmetic, α = 1); mₜ = |θ₀ − θₜ| > λ·|θ_MTL − θₜ| in FusionBench, computed on the θ's.

    mmer computes the same rule from the task vectors directly, |τₜ| > λ·|τ* − τₜ|, without forming θ₀ + τ* and
    subtracting θₜ again: on general floats the two can differ in the last bit where that round trip rounds;
    with these dyadic inputs θ₀ + τ_MTL − θₜ = τ_MTL − τₜ exactly, so the masks must be identical.
    """
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.tall_mask.utils import generate_task_masks

    flat = _flat_inputs(dyadic_models)
    merged_tv = flat["tv"].sum(0)
    theirs = generate_task_masks(flat["tv"], flat["ft"], flat["ptm"], tv=merged_tv, tall_mask_lambda=lam)
    out = _run_mmer(dyadic_models, tmp_path / "out", method="task_arithmetic", alpha=1.0, mask="tall", lambda_=lam)
    assert torch.equal(_flat_tau_star(out, dyadic_models["base"]), merged_tv)
    ours = _flat_masks(out, dyadic_models["base"])
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


@pytest.mark.peer
@pytest.mark.parametrize("lam", [0.3, 0.5])
@pytest.mark.parametrize(("merge_func", "aggregate"), [("dis-sum", "sum"), ("dis-mean", "mean")])
def test_tall_masks_on_a_ties_vector_equal_fusion_bench(dyadic_models, tmp_path, lam, merge_func, aggregate):
    """TALL's TIES variant (global trim to 20 %, ``dis-sum`` in TALL's code): the masks compare the *untrimmed* τₜ
    with the TIES vector (mmer's ``tall`` rule always uses the raw τₜ, as TALL does).

    With ``dis-sum`` τ* stays dyadic and equality is guaranteed. With ``dis-mean`` τ* = sum/count is rounded, and
    FusionBench's θ₀ + τ* − θₜ round trip may round once more where mmer's τ* − τₜ does not, which could flip a
    mask bit lying within an ulp of λ·|τ* − τₜ|; on these inputs no bit lies that close, so the masks are equal
    too (a regression check, not a guarantee).
    """
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.tall_mask.utils import generate_task_masks
    from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging

    flat = _flat_inputs(dyadic_models)
    merged_tv = ties_merging(flat["tv"].clone(), reset_thresh=0.2, merge_func=merge_func)
    theirs = generate_task_masks(flat["tv"], flat["ft"], flat["ptm"], tv=merged_tv, tall_mask_lambda=lam)
    out = _run_mmer(
        dyadic_models, tmp_path / "out", method="ties", k=0.2, aggregate=aggregate, mask="tall", lambda_=lam
    )
    assert torch.equal(_flat_tau_star(out, dyadic_models["base"]), merged_tv)
    assert torch.equal(_flat_masks(out, dyadic_models["base"]), theirs)


# ===================================================================================================== EMR


@pytest.mark.peer
def test_emr_unified_vector_masks_and_rescalers_equal_fusion_bench_emr_merge(dyadic_models, tmp_path):
    """γ = +1 where Σ τₜ > 0 else −1; τ_uni = γ·max over agreeing |τₜ|; Mₜ = [τₜ·γ > 0];
    λₜ = Σₙ mean|τₜ,ₙ| / Σₙ mean|Mₜ,ₙ∘τ_uni,ₙ|; θ̂ₜ = θ₀ + λₜ·Mₜ∘τ_uni.

    FusionBench accumulates the rescaler in float32, mmer in float64 and stores it in the manifest as a float64;
    every mean and partial sum here is exact in both, and a float64 quotient of two float32 values rounds to the
    float32 quotient, so the rescaler cast to float32 must equal FusionBench's.
    """
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.emr_merging.utils import emr_merge

    flat = _flat_inputs(dyadic_models)
    unified, masks, rescalers = emr_merge(flat["tv_dicts"])
    out = _run_mmer(dyadic_models, tmp_path / "out", method="emr", mask="emr")
    manifest = json.loads((out / "mmer_manifest.json").read_text())
    ours = torch.tensor([manifest["modalities"][m]["scale"] for m in MODALITIES], dtype=torch.float32)
    assert torch.equal(ours, rescalers)
    assert not torch.equal(rescalers, torch.ones(N_MODELS))
    base = dyadic_models["base"]
    with mmer.load_decoupled(out) as ckpt:
        for name in base:
            assert torch.equal(ckpt.tau_star(name), unified[name]), name
            for i, modality in enumerate(MODALITIES):
                assert torch.equal(ckpt.mask(modality, name), masks[name][i]), (modality, name)
                # EMRTaskModulator.apply: θ += τ_uni ⊙ mask · rescaler
                expected = base[name] + unified[name] * masks[name][i] * rescalers[i]
                assert torch.equal(ckpt.llm_tensor(modality, name), expected), (modality, name)


# ================================================================================================ majority

TIED_SCALE = 2.0**-10


@pytest.fixture(scope="module")
def tied_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every task vector entry is −2, −1, 0, 1 or 2 (× 2⁻¹⁰), negative more often than positive: many entries
    whose sum over the three models is exactly 0 with non-zero terms (1 + 1 − 2, 2 − 2 + 0), and a model-wide
    majority of −1, which neither mmer's ``zero`` (γ = 0) nor mergekit's ``positive`` (γ = +1) gives."""
    pytest.importorskip("fusion_bench")
    root = tmp_path_factory.mktemp("fusion-bench-tied")
    shapes = canonical_shapes(vocab=VOCAB)
    g = torch.Generator().manual_seed(31)
    base = {n: torch.randint(-512, 513, s, generator=g).float() * TIED_SCALE for n, s in shapes.items()}
    values = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    weights = torch.tensor([0.25, 0.25, 0.2, 0.15, 0.15])
    finetunes = []
    for _ in range(N_MODELS):
        ft = {}
        for n, s in shapes.items():
            tau = values[torch.multinomial(weights, torch.Size(s).numel(), True, generator=g)].reshape(s) * TIED_SCALE
            ft[n] = base[n] + tau
            assert torch.equal(ft[n] - base[n], tau)  # exact
        finetunes.append(ft)
    config = {**TINY_LLAMA, "vocab_size": VOCAB}
    base_dir = write_model(root / "base", base, config=config, extra_files=())
    dirs = [write_model(root / f"ft{i}", ft, config=config, extra_files=()) for i, ft in enumerate(finetunes)]
    return {"base": base, "finetunes": finetunes, "base_dir": base_dir, "dirs": dirs}


@pytest.mark.peer
@pytest.mark.parametrize("k", [0.8, 0.5, 0.2])
@pytest.mark.parametrize(("merge_func", "aggregate"), [("dis-mean", "mean"), ("dis-sum", "sum")])
def test_ties_with_the_majority_zero_sign_equals_fusion_bench_ties_merging_where_sums_cancel(
    tied_models, tmp_path, k, merge_func, aggregate
):
    """FusionBench's ``resolve_sign``: γ = sgn(Σ trimmed τᵢ), then every γ = 0 becomes sgn(Σ γ) over the whole
    flattened model. mmer counts that census in a pass of its own, streaming one tensor at a time, and must give
    the same τ* bit for bit, and the same majority, recorded in the manifest."""
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging, topk_values_mask

    flat = _flat_inputs(tied_models)
    theirs = ties_merging(flat["tv"].clone(), reset_thresh=k, merge_func=merge_func)
    trimmed, *_ = topk_values_mask(flat["tv"].clone(), K=k)
    elected = torch.sign(trimmed.sum(0))
    assert int((elected == 0).sum()) > int((trimmed == 0).all(0).sum())  # sums that cancel non-zero terms
    majority = int(torch.sign(elected.sum()))
    assert majority == -1
    out = _run_mmer(tied_models, tmp_path / "out", method="ties", k=k, aggregate=aggregate, zero_sign="majority")
    ours = _flat_tau_star(out, tied_models["base"])
    assert torch.equal(ours, theirs)
    census = json.loads((out / "mmer_manifest.json").read_text())["options"]["sign_census"]
    assert census == {"positive": int((elected > 0).sum()), "negative": int((elected < 0).sum()), "majority_sign": -1}
    zero = _run_mmer(tied_models, tmp_path / "zero", method="ties", k=k, aggregate=aggregate)
    assert not torch.equal(_flat_tau_star(zero, tied_models["base"]), theirs)  # the rule decides real entries


@pytest.mark.peer
@pytest.mark.parametrize("merge_func", ["dis-mean", "dis-sum"])
def test_a_tied_census_gives_what_fusion_bench_s_disjoint_merge_gives(merge_func):
    """Equally many + and − elections leave FusionBench's γ at 0 where the sum cancels, and its disjoint merge
    keeps the negative τᵢ there (``where(γ > 0, τ > 0, τ < 0)``): mmer's majority is −1 then, the same bytes."""
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.ties_merging.ties_merging_utils import disjoint_merge, resolve_sign

    from mmer.merge.methods import SignCensus, ties, ties_signs

    tv = torch.tensor([[2.0, -1.0, 3.0, -1.0, 0.0], [-2.0, 1.0, 0.0, -2.0, 0.0], [0.0, 0.0, -1.0, 0.0, 0.0]])
    census = SignCensus.of(ties_signs(tv))
    assert (census.positive, census.negative) == (1, 1)
    theirs = disjoint_merge(tv, merge_func, resolve_sign(tv))
    ours = ties(tv, zero_sign="majority", majority=census.majority, aggregate=merge_func.split("-")[1])
    assert torch.equal(ours, theirs)
