"""mmer.extend.losses: the LM loss and the per-layer load-balancing loss, golden values by hand (§2.6)."""

from __future__ import annotations

import math

import pytest
import torch

from mmer.extend.losses import lm_loss, load_balancing_loss


def logits_of(*rows: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly the given probability rows (log p, each row summing to 1)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


# Layer 0: 3 experts, tokens prefer experts 0 and 1. Layer 1: 4 experts, tokens prefer 3 and 0.
LAYER_0 = logits_of([0.5, 0.3, 0.2], [0.2, 0.5, 0.3])
LAYER_1 = logits_of([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])


def test_load_balancing_with_layers_of_different_expert_counts_matches_the_hand_computation():
    # top-1. Layer 0: f = [1/2, 1/2, 0], P = [0.35, 0.40, 0.25]; Σ f·P = 0.175 + 0.200 = 0.375; × 3 experts = 1.125.
    # Layer 1: f = [1/2, 0, 0, 1/2], P = [0.25, 0.25, 0.25, 0.25]; Σ f·P = 0.25; × 4 experts = 1.0.
    loss = load_balancing_loss({0: LAYER_0, 1: LAYER_1}, top_k=1)
    assert loss.item() == pytest.approx((1.125 + 1.0) / 2, abs=1e-6)


def test_the_max_scale_multiplies_every_layer_by_the_widest_layer_as_the_authors_code_does():
    # Same terms, both × 4 (the code's hard-coded global expert count): (0.375·4 + 0.25·4) / 2 = 1.25.
    loss = load_balancing_loss({0: LAYER_0, 1: LAYER_1}, top_k=1, scale="max")
    assert loss.item() == pytest.approx(1.25, abs=1e-6)


def test_top_two_counts_both_selected_experts():
    # Layer 0, top-2: token 1 picks {0, 1}, token 2 picks {1, 2}: f = [1/2, 1, 1/2], P = [0.35, 0.40, 0.25];
    # Σ f·P = 0.175 + 0.400 + 0.125 = 0.700; × 3 = 2.1.
    loss = load_balancing_loss({0: LAYER_0}, top_k=2)
    assert loss.item() == pytest.approx(2.1, abs=1e-6)


def test_padding_tokens_are_left_out_of_both_the_fractions_and_the_mean_probabilities():
    padded = torch.cat([LAYER_0, logits_of([0.01, 0.01, 0.98])])
    mask = torch.tensor([1, 1, 0])
    loss = load_balancing_loss({0: padded}, top_k=1, attention_mask=mask)
    assert loss.item() == pytest.approx(1.125, abs=1e-6)
    assert load_balancing_loss({0: padded}, top_k=1).item() != pytest.approx(1.125, abs=1e-3)


def test_for_one_layer_it_is_exactly_transformers_own_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(2 * 7, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ours = load_balancing_loss({0: logits}, top_k=2, attention_mask=mask)
    theirs = load_balancing_loss_func((logits,), num_experts=5, top_k=2, attention_mask=mask)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_a_perfectly_balanced_layer_scores_k_whatever_its_width():
    for experts in (3, 8):
        uniform = torch.zeros(experts * 4, experts)
        uniform += torch.eye(experts).repeat(4, 1) * 1e-4  # each expert wins equally often, probabilities ≈ 1/E
        assert load_balancing_loss({0: uniform}, top_k=1).item() == pytest.approx(1.0, abs=1e-3)


def test_the_load_balancing_loss_gives_gradients_to_the_router_logits():
    logits = LAYER_1.clone().requires_grad_(True)
    load_balancing_loss({0: logits}, top_k=1).backward()
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


def test_the_lm_loss_predicts_the_next_token_and_skips_ignored_labels():
    # Two positions count: position 0 predicts label[1] = 2 and position 2 predicts label[3] = 0.
    logits = torch.zeros(1, 4, 3)
    logits[0, 0] = torch.tensor([0.0, 0.0, math.log(2.0)])
    labels = torch.tensor([[7, 2, -100, 0]])
    expected = (-math.log(2 / 4) - math.log(1 / 3)) / 2
    assert lm_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_a_batch_without_targets_has_zero_lm_loss_with_a_graph():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = lm_loss(logits, torch.full((1, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
