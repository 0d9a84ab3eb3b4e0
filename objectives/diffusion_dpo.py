"""Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization",
CVPR 2024).

Reference implementation: SalesforceAIResearch/DiffusionDPO@5233e75 ``train.py:1125-1146``.

Notation (code -> paper):
    policy_err[:, 0], policy_err[:, 1]  ->  ||eps^w - eps_theta(x^w_t, t)||^2, same for l   (mean over C,H,W)
    ref_err[:, 0],    ref_err[:, 1]     ->  ||eps^w - eps_ref(x^w_t, t)||^2,   same for l
    beta                                ->  beta_dpo (the paper's beta * T * omega(lambda_t), folded)

Beta convention (pinned for all of diffalign): the official code's
    inside = -0.5 * beta * ((e_w - e_ref_w) - (e_l - e_ref_l)),   loss = -logsigmoid(inside).
The diffusers SD1.5 script writes ``-logsigmoid(beta' * (ref_diff - model_diff))`` with no 0.5, so
``beta' = beta / 2`` (its default 2500 equals our 5000); its SDXL script uses our convention.
Errors are per-sample *means* (not sums), so beta ~ 2000-5000 for SD/SDXL epsilon models and
~100 for SD3 velocity errors (flow_grpo ``config/dpo.py``).

The logsigmoid is taken per sample before the batch mean (diffusers issue #6702 was the reverse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor

from .base import ERRORS, OBJECTIVES, ObjectiveOutput


def dpo_inside(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """The DPO logit per sample: ``-0.5 * beta * ((e_w - e_ref_w) - (e_l - e_ref_l))``, shape [B].

    Positive means the policy improved the winner more than the loser relative to the reference
    (its sign is the "implicit accuracy")."""
    return -0.5 * beta * ((policy_w - ref_w) - (policy_l - ref_l))


def diffusion_dpo_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    beta: float,
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid",
) -> tuple[Tensor, Tensor]:
    """Per-sample Diffusion-DPO loss [B] and the logit ``inside`` [B].

    ``hinge``: ``relu(1 - inside)``; ``ipo``: ``(d - 1/beta)^2``
    with ``d = (e_ref_w - e_w) - (e_ref_l - e_l)`` (the diffusers SD1.5 variants rewritten in our
    beta convention; its ipo branch reads a non-existent ``args.beta`` and crashes, ours does not)."""
    inside = dpo_inside(policy_w, policy_l, ref_w, ref_l, beta)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        loss = F.relu(1.0 - inside)
    else:
        d = (ref_w - policy_w) - (ref_l - policy_l)
        loss = (d - 1.0 / beta) ** 2
    return loss, inside


PREFERENCE_METRICS = ERRORS | {"implicit_acc", "margin", "rewards/chosen", "rewards/rejected"}
"""The keys ``preference_metrics`` returns."""


def preference_metrics(policy_err: Tensor, ref_err: Tensor, inside: Tensor, beta: float) -> dict[str, Tensor]:
    """The divergence monitor recommended by the reference code: policy vs reference errors,
    implicit accuracy and margin. A policy whose errors on *both* images rise while accuracy sits
    near 1 is diverging (Salesforce issue #17, diffusers #6565)."""
    return {
        "implicit_acc": (inside > 0).float().detach(),
        "margin": inside.detach(),
        "err/policy_w": policy_err[:, 0].detach(),
        "err/policy_l": policy_err[:, 1].detach(),
        "err/ref_w": ref_err[:, 0].detach(),
        "err/ref_l": ref_err[:, 1].detach(),
        # implicit rewards in the TRL/torchtune naming so dashboards transfer
        "rewards/chosen": (-0.5 * beta * (policy_err[:, 0] - ref_err[:, 0])).detach(),
        "rewards/rejected": (-0.5 * beta * (policy_err[:, 1] - ref_err[:, 1])).detach(),
    }


@OBJECTIVES.register("diffusion_dpo")
@dataclass(frozen=True)
class DiffusionDPO:
    """Diffusion-DPO on (winner, loser) pairs sharing noise and timestep."""

    beta: float = 5000.0
    """KL strength, official convention (``-0.5 * beta``). 5000 for SD1.5/SDXL epsilon errors."""
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"

    needs_reference: ClassVar[bool] = True
    kind: ClassVar[str] = "preference"
    source: ClassVar[str] = "dataset"
    terms: ClassVar[str] = "errors"
    noises_inputs: ClassVar[bool] = False
    ref_refresh_every: ClassVar[int] = 0
    winner_only: ClassVar[bool] = False
    per_image_captions: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    reports_margin: ClassVar[bool] = True
    logistic_margin: ClassVar[bool] = True
    """True for ``loss_type="sigmoid"``; ``train.auto_beta_target`` refuses hinge and ipo."""
    reported_metrics: ClassVar[frozenset[str]] = PREFERENCE_METRICS

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    def __call__(self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]) -> ObjectiveOutput:
        assert ref_err is not None, "diffusion_dpo needs reference errors"
        # policy_err, ref_err: [B, 2], winner first
        loss, inside = diffusion_dpo_loss(
            policy_err[:, 0], policy_err[:, 1], ref_err[:, 0], ref_err[:, 1], self.beta, self.loss_type
        )
        return ObjectiveOutput(loss, preference_metrics(policy_err, ref_err, inside, self.beta))
