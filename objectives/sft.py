"""Diffusion-SFT: the supervised baseline of Diffusion-DPO (denoising loss on the preferred image).

Reference implementation: SalesforceAIResearch/DiffusionDPO@5233e75 ``train.py:1119-1120`` (``--sft``):
plain MSE to the target on the winner only, ties dropped, no reference model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .base import OBJECTIVES, ObjectiveOutput


def sft_loss(policy_w: Tensor) -> Tensor:
    """Per-sample loss [B]: the winner's denoising error itself."""
    return policy_w


@OBJECTIVES.register("sft")
@dataclass(frozen=True)
class SFT:
    """Supervised fine-tuning on the preferred image of each pair."""

    needs_reference: ClassVar[bool] = False
    kind: ClassVar[str] = "supervised"
    source: ClassVar[str] = "dataset"
    terms: ClassVar[str] = "errors"
    noises_inputs: ClassVar[bool] = False
    ref_refresh_every: ClassVar[int] = 0
    winner_only: ClassVar[bool] = True
    per_image_captions: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    reports_margin: ClassVar[bool] = False
    logistic_margin: ClassVar[bool] = False
    reported_metrics: ClassVar[frozenset[str]] = frozenset({"err/policy_w"})
    """Only the winner is forwarded: no loser, no reference, no preference to be accurate about."""

    def __call__(self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]) -> ObjectiveOutput:
        # policy_err: [B, 1] (winner only)
        loss = sft_loss(policy_err[:, 0])
        return ObjectiveOutput(loss, {"err/policy_w": policy_err[:, 0].detach()})
