"""The relative ℓ1 reconstruction error ‖θ̂ − θ‖₁ / ‖τ‖₁: one number for compare, tune, verify and the add gap."""

from __future__ import annotations

import pytest
import torch

from mmer.merge.error import error_l1, relative_error, tau_l1


def test_the_error_from_theta_and_from_the_task_vector_is_the_same_number():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    theta = torch.tensor([1.5, 1.0, 3.0, 6.0])
    rebuilt = torch.tensor([1.5, 2.0, 3.0, 5.0])
    assert error_l1(rebuilt, theta=theta) == error_l1(rebuilt, base=base, tau=theta - base) == 2.0
    assert tau_l1(theta - base) == tau_l1(theta=theta, base=base) == 3.5


def test_a_model_rebuilt_exactly_has_error_zero_and_the_base_itself_has_error_one():
    base = torch.zeros(3, dtype=torch.bfloat16)
    tau = torch.tensor([0.5, -1.0, 2.0])
    theta = base.float() + tau
    norm = tau_l1(tau)
    assert relative_error(error_l1(theta.to(torch.bfloat16), base=base, tau=tau), norm) == 0.0
    assert relative_error(error_l1(base, theta=theta), norm) == pytest.approx(1.0)


def test_a_model_that_did_not_move_from_its_base_has_error_zero_not_a_division_by_zero():
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(1.0, 0.0) == 0.0


def test_the_error_needs_theta_or_the_task_vector():
    with pytest.raises(TypeError):
        error_l1(torch.zeros(2), base=torch.zeros(2))
    with pytest.raises(TypeError):
        tau_l1(theta=torch.zeros(2))
