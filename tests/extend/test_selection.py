"""mmer.extend.routing / selection / probe: top-k counting, the Extender's d_j, the layer choice, the sources."""

from __future__ import annotations

import pytest
import torch
from tiny_moe import (
    build_lm,
    make_data,
    quick,
    single_thread,  # noqa: F401  (autouse: one thread per module)
    snapshot,
)

from mmer.errors import ConfigError
from mmer.extend import (
    ExtendOptions,
    MoExtendModel,
    ProbeOptions,
    RoutingCounts,
    RoutingTap,
    count_top_k,
    extend_model,
    layer_scores,
    plan_extension,
    run_probe,
    select_layers,
    source_experts,
)
from mmer.extend.probe import ProbeResult


def counts(**layers: list[float]) -> RoutingCounts:
    return RoutingCounts({int(k[1:]): torch.tensor(v, dtype=torch.float64) for k, v in layers.items()}, tokens=10)


# --------------------------------------------------------------------------------------------------- counting
def test_selection_counts_use_the_top_k_experts_not_the_bottom_k_of_the_authors_code():
    # Probabilities (by logit order) per token: token 1 ranks experts 3 > 1 > 0 > 2, token 2 ranks 0 > 3 > 2 > 1.
    logits = torch.tensor([[1.0, 2.0, 0.0, 3.0], [3.0, 0.0, 1.0, 2.0]])
    assert count_top_k(logits, 2).tolist() == [1.0, 1.0, 0.0, 2.0]  # top-2: {3, 1} and {0, 3}
    # The released expert_distribution.py sorted ascending and kept the first two: {2, 0} and {1, 2}.
    assert count_top_k(logits, 2).tolist() != [1.0, 1.0, 2.0, 0.0]


def test_padding_tokens_are_not_counted():
    logits = torch.tensor([[0.0, 5.0, 1.0], [5.0, 0.0, 1.0]])
    assert count_top_k(logits, 1, mask=torch.tensor([1, 0])).tolist() == [0.0, 1.0, 0.0]


def test_the_routing_tap_sees_the_same_logits_transformers_records():
    lm = build_lm("mixtral")
    ids = torch.randint(4, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        recorded = lm(ids, output_router_logits=True).router_logits
        with RoutingTap(lm, detach=True) as tap:
            lm(ids)
    assert sorted(tap.logits) == [0, 1, 2, 3]
    for layer, logits in tap.logits.items():
        assert torch.equal(logits, recorded[layer])


def test_the_routing_tap_sees_the_wider_logits_of_extended_layers_and_skips_dense_ones():
    lm = build_lm("qwen2_moe")
    extend_model(MoExtendModel(lm), {2: [0]}, ExtendOptions(layers="all"))
    with torch.no_grad(), RoutingTap(lm) as tap:
        lm(torch.randint(4, 40, (1, 5)))
    assert {layer: t.shape[-1] for layer, t in tap.logits.items()} == {0: 4, 2: 5, 3: 4}
    assert lm.model.layers[2].mlp.routing_sink is None  # the tap unhooks itself


# ---------------------------------------------------------------------------------------------- d_j and the choice
def test_layer_scores_are_the_sample_std_of_the_change_of_the_normalised_counts():
    before = counts(L0=[5, 5, 0, 0], L1=[4, 2, 2, 2], L2=[3, 3, 2, 2])
    after = counts(L0=[5, 5, 0, 0], L1=[2, 2, 2, 4], L2=[2, 2, 3, 3])
    # L0: no change → 0.  L1: diff = [0.2, 0, 0, -0.2]: mean 0, Σ d² = 0.08, /(4 − 1) → std = √(0.08/3).
    # L2: diff = [0.1, 0.1, -0.1, -0.1]: Σ d² = 0.04 → std = √(0.04/3).
    scores = layer_scores(before, after)
    assert scores[0] == 0.0
    assert scores[1] == pytest.approx((0.08 / 3) ** 0.5)
    assert scores[2] == pytest.approx((0.04 / 3) ** 0.5)
    assert layer_scores(before, after, ddof=0)[1] == pytest.approx((0.08 / 4) ** 0.5)


def test_the_top_half_of_the_layers_by_score_is_chosen_and_returned_in_layer_order():
    scores = {0: 0.1, 1: 0.4, 2: 0.0, 3: 0.3, 4: 0.2, 5: 0.05}
    assert select_layers(scores, 0.5) == [1, 3, 4]
    assert select_layers(scores, 0.25) == [1]  # ⌊0.25·6⌋ = 1
    assert select_layers({0: 0.0}, 0.5) == [0]  # at least one layer


def test_equal_scores_go_to_the_lower_layer_index():
    assert select_layers({0: 0.1, 1: 0.2, 2: 0.2, 3: 0.2}, 0.5) == [1, 2]


def test_the_source_expert_is_the_most_used_one_ties_to_the_lower_index():
    stats = counts(L0=[1, 7, 7, 0], L3=[9, 2, 2, 9])
    assert source_experts(stats, [0, 3], 1, {0: 4, 3: 4}) == {0: [1], 3: [0]}
    assert source_experts(stats, [0], 2, {0: 4}) == {0: [1, 2]}
    assert source_experts(None, [0, 3], 1, {0: 4, 3: 4}, fixed=2) == {0: [2], 3: [2]}
    with pytest.raises(ConfigError, match="layer 0 has only 4 experts"):
        source_experts(None, [0], 1, {0: 4}, fixed=4)


def probe_result(selected=(1, 3)) -> ProbeResult:
    before = counts(L0=[5, 1, 1, 1], L1=[1, 5, 1, 1], L2=[1, 1, 5, 1], L3=[1, 1, 1, 5])
    after = counts(L0=[1, 1, 1, 5], L1=[1, 1, 5, 1], L2=[1, 5, 1, 1], L3=[5, 1, 1, 1])
    return ProbeResult(before, after, {0: 0.1, 1: 0.2, 2: 0.0, 3: 0.3}, list(selected), 0.5)


def test_the_new_expert_copies_the_most_used_expert_after_router_tuning_by_default():
    model = MoExtendModel(build_lm())
    plan = plan_extension(model, ExtendOptions(), probe_result())
    assert plan.sources == {1: [2], 3: [0]}  # argmax of κ′ (the code; Eq. 8's κ is a typo)
    assert plan.source_statistics == "tuned" and plan.method == "extender"
    literal = plan_extension(model, ExtendOptions(source="base"), probe_result())
    assert literal.sources == {1: [1], 3: [3]}  # argmax of κ


def test_given_layers_without_a_probe_copy_the_base_models_most_used_expert():
    model = MoExtendModel(build_lm())
    data = make_data(n=8, features=False)
    plan = plan_extension(model, ExtendOptions(layers=(0, 2)), stats_data=data)
    assert plan.layers == [0, 2] and plan.source_statistics == "base" and plan.method == "explicit"
    assert plan.sources[0] == [int(plan.counts.counts[0].argmax())]
    with pytest.raises(ConfigError, match="needs the probe"):
        plan_extension(model, ExtendOptions(), None)
    with pytest.raises(ConfigError, match="source = tuned needs"):
        plan_extension(model, ExtendOptions(layers="all", source="tuned"), None, data)


# --------------------------------------------------------------------------------------------------- the probe
def test_the_probe_tunes_only_the_routers_and_puts_every_weight_back_bit_for_bit():
    lm = build_lm()
    model = MoExtendModel(lm)
    before = snapshot(lm)
    result = run_probe(model, make_data(features=False), quick(steps=4, learning_rate=0.5), ProbeOptions())
    assert all(torch.equal(before[name], tensor) for name, tensor in lm.state_dict().items())
    assert not any(p.requires_grad for p in lm.parameters())
    assert result.report["trainable_parameters"] == 4 * 4 * 32  # 4 routers of 4 × 32
    assert sorted(result.scores) == [0, 1, 2, 3] and len(result.selected) == 2
    assert any(v > 0 for v in result.scores.values())  # the routing moved
    assert result.before.tokens == result.after.tokens > 0


def test_a_probe_result_survives_its_json_file(tmp_path):
    result = probe_result()
    again = ProbeResult.load(result.save(tmp_path / "probe.json"))
    assert again.selected == result.selected and again.scores == result.scores
    assert torch.equal(again.after.counts[3], result.after.counts[3])
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not an mmer probe result"):
        ProbeResult.load(tmp_path / "bad.json")
