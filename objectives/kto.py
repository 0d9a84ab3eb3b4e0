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

from .base import OBJECTIVES, ObjectiveOutput


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


@OBJECTIVES.register("kto")
@dataclass(frozen=True)
class DiffusionKTO:
    """Diffusion-KTO: per-image desirable/undesirable labels against a batch KL reference point."""

    beta: float = 1000.0
    lambda_desirable: float = 1.0
    lambda_undesirable: float = 1.0

    needs_reference: ClassVar[bool] = True
    kind: ClassVar[str] = "unpaired"
    winner_only: ClassVar[bool] = False

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
        )
        acc = ((g[:, 0] > g[:, 1:].max(1).values).float() if k > 1 else (g[:, 0] > z).float()).detach()
        return ObjectiveOutput(
            loss.mean(1),
            {
                "implicit_acc": acc,
                "kto/z": z.detach().expand(B),
                "err/policy_w": policy_err[:, 0].detach(),
                "err/ref_w": ref_err[:, 0].detach(),
            },
        )
