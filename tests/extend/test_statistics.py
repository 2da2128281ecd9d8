"""The Extender's statistics set (a fixed sample count, the paper's 10k) and which tokens its counts cover."""

from __future__ import annotations

import pytest
import torch
from tiny_moe import (
    build_lm,
    make_data,
    quick,
    single_thread,  # noqa: F401  (autouse: one thread per module)
)

from mmer.errors import ConfigError
from mmer.extend import MoExtendModel, MoExtendRecipe, ProbeOptions, load_moextend_recipe, run_probe
from mmer.extend.probe import count_routing, statistics_set


def test_the_defaults_are_the_papers_statistics_set_and_probe_length():
    recipe = MoExtendRecipe()
    assert recipe.selection.stats_samples == 10_000  # the paper's S_e: 10k samples
    assert recipe.probe.steps == 1000  # the paper's probe: 1,000 steps
    assert recipe.selection.routing_tokens == "all"


@pytest.mark.parametrize(
    "samples,fraction,held",
    [
        (10_000, 0.1, 10),  # small data: the share caps the set (90 of 100 samples stay for training)
        (5, 0.1, 5),  # a fixed count below the share
        (10_000, 0.5, 50),
        (1, 0.1, 1),
    ],
)
def test_the_statistics_set_is_a_fixed_count_capped_by_the_held_out_share(samples, fraction, held):
    data = make_data(100)
    rest, stats = statistics_set(data, None, ProbeOptions(stats_samples=samples, stats_fraction=fraction), seed=3)
    assert (len(rest), len(stats)) == (100 - held, held)
    together = torch.cat([rest.input_ids, stats.input_ids])
    assert len(torch.unique(together, dim=0)) == 100  # disjoint, nothing lost


def test_a_separate_statistics_set_is_sampled_down_to_the_count_and_training_keeps_all_data():
    data, separate = make_data(30), make_data(40, seed=9)
    rest, stats = statistics_set(data, separate, ProbeOptions(stats_samples=25), seed=3)
    assert rest is data and len(stats) == 25
    again = statistics_set(data, separate, ProbeOptions(stats_samples=25), seed=3)[1]
    assert torch.equal(stats.input_ids, again.input_ids)  # seeded
    assert statistics_set(data, separate, ProbeOptions(stats_samples=100), seed=3)[1] is separate


def test_prompt_only_counts_cover_the_real_tokens_without_a_label():
    model = MoExtendModel(build_lm())
    data = make_data(6, features=False)
    labels = data.labels.clone()
    labels[:, :5] = -100  # a 5-token prompt, the rest the answer
    data.labels = labels
    everything = count_routing(model, data, 4, "all")
    prompt = count_routing(model, data, 4, "prompt")
    real = int(data.attention_mask.sum())
    assert everything.tokens == real and prompt.tokens == 6 * 5
    assert all(float(c.sum()) == 2 * 6 * 5 for c in prompt.counts.values())  # top-2 of each prompt token


def test_prompt_only_counts_on_data_where_every_token_has_a_label_are_an_error_naming_the_option():
    model = MoExtendModel(build_lm())
    with pytest.raises(ConfigError, match="no token") as info:
        count_routing(model, make_data(6, features=False), 4, "prompt")
    assert info.value.key == "routing_tokens" and "label -100" in info.value.hint


def test_the_probe_counts_the_prompt_when_asked_and_records_the_count():
    data = make_data(20, features=False)
    labels = data.labels.clone()
    labels[:, :4] = -100
    data.labels = labels
    options = ProbeOptions(stats_samples=4, stats_fraction=0.5, routing_tokens="prompt")
    result = run_probe(MoExtendModel(build_lm()), data, quick(steps=1), options)
    assert result.before.tokens == result.after.tokens == 4 * 4  # 4 samples × 4 prompt tokens


def test_a_recipe_sets_the_new_options_and_refuses_a_bad_value(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "selection:\n  stats_samples: 500\n  routing_tokens: prompt\n"
        "finetune:\n  gradient_checkpointing: true\n  num_workers: 2\n"
    )
    recipe = load_moextend_recipe(path)
    assert (recipe.selection.stats_samples, recipe.selection.routing_tokens) == (500, "prompt")
    assert recipe.finetune.gradient_checkpointing and recipe.finetune.num_workers == 2
    path.write_text("selection:\n  routing_tokens: promt\n")
    with pytest.raises(ConfigError, match="routing_tokens") as info:
        load_moextend_recipe(path)
    assert "prompt" in info.value.hint
    with pytest.raises(ConfigError, match="stats_samples"):
        ProbeOptions(stats_samples=0)
