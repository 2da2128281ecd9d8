"""`mmer tune`: every candidate is exactly the model a merge with its λ and K would rebuild, scored by a proxy
equal to `compare`'s or by the caller's function, in order or in parallel, with the best values written back."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_add import cli
from test_pipeline import recipe_for

import mmer
from mmer.compare import run_compare
from mmer.config import build_recipe, load_recipe
from mmer.errors import ConfigError
from mmer.tune import Candidate, TuneError, load_probes, run_tune, write_plot

RECORDED: dict[tuple[str, float, float], dict[str, torch.Tensor]] = {}
TARGETS = {"vision": 0.6, "audio": 1.2}


def record_state(candidate: Candidate) -> float:
    RECORDED[(candidate.modality, candidate.lambda_, candidate.k)] = candidate.state_dict()
    return 0.0


def synthetic(candidate: Candidate) -> dict[str, float]:
    """Peaks at λ = TARGETS[modality] and K = 0.5; a pure function of the candidate, so any backend agrees."""
    distance = (candidate.lambda_ - TARGETS[candidate.modality]) ** 2 + (candidate.k - 0.5) ** 2
    return {"score": -distance, "distance": distance}


def alpha_peak(candidate: Candidate) -> float:
    """Peaks at α = 0.7 and λ = TARGETS[modality]: what a validation score that prefers a damped τ* looks like."""
    return -((candidate.alpha - 0.7) ** 2) - (candidate.lambda_ - TARGETS[candidate.modality]) ** 2


def constant(candidate: Candidate) -> int:
    return 1


def not_a_number(candidate: Candidate) -> float:
    return math.nan


def broken(candidate: Candidate) -> float:
    raise RuntimeError("the evaluation harness crashed")


@pytest.fixture(scope="module")
def tune_setup(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("tune")
    models = {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    recipe = recipe_for(tiny_models["base_dir"], models, k=0.8, hash_inputs=True)
    merged = root / "merged"
    mmer.run_merge(recipe, merged)
    return SimpleNamespace(root=root, models=models, recipe=recipe, merged=merged, base_dir=tiny_models["base_dir"])


def with_values(recipe, lam: float, **options):
    return replace(
        recipe,
        models=tuple(replace(m, lambda_=lam) for m in recipe.models),
        options=replace(recipe.options, **options),
    )


# ------------------------------------------------------------------------------------------------- exactness
def test_the_reconstruction_proxy_scores_every_candidate_exactly_as_compare_measures_it(tune_setup):
    report = run_tune(tune_setup.recipe, score="recon", lambdas=(0.5, 1.0), ks=(0.2, 0.5))

    assert len(report.results) == 2 * 2 * 2
    for k in (0.2, 0.5):
        for lam in (0.5, 1.0):
            measured = run_compare(with_values(tune_setup.recipe, lam, k=k), ("ties/mmer",)).results[0]
            for modality in ("vision", "audio"):
                result = report.table(modality, k)[lam]
                assert result.score == pytest.approx(-measured.rel_l1[modality], rel=1e-9, abs=0)
                assert result.details["density"] == pytest.approx(measured.density[modality])


@pytest.mark.parametrize(
    "options",
    [
        {"k": 0.5},
        {"k": 0.5, "dare": 0.3, "trim_scope": "per-tensor"},
        {"k": 0.5, "mask_source": "raw"},
        {"method": "task_arithmetic", "mask": "tall"},
        {"k": 0.5, "zero_sign": "majority", "mask": "magnitude_only"},
    ],
    ids=["ties-global", "dare-per-tensor", "raw-mask-source", "tall", "majority-magnitude-only"],
)
def test_a_candidate_rebuilds_exactly_what_a_merge_with_its_lambda_and_k_writes(tune_setup, tmp_path, options):
    RECORDED.clear()
    recipe = with_values(tune_setup.recipe, None, **options)
    run_tune(recipe, score=record_state, lambdas=(0.5,))
    mmer.run_merge(with_values(recipe, 0.5), tmp_path / "merged")

    k = recipe.options.k
    with mmer.load_decoupled(tmp_path / "merged") as ckpt:
        for modality in ("vision", "audio"):
            rebuilt = RECORDED[(modality, 0.5, k)]
            assert list(rebuilt) == [s.name for s in ckpt.slots]
            for slot in ckpt.slots:
                assert torch.equal(rebuilt[slot.name], ckpt.llm_tensor(modality, slot.name)), (modality, slot.name)


def test_a_checkpoint_is_tuned_with_its_own_tau_star_for_its_own_k(tune_setup):
    from_checkpoint = run_tune(checkpoint=tune_setup.merged, score="recon", lambdas=(0.5, 1.0), ks=(0.5, 0.8))
    from_recipe = run_tune(tune_setup.recipe, score="recon", lambdas=(0.5, 1.0), ks=(0.5, 0.8))

    assert from_checkpoint.tau_star_reused == (0.8, 1.0) and from_recipe.tau_star_reused is None  # (K, α)
    assert [r.score for r in from_checkpoint.results] == [r.score for r in from_recipe.results]
    assert from_checkpoint.tuned_recipe().models[0].model == str(tune_setup.models["vision"].resolve())

    seen: dict[float, str] = {}

    def where(candidate: Candidate) -> float:
        seen[candidate.k] = candidate.inputs.tau_dir
        return 0.0

    run_tune(checkpoint=tune_setup.merged, score=where, lambdas=(0.9,), ks=(0.5, 0.8))
    assert seen[0.8] == str(tune_setup.merged / "tau_star")
    assert seen[0.5] != seen[0.8] and not Path(seen[0.5]).exists()  # a scratch τ*, removed afterwards


def test_a_checkpoint_without_its_originals_cannot_be_tuned_unless_told_where_they_are(tune_setup, tmp_path):
    copy = Path(shutil.copytree(tune_setup.models["audio"], tmp_path / "audio"))
    merged = tmp_path / "merged"
    mmer.run_merge(recipe_for(tune_setup.base_dir, {"vision": tune_setup.models["vision"], "audio": copy}), merged)
    shutil.rmtree(copy)

    with pytest.raises(ConfigError, match=r"not found: audio") as err:
        run_tune(checkpoint=merged, lambdas=(0.9,))
    assert err.value.key == "source" and "--source" in err.value.hint
    report = run_tune(checkpoint=merged, lambdas=(0.9,), sources={"audio": tune_setup.models["audio"]})
    assert report.tuned_recipe().models[1].model == str(tune_setup.models["audio"])


# ------------------------------------------------------------------------------------------------- choosing
def test_each_modality_gets_its_own_best_lambda_and_k_maximises_the_mean_of_their_bests(tune_setup):
    report = run_tune(tune_setup.recipe, score=synthetic, lambdas=(0.3, 0.6, 0.9, 1.2), ks=(0.5, 0.8))

    assert report.best_lambdas == {"vision": 0.6, "audio": 1.2}
    assert report.best_k == 0.5
    assert report.best_scores == {"vision": 0.0, "audio": 0.0}
    assert report.k_scores == {0.5: 0.0, 0.8: pytest.approx(-0.09)}
    assert report.table("audio", 0.8)[0.3].details == {"distance": pytest.approx(0.9**2 + 0.3**2)}
    assert len(report.results) == 2 * 2 * 4  # |modalities| · |K| · |λ|, never |λ|^n


def test_a_flat_score_leaves_the_recipe_as_it_was(tune_setup):
    recipe = replace(
        tune_setup.recipe, models=(replace(tune_setup.recipe.models[0], lambda_=1.2), tune_setup.recipe.models[1])
    )
    report = run_tune(recipe, score=constant, lambdas=(0.3, 0.6, 0.9, 1.2), ks=(0.5, 0.8, 1.0))
    assert report.best_k == 0.8
    assert report.best_lambdas == {"vision": 1.2, "audio": 0.9}


def test_candidates_scored_by_worker_processes_or_threads_equal_those_scored_in_order(tune_setup):
    grid = {"lambdas": (0.3, 0.9), "ks": (0.5, 0.8)}
    serial = run_tune(tune_setup.recipe, score=synthetic, **grid)
    threads = run_tune(tune_setup.recipe, score=synthetic, jobs=2, backend="thread", **grid)
    processes = run_tune(tune_setup.recipe, score="test_tune:synthetic", jobs=2, **grid)

    assert processes.backend == "process" and threads.backend == "thread" and serial.backend == "serial"
    expected = [(r.modality, r.k, r.lambda_, r.score, r.details) for r in serial.results]
    for report in (threads, processes):
        assert [(r.modality, r.k, r.lambda_, r.score, r.details) for r in report.results] == expected


@pytest.mark.peer
@pytest.mark.slow
def test_candidates_scored_as_ray_tasks_on_a_local_ray_equal_those_scored_in_order(tune_setup):
    pytest.importorskip("ray")
    grid = {"lambdas": (0.3, 0.9), "ks": (0.5,)}
    serial = run_tune(tune_setup.recipe, score=synthetic, **grid)
    remote = run_tune(tune_setup.recipe, score=synthetic, jobs=2, backend="ray", **grid)
    assert remote.backend == "ray"
    assert [(r.lambda_, r.score) for r in remote.results] == [(r.lambda_, r.score) for r in serial.results]


# ---------------------------------------------------------------------------------------------------- logits
def test_logit_agreement_is_perfect_when_the_mask_keeps_the_whole_task_vector_and_falls_without_it(
    tune_setup, tmp_path
):
    probes = tmp_path / "probes.jsonl"
    probes.write_text('[1, 2, 3, 4, 5]\n{"input_ids": [7, 8, 9, 41, 40, 6]}\n\n[0, 39]\n', encoding="utf-8")
    # One model, K = 1: τ* = τ, so at λ ≤ 2 the mask keeps every changed weight and θ̂ = θ (up to one rounding).
    recipe = replace(
        tune_setup.recipe, models=tune_setup.recipe.models[:1], options=replace(tune_setup.recipe.options, k=1.0)
    )
    report = run_tune(recipe, score="logits", probes=probes, lambdas=(1.0, 3.0))

    kept, dropped = report.table("vision", 1.0)[1.0], report.table("vision", 1.0)[3.0]
    assert kept.details["top1"] == 1.0 and 0.0 <= kept.details["kl"] < 1e-6
    assert dropped.details["kl"] > 1e-4 and dropped.details["tokens"] == kept.details["tokens"] == 13
    assert report.best_lambdas == {"vision": 1.0}


@pytest.mark.parametrize(
    "text,message",
    [("[1, 2, -3]\n", "token ids"), ("not json\n", "not valid JSON"), ("\n", "holds no probe"), ("[]\n", "token ids")],
)
def test_a_malformed_probe_file_is_refused_naming_its_line(tmp_path, text, message):
    probes = tmp_path / "probes.jsonl"
    probes.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as err:
        load_probes(probes)
    assert err.value.file == str(probes) and err.value.key == "probes"


def test_text_probes_need_the_models_tokenizer(tune_setup, tmp_path):
    probes = tmp_path / "probes.txt"
    probes.write_text("a photo of a cat\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer") as err:
        load_probes(probes, tune_setup.models["vision"])
    assert "token ids" in err.value.hint


# ---------------------------------------------------------------------------------------------------- outputs
def test_the_chosen_values_are_written_as_json_a_plot_and_a_recipe_mmer_merge_accepts(tune_setup, tmp_path):
    report = run_tune(tune_setup.recipe, score=synthetic, lambdas=(0.6, 1.2), ks=(0.5, 0.8))

    data = json.loads(report.write_json(tmp_path / "tune.json").read_text())
    assert data["best"] == {
        "k": 0.5,
        "alpha": 1.0,
        "lambda": {"vision": 0.6, "audio": 1.2},
        "score": {"vision": 0.0, "audio": 0.0},
        "k_scores": {"0.5": 0.0, "0.8": pytest.approx(-0.09)},
        "alpha_scores": {"1": 0.0},
    }
    assert len(data["results"]) == 8 and data["higher_is_better"] is True
    assert write_plot(report, tmp_path / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    recipe_file = report.write_recipe(tmp_path / "tuned.yaml")
    _, models, options = load_recipe(recipe_file)
    assert options.k == 0.5 and [(m.modality, m.lambda_) for m in models] == [("vision", 0.6), ("audio", 1.2)]
    merged = mmer.run_merge(build_recipe([], recipe_file), tmp_path / "merged")
    assert [(m.name, m.lambda_) for m in merged.modalities] == [("vision", 0.6), ("audio", 1.2)]


def test_only_the_named_modalities_are_tuned(tune_setup):
    report = run_tune(tune_setup.recipe, score=synthetic, lambdas=(0.6, 1.2), modalities=["audio"])
    assert report.modalities == ["audio"] and {r.modality for r in report.results} == {"audio"}
    assert [(m.modality, m.lambda_) for m in report.tuned_recipe().models] == [("vision", None), ("audio", 1.2)]


# --------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "kwargs,error,key,match",
    [
        ({"score": "no_such_module:score"}, ConfigError, "score", "not found"),
        ({"score": "test_tune:no_such_function"}, ConfigError, "score", "has no"),
        ({"score": "recall"}, ConfigError, "score", "neither a built-in"),
        ({"score": not_a_number}, TuneError, "score", "not a finite number"),
        ({"score": broken}, TuneError, "score", "harness crashed"),
        ({"score": "logits"}, ConfigError, "probes", "probe"),
        ({"lambdas": ()}, ConfigError, "lambdas", "empty"),
        ({"lambdas": (-0.5,)}, ConfigError, "lambdas", "out of range"),
        ({"ks": (1.5,)}, ConfigError, "ks", "out of range"),
        ({"modalities": ["video"]}, ConfigError, "modality", "not in the recipe"),
        ({"backend": "dask"}, ConfigError, "backend", "not one of"),
        ({"score": lambda c: 0.0, "jobs": 2, "backend": "process"}, ConfigError, "score", "cannot be sent"),
        ({"recipe_options": {"method": "emr", "mask": "emr"}}, ConfigError, "mask", "no λ"),
        ({"recipe_options": {"mask": "none"}}, ConfigError, "mask", "no λ"),
        ({"recipe_options": {"method": "average", "mask": "tall"}, "ks": (0.5, 0.8)}, ConfigError, "ks", "not trim"),
    ],
)
def test_bad_requests_are_refused_naming_their_key(tune_setup, kwargs, error, key, match):
    kwargs = dict(kwargs)
    recipe = tune_setup.recipe
    if "recipe_options" in kwargs:
        recipe = replace(recipe, options=replace(recipe.options, **kwargs.pop("recipe_options")))
    with pytest.raises(error, match=match) as err:
        run_tune(recipe, **{"lambdas": (0.9,), **kwargs})
    assert err.value.key == key


# -------------------------------------------------------------------------------------------------------- CLI
def test_mmer_tune_prints_a_table_and_writes_json_png_and_recipe(tune_setup, tmp_path):
    specs = []
    for name, data in (
        ("base", {"model": str(tune_setup.base_dir)}),
        *((m, {"model": str(p), "modality": m}) for m, p in tune_setup.models.items()),
    ):
        specs.append(tmp_path / f"{name}.yaml")
        specs[-1].write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "out"

    text = cli(
        "tune",
        *specs,
        "--lambdas",
        "0.5,1",
        "--ks",
        "0.5,0.8",
        "-o",
        out,
        "--write-recipe",
        tmp_path / "tuned.yaml",
        "--quiet",
    )
    assert text.exit_code == 0, text
    assert "★" in text.stdout and "chosen: K=" in text.stdout and "λ=0.5" in text.stdout
    assert (out / "tune.png").is_file() and (tmp_path / "tuned.yaml").is_file()

    data = cli(
        "tune",
        "--checkpoint",
        tune_setup.merged,
        "--score",
        "test_tune:synthetic",
        "--lambdas",
        "0.6,1.2",
        "--modality",
        "vision",
        "-o",
        out,
        "--overwrite",  # the first run's files are there: replaced only when asked
        "--json",
    )
    assert data.exit_code == 0, data
    assert data.json()["best"]["lambda"] == {"vision": 0.6} and data.json()["files"]["json"] == str(out / "tune.json")

    bad = cli("tune", *specs, "--score", "nope:fn", "-o", tmp_path / "new", "--json")
    assert bad.exit_code == 2 and bad.json()["key"] == "score"
    worse = cli("tune", *specs, "--lambdas", "0.5,x", "-o", out)
    assert worse.exit_code == 2 and "comma-separated" in worse.stderr


# ---------------------------------------------------------------------------------------------------- α
def test_alpha_is_searched_with_k_and_the_tuned_recipe_merges_with_the_chosen_alpha(tune_setup, tmp_path):
    report = run_tune(tune_setup.recipe, score=alpha_peak, lambdas=(0.6, 1.2), ks=(0.8,), alphas=(0.7, 1.0, 1.3))
    assert (report.best_k, report.best_alpha) == (0.8, 0.7)
    assert report.best_lambdas == {"vision": 0.6, "audio": 1.2}
    assert sorted({r.alpha for r in report.results}) == [0.7, 1.0, 1.3] and len(report.results) == 2 * 3 * 2
    assert report.alpha_scores == {0.7: 0.0, 1.0: pytest.approx(-0.09), 1.3: pytest.approx(-0.36)}
    _, _, options = load_recipe(report.write_recipe(tmp_path / "tuned.yaml"))
    assert (options.k, options.alpha) == (0.8, 0.7)


def test_each_alpha_merges_its_own_tau_star_so_the_recon_proxy_moves_with_it(tune_setup):
    """α scales τ*, and the masks compare each τᵢ with that τ*: every α is a merge of its own, and at λ = 1 the
    reconstruction proxy prefers the α whose τ* is closest to the task vectors it masks."""
    report = run_tune(tune_setup.recipe, score="recon", lambdas=(1.0,), ks=(0.8,), alphas=(0.25, 1.0, 4.0))
    scores = report.alpha_scores
    assert len(set(scores.values())) == 3  # no axis is flat
    assert report.best_alpha == 1.0 and scores[1.0] > scores[0.25] and scores[1.0] > scores[4.0]


def test_an_alpha_grid_out_of_range_is_refused(tune_setup):
    with pytest.raises(ConfigError, match="alphas") as err:
        run_tune(tune_setup.recipe, score="recon", alphas=(0.0, 1.0))
    assert err.value.key == "alphas"
