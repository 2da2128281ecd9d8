"""`mmer tune --joint`: in expansion mode the text tokens run on the mean mask m̄, so the λ vector is chosen as a
whole, every candidate served by the per-token router over exactly the checkpoint `mmer merge` writes for it,
searched over the grid's product or by coordinate ascent within a budget, the same way every time."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_pipeline import recipe_for

import mmer
from mmer.errors import ConfigError, MmerError
from mmer.route.router import Router
from mmer.tune import Candidate, JointCandidate, run_joint_tune, run_tune
from mmer.tune.joint_search import Axis, joint_search, snap

LAMBDAS = (0.3, 0.6, 0.9, 1.2, 1.5)
START = 0.9  # the mmer rule's default λ, every recipe's here


def coupled(vision: float, audio: float) -> float:
    """A validation score whose mixed prompts want each modality's own λ (0.6 and 1.2) and text tokens whose m̄ is
    best when the mean λ is 0.6: the coupling expansion mode makes (m̄'s density grows with every λᵢ)."""
    return -((vision - 0.6) ** 2) - (audio - 1.2) ** 2 - 12 * ((vision + audio) / 2 - 0.6) ** 2


def joint_score(candidate: JointCandidate) -> dict[str, float]:
    lams = candidate.lambdas
    return {"score": coupled(lams["vision"], lams["audio"]), "mean_lambda": (lams["vision"] + lams["audio"]) / 2}


def per_modality_score(candidate: Candidate) -> float:
    """The same score as the per-modality search sees it: the other modality held at the recipe's λ."""
    lams = {"vision": START, "audio": START, candidate.modality: candidate.lambda_}
    return coupled(lams["vision"], lams["audio"])


def flat(candidate: JointCandidate) -> float:
    return 1.0


def audio_only(candidate: JointCandidate) -> float:
    return -((candidate.lambdas["audio"] - 1.2) ** 2)


@pytest.fixture(scope="module")
def recipe(tiny_models):
    models = {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    return recipe_for(tiny_models["base_dir"], models, k=0.8)


def bowl(vector: tuple[float, ...]) -> float:
    x, y = vector
    return -((x - 3) ** 2) - (y - 1) ** 2 - 0.5 * x * y


def scorer(log: list[list[tuple[float, ...]]]):
    def score(batch):
        log.append(list(batch))
        return [bowl(v) for v in batch]

    return score


# ------------------------------------------------------------------------------------------ the search order
def test_the_grid_scores_every_vector_of_the_product_once_in_order_and_keeps_the_best():
    axes = [Axis("x", (1.0, 2.0, 3.0), 1.0), Axis("y", (0.0, 1.0), 0.0)]
    log: list = []
    searched = joint_search(axes, scorer(log), "auto", budget=6)
    assert searched.method == "grid" and searched.stopped == "grid complete"
    assert searched.order == [(1.0, 0.0), (1.0, 1.0), (2.0, 0.0), (2.0, 1.0), (3.0, 0.0), (3.0, 1.0)]
    assert len(log) == 1  # one batch: the backend may score it all in parallel
    assert searched.order[searched.best] == max(searched.order, key=bowl) == (3.0, 0.0)


def test_coordinate_ascent_moves_one_axis_at_a_time_nearest_values_first_until_a_round_moves_nothing():
    axes = [Axis("x", (1.0, 2.0, 3.0, 4.0), 1.0), Axis("y", (0.0, 1.0, 2.0), 2.0)]
    log: list = []
    searched = joint_search(axes, scorer(log), "coordinate", budget=100)
    # From (1, 2): along x, (2, 2) and (3, 2) tie at -4 and the one nearer the start wins; along y, (2, 1) and
    # (2, 0) tie at -2, (2, 1) nearer; round 2 climbs to (3, 1) then (3, 0); round 3 scores what its lines
    # still miss and moves nothing.
    assert log == [
        [(1.0, 2.0)],
        [(2.0, 2.0), (3.0, 2.0), (4.0, 2.0)],
        [(2.0, 1.0), (2.0, 0.0)],
        [(1.0, 1.0), (3.0, 1.0), (4.0, 1.0)],
        [(3.0, 0.0)],  # (3, 2) was scored in round 1: never twice
        [(4.0, 0.0), (1.0, 0.0)],
    ]
    assert searched.order[searched.best] == (3.0, 0.0) == max(searched.order, key=bowl)
    assert searched.rounds == 3 and searched.stopped == "converged"


def test_neighbours_are_tried_by_grid_steps_and_a_recipe_value_midway_starts_at_the_smaller():
    assert snap((0.6, 1.2), 0.9) == 0.6 and snap((0.3, 0.9, 1.5), 1.0) == 0.9  # 1.2 − 0.9 ≠ 0.9 − 0.6 in floats
    log: list = []
    joint_search([Axis("λ", (0.3, 0.9, 1.5), 0.9)], lambda b: log.append(b) or [0.0] * len(b), "coordinate", 9)
    assert log == [[(0.9,)], [(0.3,), (1.5,)]]  # 1.5 − 0.9 < 0.9 − 0.3 in floats: steps decide, not rounding


@pytest.mark.parametrize("budget", range(1, 15))
def test_the_budget_is_never_exceeded_and_a_search_it_cut_short_says_so(budget):
    axes = [Axis("x", (1.0, 2.0, 3.0, 4.0), 1.0), Axis("y", (0.0, 1.0, 2.0), 2.0)]
    searched = joint_search(axes, scorer([]), "coordinate", budget=budget)
    assert len(searched.order) == len(set(searched.order)) <= budget
    full = joint_search(axes, scorer([]), "coordinate", budget=100)
    assert searched.order == full.order[:budget]  # the same path, cut where the budget ends
    assert searched.stopped == ("budget" if budget < len(full.order) else "converged")


def test_the_same_inputs_give_the_same_search_every_time():
    axes = [Axis("x", (1.0, 2.0, 3.0, 4.0), 4.0), Axis("y", (0.0, 1.0, 2.0), 0.0), Axis("z", (5.0, 6.0), 6.0)]

    def score(batch):
        return [bowl(v[:2]) + (v[2] - 5.5) ** 2 for v in batch]

    runs = [joint_search(axes, score, "coordinate", budget=9) for _ in range(3)]
    assert all(r.order == runs[0].order and r.scores == runs[0].scores and r.best == runs[0].best for r in runs)


def test_a_flat_score_keeps_the_recipes_values():
    axes = [Axis("x", (1.0, 2.0, 3.0), 2.0), Axis("y", (0.0, 1.0), 1.0)]
    for method in ("grid", "coordinate"):
        searched = joint_search(axes, lambda batch: [0.0] * len(batch), method, budget=6)
        assert searched.order[searched.best] == (2.0, 1.0)


@pytest.mark.parametrize(
    ("search", "budget", "key", "match"),
    [
        ("grid", 5, "budget", "over the budget of 5"),
        ("best", 10, "search", "not one of"),
        ("auto", 0, "budget", "positive whole number"),
    ],
)
def test_a_search_that_cannot_run_as_asked_is_refused_before_anything_is_scored(search, budget, key, match):
    axes = [Axis("x", (1.0, 2.0, 3.0), 1.0), Axis("y", (0.0, 1.0), 0.0)]
    with pytest.raises(ConfigError, match=match) as err:
        joint_search(axes, lambda batch: pytest.fail("scored"), search, budget)
    assert err.value.key == key and err.value.hint


# --------------------------------------------------------------------------------------------- run_joint_tune
def test_where_the_mean_mask_couples_the_lambdas_the_joint_choice_beats_tuning_each_modality_alone(recipe):
    alone = run_tune(recipe, score=per_modality_score, lambdas=LAMBDAS)
    separately = (alone.best_lambdas["vision"], alone.best_lambdas["audio"])
    assert separately == (0.3, 0.6)

    report = run_joint_tune(recipe, score=joint_score, lambdas=LAMBDAS)
    jointly = (report.best.lambdas["vision"], report.best.lambdas["audio"])
    best = max(((v, a) for v in LAMBDAS for a in LAMBDAS), key=lambda p: coupled(*p))
    assert report.method == "grid" and len(report.results) == 25
    assert jointly == best == (0.3, 0.9) != separately
    assert coupled(*jointly) > coupled(*separately)
    assert report.results[report.best.order].details == {"mean_lambda": 0.6}

    climbed = run_joint_tune(recipe, score=joint_score, lambdas=LAMBDAS, budget=12)
    assert climbed.method == "coordinate" and len(climbed.results) <= 12
    assert (climbed.best.lambdas["vision"], climbed.best.lambdas["audio"]) == best
    assert [r.order for r in climbed.results] == list(range(len(climbed.results)))
    assert climbed.results[0].lambdas == {"vision": START, "audio": START}  # it starts from the recipe


def test_a_checkpoint_is_tuned_jointly_from_its_originals_and_its_recipe_written_back(recipe, tmp_path):
    merged = tmp_path / "merged"
    mmer.run_merge(recipe, merged)
    from_recipe = run_joint_tune(recipe, score=joint_score, lambdas=(0.3, 0.9))
    from_checkpoint = run_joint_tune(checkpoint=merged, score=joint_score, lambdas=(0.3, 0.9))
    assert [r.to_dict() | {"seconds": 0} for r in from_checkpoint.results] == [
        r.to_dict() | {"seconds": 0} for r in from_recipe.results
    ]
    tuned = from_checkpoint.tuned_recipe()
    assert {m.modality: m.lambda_ for m in tuned.models} == {"vision": 0.3, "audio": 0.9}
    assert [m.model for m in tuned.models] == [m.model for m in recipe.models]


def test_candidates_scored_on_threads_give_the_same_report_as_in_order(recipe):
    kwargs = {"score": joint_score, "lambdas": LAMBDAS, "ks": (0.6, 0.8), "budget": 14}
    serial = run_joint_tune(recipe, **kwargs)
    threads = run_joint_tune(recipe, backend="thread", jobs=3, **kwargs)
    assert [r.to_dict() | {"seconds": 0} for r in serial.results] == [
        r.to_dict() | {"seconds": 0} for r in threads.results
    ]
    assert serial.best.order == threads.best.order


def test_an_axis_that_changes_no_score_is_warned_about(recipe):
    report = run_joint_tune(recipe, score=audio_only, lambdas=(0.6, START, 1.2))
    assert report.best.lambdas == {"vision": START, "audio": 1.2}  # vision untouched: the recipe's λ stays
    assert any("λ of vision" in w and "only the tie-break" in w for w in report.warnings)
    assert not any("λ of audio" in w for w in report.warnings)
    flat_report = run_joint_tune(recipe, score=flat, lambdas=(0.6, START, 1.2))
    assert flat_report.best.lambdas == {"vision": START, "audio": START}
    assert sum("only the tie-break" in w for w in flat_report.warnings) == 2


def test_a_joint_tune_refuses_what_it_cannot_score_naming_the_option(recipe, tmp_path):
    cases = [
        ({"score": "recon"}, "score", "one modality's model alone"),
        ({"score": "logits"}, "score", "one modality's model alone"),
        ({"score": "recon", "validation": "val.jsonl"}, "score", "one modality's model alone"),
        ({"score": joint_score, "validation": tmp_path / "missing.jsonl"}, "validation", "no such validation"),
        ({"score": joint_score, "modalities": ["speech"]}, "modality", "not in the recipe"),
        ({"score": joint_score, "search": "grid", "budget": 4}, "budget", "over the budget"),
        ({"score": joint_score, "lambdas": (-1.0,)}, "lambdas", "out of range"),
    ]
    for kwargs, key, match in cases:
        with pytest.raises(MmerError, match=match) as err:
            run_joint_tune(recipe, **kwargs)
        assert err.value.key == key and err.value.hint, kwargs


# ------------------------------------------------------------------------------- through the per-token router
SEEN: dict[int, dict] = {}
PROMPT = "prompt"


def mixed_prompt_score(candidate: JointCandidate) -> dict[str, float]:
    """Mean log-probability of the validation file's next text tokens after a mixed prompt (text, image, text,
    audio), run through the candidate's per-token router: what a user's expansion-mode score looks like."""
    from route_fixtures import model_inputs

    ids = json.loads(Path(candidate.validation).read_text())  # type: ignore[arg-type]
    assert set(candidate.source_dirs) == {"vision", "audio"} and candidate.source_dirs["vision"].is_dir()
    expansion = candidate.expansion()
    try:
        mixed = expansion.embed(
            [
                torch.tensor([[1, 2]]),
                ("vision", model_inputs("vision")),
                torch.tensor([[3]]),
                ("audio", model_inputs("audio")),
                torch.tensor([ids[:-1]]),
            ]  # fmt: skip
        )
        logits = expansion(mixed).logits[0, -len(ids) + 1 :]
    finally:
        expansion.router.close()
    logp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])
    SEEN[candidate.order] = {"logits": logits.clone(), "checkpoint": candidate.checkpoint(), **candidate.fields()}
    return {"score": float(logp.mean()), "tokens": len(ids) - 1}


@pytest.mark.slow
def test_each_candidate_runs_mixed_prompts_on_exactly_the_checkpoint_mmer_merge_writes_for_its_vector(
    demo_models, tmp_path
):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "route"))
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps([5, 9, 17, 33, 65, 129]))
    recipe = mmer.config.build_recipe(list(demo_models.specs))
    SEEN.clear()
    report = run_joint_tune(
        recipe, score=mixed_prompt_score, lambdas=(0.3, 1.5), modalities=["audio"], validation=validation
    )
    assert len(report.results) == 2 and len(SEEN) == 2
    assert len({round(r.score, 6) for r in report.results}) > 1  # λ moves the mixed prompt's text tokens
    best = report.results[report.best.order]
    assert best.score == max(r.score for r in report.results) and best.details["tokens"] == 5
    for order in (0, 1):
        seen = SEEN[order]
        assert not seen["checkpoint"].exists()  # removed once scored
        models = tuple(replace(m, lambda_=seen["lambda"][m.modality]) for m in recipe.models)
        out = tmp_path / f"merged_{order}"
        mmer.run_merge(replace(recipe, models=models), out)
        router = Router.from_pretrained(out)
        try:
            from route_fixtures import model_inputs

            expansion = router.expansion()
            ids = json.loads(validation.read_text())
            mixed = expansion.embed(
                [
                    torch.tensor([[1, 2]]),
                    ("vision", model_inputs("vision")),
                    torch.tensor([[3]]),
                    ("audio", model_inputs("audio")),
                    torch.tensor([ids[:-1]]),
                ]  # fmt: skip
            )
            assert torch.equal(expansion(mixed).logits[0, -len(ids) + 1 :], seen["logits"])
        finally:
            router.close()


# ------------------------------------------------------------------------------------------ baselines: K and α
TARGET: dict[str, torch.Tensor] = {}


def distance_to_target(candidate: JointCandidate) -> float:
    """How far the candidate's merged model is from a reference merge: a validation score peaked at one (K, α)."""
    from safetensors.torch import load_file

    merged = {}
    for file in sorted(candidate.checkpoint().glob("*.safetensors")):
        merged.update(load_file(str(file)))
    return -sum(float((merged[n].float() - t.float()).abs().sum()) for n, t in TARGET.items())


def test_a_merge_without_masks_is_tuned_over_k_and_alpha_by_the_same_search(recipe, tmp_path):
    from safetensors.torch import load_file

    baseline = replace(recipe, options=replace(recipe.options, mask="none"))
    reference = tmp_path / "reference"
    mmer.run_merge(replace(baseline, options=replace(baseline.options, k=0.2, alpha=0.8)), reference)
    TARGET.clear()
    for file in sorted(reference.glob("*.safetensors")):
        TARGET.update(load_file(str(file)))
    report = run_joint_tune(baseline, score=distance_to_target, ks=(0.2, 0.5, 1.0), alphas=(0.8, 1.0))
    assert (report.best.k, report.best.alpha, report.best.score) == (0.2, 0.8, 0.0)
    assert sorted(r.score for r in report.results).count(0.0) == 1  # every other (K, α) is another merge
    assert report.modalities == [] and len(report.results) == 6
    assert (report.tuned_recipe().options.k, report.tuned_recipe().options.alpha) == (0.2, 0.8)
    assert all(r.lambdas == {"vision": None, "audio": None} for r in report.results)

    for kwargs, key in (({"lambdas": (0.6, 0.9)}, "lambdas"), ({"modalities": ["vision"]}, "modality"), ({}, "ks")):
        with pytest.raises(ConfigError, match="no λ") as err:
            run_joint_tune(baseline, score=distance_to_target, **kwargs)
        assert err.value.key == key and err.value.hint


def test_a_k_grid_is_refused_when_a_model_has_its_own_k(recipe):
    own = replace(recipe, models=(replace(recipe.models[0], k=0.5), *recipe.models[1:]))
    for tune, kwargs in ((run_tune, {}), (run_joint_tune, {"score": joint_score})):
        with pytest.raises(ConfigError, match="vision has its own K") as err:
            tune(own, ks=(0.6, 0.8), **kwargs)
        assert err.value.key == "ks" and err.value.hint


def validation_size(candidate: Candidate) -> float:
    return float(len(Path(candidate.validation).read_text().split()))  # type: ignore[arg-type]


def test_the_per_modality_search_hands_its_score_the_validation_data_too(recipe, tmp_path):
    (tmp_path / "val.txt").write_text("a b c\n")
    report = run_tune(recipe, score=validation_size, lambdas=(0.9,), validation=tmp_path / "val.txt")
    assert {r.score for r in report.results} == {3.0}
    with pytest.raises(ConfigError, match="recon does not read it") as err:
        run_tune(recipe, validation=tmp_path / "val.txt")
    assert err.value.key == "validation" and err.value.hint
