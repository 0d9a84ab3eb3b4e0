"""Diffusion-KTO (Li et al., "Aligning Diffusion Models by Optimizing Human Utility", NeurIPS 2024).

Reference implementation: jacklishufan/diffusion-kto@226bbd0 ``train_kto_sd_v1.5.py:1446-1510``.

Notation (code -> reference):
    g = ref_err - policy_err      ->  implicit reward  -err_theta + err_ref
    z = clamp(mean(g), min=0)     ->  KL reference point (detached, over the batch)
    h = sigmoid(sign(y) * beta * (g - z)),  loss = lambda_y * (1 - h),  y = +1 desirable / -1 not

On pair data the winner is desirable and the loser undesirable (both images of every pair enter
the batch mean for z), which is how Pick-a-Pic wins/losses become KTO labels; ``batch['labels']``
``[B,k]`` in {0,1} overrides that for unpaired data. Deviation: z is the mean over the
micro-batch on each process (the reference averages over the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import ERRORS, OBJECTIVES, ObjectiveOutput


def kto_loss(
    policy_err: Tensor,
    ref_err: Tensor,
    labels: Tensor,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image loss, implicit reward g and reference point z for errors/labels of any shape."""
    g = ref_err - policy_err
    z = g.detach().mean().clamp(min=0)
    sign = labels * 2 - 1
    h = torch.sigmoid(sign * beta * (g - z))
    lam = torch.where(labels > 0.5, torch.full_like(g, lambda_d), torch.full_like(g, lambda_u))
    return lam * (1 - h), g, z


def kto_metrics(
    policy_err: Tensor, ref_err: Tensor, labels: Tensor, g: Tensor, z: Tensor, beta: float
) -> dict:
    """Comparable metrics for ``[B, k]`` errors and labels (1 desirable, 0 undesirable).

    ``margin [B]`` = ``beta * (mean g over the group's desirable images - mean g over its
    undesirable ones)``: on pairs, the winner's implicit reward minus the loser's, times beta (the
    analogue of Diffusion-DPO's logit, without its 0.5). A group with one class only compares it
    with the reference point z instead. ``implicit_acc [B]``: every desirable image's reward is above
    every undesirable one's (z stands in for a missing class). The errors are batch means over the
    desirable (``_w``) and undesirable (``_l``) images (scalars)."""
    d = labels > 0.5  # [B,k]
    u = ~d
    nd, nu = d.sum(1), u.sum(1)  # [B]
    zb = z.expand(g.shape[0])
    mean_d = torch.where(nd > 0, (g * d).sum(1) / nd.clamp_min(1), zb)  # [B]
    mean_u = torch.where(nu > 0, (g * u).sum(1) / nu.clamp_min(1), zb)
    lo_d = torch.where(nd > 0, g.masked_fill(u, float("inf")).min(1).values, zb)
    hi_u = torch.where(nu > 0, g.masked_fill(d, float("-inf")).max(1).values, zb)

    def masked_mean(e: Tensor, m: Tensor) -> Tensor:
        return (e * m).sum() / m.sum().clamp_min(1)

    return {
        "implicit_acc": (lo_d > hi_u).float().detach(),
        "margin": (beta * (mean_d - mean_u)).detach(),
        "kto/z": z.detach().expand(g.shape[0]),
        "err/policy_w": masked_mean(policy_err, d).detach(),
        "err/policy_l": masked_mean(policy_err, u).detach(),
        "err/ref_w": masked_mean(ref_err, d).detach(),
        "err/ref_l": masked_mean(ref_err, u).detach(),
    }


@OBJECTIVES.register("kto")
@dataclass(frozen=True)
class DiffusionKTO:
    """Diffusion-KTO: per-image desirable/undesirable labels against a batch KL reference point."""

    beta: float = 1000.0
    lambda_desirable: float = 1.0
    lambda_undesirable: float = 1.0

    needs_reference: ClassVar[bool] = True
    kind: ClassVar[str] = "unpaired"
    source: ClassVar[str] = "dataset"
    terms: ClassVar[str] = "errors"
    noises_inputs: ClassVar[bool] = False
    ref_refresh_every: ClassVar[int] = 0
    winner_only: ClassVar[bool] = False
    per_image_captions: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    reports_margin: ClassVar[bool] = True
    """See ``kto_metrics``: ``train.margin_cap`` zeroes groups whose margin exceeds the cap."""
    logistic_margin: ClassVar[bool] = False
    """The loss is ``lambda * (1 - sigmoid(...))`` against z, not ``-logsigmoid(margin)``: no auto-beta."""
    reported_metrics: ClassVar[frozenset[str]] = ERRORS | {"implicit_acc", "margin", "kto/z"}

    def __post_init__(self) -> None:
        if self.beta <= 0 or self.lambda_desirable < 0 or self.lambda_undesirable < 0:
            raise ValueError("need beta > 0, lambda_desirable >= 0, lambda_undesirable >= 0")

    def __call__(self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]) -> ObjectiveOutput:
        assert ref_err is not None
        B, k = policy_err.shape
        labels = batch.get("labels")
        if labels is None:  # pairs: winner desirable, the rest undesirable
            labels = torch.zeros(B, k, device=policy_err.device)
            labels[:, 0] = 1.0
        labels = torch.as_tensor(labels, dtype=policy_err.dtype, device=policy_err.device).view(B, k)
        loss, g, z = kto_loss(
            policy_err, ref_err, labels, self.beta, self.lambda_desirable, self.lambda_undesirable
        )  # loss, g: [B,k]; z: scalar
        return ObjectiveOutput(loss.mean(1), kto_metrics(policy_err, ref_err, labels, g, z, self.beta))
