"""The calibration module: a small learned correction of an extended layer's router probabilities (§2.5).

Adding a softmax term can only shrink every old expert's probability (Eq. 9). The calibration s_c corrects
the probability vector p (width m + n) after top-k selection and before the kept weights are gathered. Every
form starts as the identity, so calibration alone changes nothing at step 0:

============================  ==================================  =====================================
form                          p′ =                                init
============================  ==================================  =====================================
``additive_mlp`` (default)    p + W_out·GELU(W_in·p)              W_in ~ N(0, σ), W_out = 0   (code; Table 5 Type2 a)
``multiplicative_mlp``        p ∘ (1 + W_out·GELU(W_in·p))        W_in ~ N(0, σ), W_out = 0   (Eq. 10's form)
``additive_vector``           p + b                               b = 0                        (Table 5 Type1 a)
``multiplicative_vector``     p ∘ s                               s = 1                        (Table 5 Type1 b)
``none``                      p
============================  ==================================  =====================================

The MLP's input is the probability vector, not the hidden state (the code's ``WeightScale``; Eq. 10 leaves the
input unnamed). Table 5 initialised the multiplicative MLP with two normal layers and it exploded; mmer zeroes
its output layer instead so that it starts as the identity like the others.
"""

from __future__ import annotations

import torch
from torch import nn


class Calibration(nn.Module):
    """One extended layer's calibration, of one of the forms above, computed in float32."""

    def __init__(self, form: str, width: int, hidden: int = 16, init_std: float = 0.02) -> None:
        super().__init__()
        self.form = form
        self.width = width
        if form in ("additive_mlp", "multiplicative_mlp"):
            self.mlp = nn.Sequential(
                nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, width, bias=False)
            )
        elif form == "additive_vector":
            self.bias = nn.Parameter(torch.zeros(width))
        elif form == "multiplicative_vector":
            self.scale = nn.Parameter(torch.ones(width))
        elif form != "none":
            raise ValueError(f"unknown calibration form {form!r}")
        self._init_std = init_std

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The identity-at-start initialisation of the table above (first MLP layer normal, output zero)."""
        with torch.no_grad():
            if self.form in ("additive_mlp", "multiplicative_mlp"):
                first, last = self.mlp[0].weight, self.mlp[2].weight
                noise = torch.randn(first.shape, generator=generator, dtype=torch.float32) * self._init_std
                first.copy_(noise.to(first.dtype))
                last.zero_()
            elif self.form == "additive_vector":
                self.bias.zero_()
            elif self.form == "multiplicative_vector":
                self.scale.fill_(1.0)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """p′ from p ([tokens, width], float32)."""
        if self.form == "additive_mlp":
            return probs + self.mlp(probs.to(self.mlp[0].weight.dtype)).float()
        if self.form == "multiplicative_mlp":
            return probs * (1.0 + self.mlp(probs.to(self.mlp[0].weight.dtype)).float())
        if self.form == "additive_vector":
            return probs + self.bias.float()
        if self.form == "multiplicative_vector":
            return probs * self.scale.float()
        return probs


def calibration_parameter_count(form: str, width: int, hidden: int) -> int:
    """Trainable parameters of one layer's calibration (code's 9-wide, 16-hidden MLP: 288)."""
    if form in ("additive_mlp", "multiplicative_mlp"):
        return 2 * width * hidden
    if form in ("additive_vector", "multiplicative_vector"):
        return width
    return 0
