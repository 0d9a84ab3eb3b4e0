"""MaPO: Margin-aware Preference Optimization, reference-free (Hong, Paul et al. 2024).

Reference implementation: mapo-t2i/mapo@374b3d3 ``utils.py:286-301`` (``compute_loss``).

Notation (code -> reference code):
    policy_err[:, 0], [:, 1]  ->  model_losses_w, model_losses_l (per-sample means)
    gamma                     ->  snr_value (0.5)
    T                         ->  noise_scheduler.config.num_train_timesteps (1000)
    beta                      ->  beta_mapo (0.1)

    f(e)  = gamma * e / (exp(gamma * e) - 1)              (decreasing in the error e)
    loss  = e_w - beta * logsigmoid(T * (f(e_w) - f(e_l)))

i.e. SFT on the winner plus a margin term; no reference model (half the forwards of DPO).
The reference code reduces with ``model_losses_w.mean() - ratio_losses.mean()``; the per-sample
form here has the same batch mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import OBJECTIVES, POLICY_ERRORS, ObjectiveOutput


def mapo_margin(e: Tensor, gamma: float) -> Tensor:
    """``gamma * e / (exp(gamma * e) - 1)`` (expm1 keeps it accurate for small errors)."""
    x = gamma * e
    return x / torch.expm1(x)


def mapo_loss(
    policy_w: Tensor, policy_l: Tensor, beta: float = 0.1, gamma: float = 0.5, T: float = 1000.0
) -> tuple[Tensor, Tensor]:
    log_odds = mapo_margin(policy_w, gamma) - mapo_margin(policy_l, gamma)
    ratio = F.logsigmoid(T * log_odds)
    return policy_w - beta * ratio, log_odds


@OBJECTIVES.register("mapo")
@dataclass(frozen=True)
class MaPO:
    """MaPO: reference-free margin-aware preference optimization (SFT + odds-ratio margin)."""

    beta: float = 0.1
    gamma: float = 0.5
    num_train_timesteps: float = 1000.0

    needs_reference: ClassVar[bool] = False
    kind: ClassVar[str] = "preference"
    source: ClassVar[str] = "dataset"
    terms: ClassVar[str] = "errors"
    noises_inputs: ClassVar[bool] = False
    ref_refresh_every: ClassVar[int] = 0
    winner_only: ClassVar[bool] = False
    per_image_captions: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    reports_margin: ClassVar[bool] = True
    """``margin`` = the log-odds difference ``f(e_w) - f(e_l)`` (before the ``T`` scale)."""
    logistic_margin: ClassVar[bool] = False
    """The logsigmoid is on ``T * log_odds``, not on a beta-scaled margin (beta weighs the term)."""
    reported_metrics: ClassVar[frozenset[str]] = POLICY_ERRORS | {"implicit_acc", "margin"}

    def __post_init__(self) -> None:
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")

    def __call__(self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]) -> ObjectiveOutput:
        loss, log_odds = mapo_loss(
            policy_err[:, 0], policy_err[:, 1], self.beta, self.gamma, self.num_train_timesteps
        )
        return ObjectiveOutput(
            loss,
            {
                "implicit_acc": (log_odds > 0).float().detach(),
                "margin": log_odds.detach(),
                "err/policy_w": policy_err[:, 0].detach(),
                "err/policy_l": policy_err[:, 1].detach(),
            },
        )
