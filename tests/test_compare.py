"""`compare` measures exactly what a written checkpoint would give, for every variant, in shared passes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_pipeline import recipe_for

import mmer
from mmer.compare import PAPER_VARIANTS, parse_variant, run_compare, write_bar_chart
from mmer.config import MergeOptions
from mmer.errors import ConfigError


@pytest.mark.parametrize(
    "text,method,mask,dare",
    [
        ("ties/mmer", "ties", "mmer", 0.0),
        ("average/none", "average", "none", 0.0),
        ("ties+dare/none", "ties", "none", 0.5),
        ("task_arithmetic+dare=0.3/tall", "task_arithmetic", "tall", 0.3),
        ("emr", "emr", "mmer", 0.0),
        ("ties/sign_only", "ties", "sign_only", 0.0),
        ("ties+dare/magnitude_only", "ties", "magnitude_only", 0.5),
    ],
)
def test_a_variant_string_names_method_dare_and_mask(text, method, mask, dare):
    options = parse_variant(text, MergeOptions())
    assert (options.method, options.mask, options.dare) == (method, mask, dare)


@pytest.mark.parametrize("text", ["ties/", "ties+dare=1.5/none", "Ties/mmer", "ties mmer"])
def test_a_malformed_variant_is_refused(text):
    with pytest.raises(ConfigError):
        parse_variant(text, MergeOptions())


def test_compare_errors_equal_those_of_the_written_checkpoints(tiny_models, tmp_path):
    models = {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    recipe = recipe_for(tiny_models["base_dir"], models)
    variants = ("ties/mmer", "average+dare=0.3/none", "emr/emr", "task_arithmetic/tall", "ties/magnitude_only")
    report = run_compare(recipe, variants)
    assert [r.label for r in report.results] == [
        "ties/mmer",
        "average+dare0.3/none",
        "emr/emr",
        "task_arithmetic/tall",
        "ties/magnitude_only",
    ]
    for text, result in zip(variants, report.results, strict=True):
        out = tmp_path / text.replace("/", "_").replace("=", "")
        mmer.run_merge(replace(recipe, options=parse_variant(text, recipe.options)), out)
        with mmer.load_decoupled(out) as ckpt:
            for modality in ("vision", "audio"):
                error = norm = 0.0
                for name, base in tiny_models["base"].items():
                    tau = tiny_models[modality][name][: base.shape[0]] - base
                    rebuilt = ckpt.llm_tensor(modality, name)[: base.shape[0]]
                    error += float(((rebuilt - base) - tau).abs().sum())
                    norm += float(tau.abs().sum())
                assert result.rel_l1[modality] == pytest.approx(error / norm, rel=1e-5), (text, modality)
                if not ckpt.is_single_model:
                    assert result.density[modality] == pytest.approx(ckpt.modality(modality).density)
                    assert result.scale[modality] == pytest.approx(ckpt.modality(modality).scale)


def test_the_default_set_is_the_paper_s_tables_2_and_5() -> None:
    assert {"ties/mmer", "ties/sign_only", "ties/magnitude_only", "emr/emr", "task_arithmetic/tall"} <= set(
        PAPER_VARIANTS
    )


def test_mmer_rebuilds_each_modality_closer_than_the_single_model_baselines(tiny_models, tmp_path):
    recipe = recipe_for(
        tiny_models["base_dir"], {"vision": tiny_models["vision_dir"], "audio": tiny_models["audio_dir"]}
    )
    report = run_compare(recipe, PAPER_VARIANTS)
    by_label = {r.label: r for r in report.results}
    for modality in ("vision", "audio"):
        for baseline in ("average/none", "task_arithmetic/none", "ties/none"):
            assert by_label["ties/mmer"].rel_l1[modality] < by_label[baseline].rel_l1[modality]
        assert by_label["average/none"].density[modality] == 1.0
    # MMER Table 5: each half of Eq. 3 alone keeps entries the whole rule drops, and each such entry moves the
    # weight further from θᵢ in ℓ1 (λ ≤ 1): an agreeing τᵢ below half of τ*, or one pointing against it
    for ablation in ("ties/sign_only", "ties/magnitude_only"):
        for modality in ("vision", "audio"):
            assert by_label[ablation].density[modality] > by_label["ties/mmer"].density[modality]
            assert by_label[ablation].rel_l1[modality] > by_label["ties/mmer"].rel_l1[modality]
    png = write_bar_chart(report, tmp_path / "bars.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_an_unsupported_combination_before_reading(tiny_models):
    recipe = recipe_for(tiny_models["base_dir"], {"vision": tiny_models["vision_dir"]})
    with pytest.raises(ConfigError, match="EMR"):
        run_compare(recipe, ("ties/emr",))
