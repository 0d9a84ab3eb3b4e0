"""SmPO-Diffusion (Lu et al., "Smoothed Preference Optimization via ReNoise Inversion for Aligning
Diffusion Models with Varied Human Preferences", ICML 2025).

Reference implementation: JaydenLyh/SmPO@8922d54 -- ``train.py:738-747`` (smoothed labels),
``train.py:1000-1024`` (ReNoise inversion), ``train.py:1061`` (loss).

Two changes to Diffusion-DPO:
1. **Smoothed preference.** Each pair carries reward scores (PickScore raw cosine offline,
   ``preprocessing.py``). With ``s~ = (s - min) / (max - min)`` and the hard-coded
   ``min = 0.11543526500463486, max = 0.28201571106910706``,
   ``p = exp(s~_w) / (exp(s~_w) + exp(s~_l)) = sigmoid((s_w - s_l) / score_range)`` and the
   per-pair beta is ``beta * smooth_scale * (2p - 1)`` (``smooth_scale = 10``), so near-ties barely
   count and clear pairs count up to ~4.6 beta.
2. **ReNoise inversion** (one ReNoise refinement, no eta noise) instead of random noising; the
   implied noise is the target (as InPO). The ``DDIMInverseScheduler`` grid has 5 steps for SD1.5
   and 10 for SDXL (``train.py:881`` ``set_timesteps(5)``, ``train.py:872`` ``set_timesteps(10)``
   under ``--sdxl``); ``inversion_steps`` defaults to the SD1.5 value, ``configs/sdxl_smpo_full.yaml``
   sets 10.

Code -> paper: ``p`` -> the smoothed preference probability; ``score_range`` -> max - min of the
reward normalisation (raw-cosine units; with diffalign's ``pickscore`` (``logit_scale * cos``,
logit scale 100) use ``score_range=16.658``).

Ordering: the official data loader puts the *PickScore* winner first, whatever the human label
said. Here the pair keeps the dataset's order and the weight ``2p - 1`` turns negative when the
scores disagree with it, which is the same loss (``-logsigmoid(-w x) `` with the roles swapped).
Deviation: the official code reads ``probs[0]`` (batch size 1); here each pair uses its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import OBJECTIVES, ObjectiveOutput
from .diffusion_dpo import PREFERENCE_METRICS, dpo_inside, preference_metrics
from .inpo import inversion_inputs

SCORE_RANGE = 0.28201571106910706 - 0.11543526500463486


def smoothed_weight(
    score_w: Tensor, score_l: Tensor, score_range: float = SCORE_RANGE, smooth_scale: float = 10.0
) -> Tensor:
    """``smooth_scale * (2p - 1)`` with ``p = sigmoid((s_w - s_l) / score_range)``, shape [B]."""
    p = torch.sigmoid((score_w.double() - score_l.double()) / score_range)
    return (smooth_scale * (2 * p - 1)).float()


def smpo_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    score_w: Tensor,
    score_l: Tensor,
    beta: float,
    score_range: float = SCORE_RANGE,
    smooth_scale: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """Per-sample SmPO loss [B] and its logit: ``-logsigmoid(w * inside_DPO)``."""
    inside = smoothed_weight(score_w, score_l, score_range, smooth_scale).to(policy_w) * dpo_inside(
        policy_w, policy_l, ref_w, ref_l, beta
    )
    return -F.logsigmoid(inside), inside


@OBJECTIVES.register("smpo")
@dataclass(frozen=True)
class SmPO:
    """SmPO: reward-smoothed Diffusion-DPO on ReNoise-inverted latents. Needs ``data.score_column``."""

    beta: float = 2000.0
    """Official convention (``-0.5 * beta``): 2000 SD1.5 (SFT init), 5000 SDXL."""
    score_range: float = SCORE_RANGE
    smooth_scale: float = 10.0
    inversion_steps: int = 5
    """The official SD1.5 grid (``train.py:881``); the official SDXL run uses 10 (``train.py:872``)."""
    renoise_steps: int = 1

    needs_reference: ClassVar[bool] = True
    kind: ClassVar[str] = "preference"
    source: ClassVar[str] = "dataset"
    terms: ClassVar[str] = "errors"
    noises_inputs: ClassVar[bool] = True
    ref_refresh_every: ClassVar[int] = 0
    winner_only: ClassVar[bool] = False
    per_image_captions: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = True
    reports_margin: ClassVar[bool] = True
    logistic_margin: ClassVar[bool] = True
    reported_metrics: ClassVar[frozenset[str]] = PREFERENCE_METRICS | {"smooth_weight"}

    def __post_init__(self) -> None:
        if self.beta <= 0 or self.score_range <= 0 or self.inversion_steps < 1 or self.renoise_steps < 0:
            raise ValueError("need beta > 0, score_range > 0, inversion_steps >= 1, renoise_steps >= 0")

    def noised_inputs(
        self,
        adapter: Any,
        model: torch.nn.Module,
        x0: Tensor,
        cond: dict[str, Tensor],
        micro: Tensor | None,
        seeds: list[int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        return inversion_inputs(
            adapter, model, x0, cond, micro, seeds, self.inversion_steps, self.renoise_steps, 0.0
        )

    def __call__(self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]) -> ObjectiveOutput:
        assert ref_err is not None, "smpo needs reference errors"
        scores = batch["scores"].to(policy_err.device)  # [B, 2], winner first
        if self.score_range == SCORE_RANGE and float(scores.abs().max()) > 1.5:
            from diffalign.errors import ConfigError

            raise ConfigError(
                "smpo: the scores look like logit_scale * cos (|s| > 1.5) but objective.score_range is the "
                "raw-cosine default 0.1666; set objective.score_range (16.658 for PickScore x100)"
            )
        loss, inside = smpo_loss(
            policy_err[:, 0],
            policy_err[:, 1],
            ref_err[:, 0],
            ref_err[:, 1],
            scores[:, 0],
            scores[:, 1],
            self.beta,
            self.score_range,
            self.smooth_scale,
        )
        m = preference_metrics(policy_err, ref_err, inside, self.beta)
        m["smooth_weight"] = smoothed_weight(
            scores[:, 0], scores[:, 1], self.score_range, self.smooth_scale
        ).detach()
        return ObjectiveOutput(loss, m)
