"""DCPO: Dual Caption Preference Optimization (Saeidi et al. 2025).

Reference implementation: sahsaeedi/DCPO-T2I@62335bb ``src/dcpo_trainer.py``.

The Diffusion-DPO loss (same beta convention, ``-0.5 * beta``), but the winner and the loser are
each conditioned on their own caption (``caption_0`` / ``caption_1`` columns, swapped together with
the images when ``label_0 == 0``), e.g. the "Pick-Double Caption" data where the loser's caption is
a perturbed paraphrase. The reference script force-sets ``prediction_type="epsilon"`` even on the
v-prediction SD2.1-768; diffalign reads the prediction type from the checkpoint instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from .base import OBJECTIVES, ObjectiveOutput
from .diffusion_dpo import PREFERENCE_METRICS, diffusion_dpo_loss, preference_metrics


@OBJECTIVES.register("dcpo")
@dataclass(frozen=True)
class DCPO:
    """DCPO: Diffusion-DPO with a different caption for the winner and the loser."""

    beta: float = 500.0
    """The reference run's value (SD2.1, ``src/run.sh``)."""
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"

    needs_reference: ClassVar[bool] = True
    kind: ClassVar[str] = "preference"
    source: ClassVar[str] = "dataset"
    terms: ClassVar[str] = "errors"
    noises_inputs: ClassVar[bool] = False
    ref_refresh_every: ClassVar[int] = 0
    winner_only: ClassVar[bool] = False
    per_image_captions: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = False
    reports_margin: ClassVar[bool] = True
    logistic_margin: ClassVar[bool] = True
    """True for ``loss_type="sigmoid"``; ``train.auto_beta_target`` refuses hinge and ipo."""
    reported_metrics: ClassVar[frozenset[str]] = PREFERENCE_METRICS

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    def __call__(self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]) -> ObjectiveOutput:
        assert ref_err is not None
        loss, inside = diffusion_dpo_loss(
            policy_err[:, 0], policy_err[:, 1], ref_err[:, 0], ref_err[:, 1], self.beta, self.loss_type
        )
        return ObjectiveOutput(loss, preference_metrics(policy_err, ref_err, inside, self.beta))
