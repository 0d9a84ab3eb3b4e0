"""Online DPO (flow_grpo ``scripts/train_sd3_dpo.py``, ``config/dpo.py``; yifan123/flow_grpo,
Liu et al. 2025).

Each round the policy generates ``group_size`` images per prompt (``sample_steps`` steps, CFG
``guidance_scale``): flow models with the Flow-GRPO SDE sampler (``noise_level``) as flow_grpo,
DDPM-family models (epsilon / v prediction; our extension, flow_grpo is SD3-only) with DDIM at
``eta`` (1 = ancestral DDPM) on the model's own noise schedule. The reward ensemble (``rewards``,
comma-separated ``name=path`` specs, aggregated by RankDPO's vote) picks the best and the worst,
and the pair trains with the Diffusion-DPO loss on the model's own target (flow: velocity
``noise - x0``; per-sample mean error, shared timestep and noise for the pair, ``-0.5 * beta``
convention; beta 100 as flow_grpo for SD3.5 LoRA; epsilon models need Diffusion-DPO's larger betas).
The reference is a snapshot of the LoRA weights refreshed every ``ref_refresh_every`` steps
(flow_grpo's ``copy_learner_to_ref`` every ``ref_update_step``; 0 keeps the initial weights,
i.e. DPO against the base model). The snapshot is saved in every checkpoint, so a resumed run keeps
the same reference (OneTrainer #1403's pitfall).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .base import OBJECTIVES, ObjectiveOutput
from .diffusion_dpo import PREFERENCE_METRICS, diffusion_dpo_loss, preference_metrics


@OBJECTIVES.register("online_dpo")
@dataclass(frozen=True)
class OnlineDPO:
    """Self-generated best-vs-worst pairs, Diffusion-DPO loss, periodically refreshed reference."""

    rewards: str = ""
    """Comma-separated reward specs, e.g. ``pickscore=PATH,clip_score=PATH``."""
    beta: float = 100.0
    group_size: int = 4
    sample_steps: int = 10
    guidance_scale: float = 4.0
    noise_level: float = 0.7
    """Flow models: the Flow-GRPO SDE's noise scale ``a``."""
    eta: float = 1.0
    """DDPM-family models (epsilon / v prediction) sample with DDIM; 1.0 is ancestral DDPM."""
    ref_refresh_every: int = 0

    needs_reference: ClassVar[bool] = True
    kind: ClassVar[str] = "online"
    source: ClassVar[str] = "rollout"
    terms: ClassVar[str] = "errors"
    noises_inputs: ClassVar[bool] = False
    winner_only: ClassVar[bool] = False
    per_image_captions: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    reports_margin: ClassVar[bool] = True
    logistic_margin: ClassVar[bool] = True
    reported_metrics: ClassVar[frozenset[str]] = PREFERENCE_METRICS

    def __post_init__(self) -> None:
        if (
            self.beta <= 0
            or self.group_size < 2
            or self.sample_steps < 1
            or self.noise_level < 0
            or not 0 <= self.eta <= 1
            or self.ref_refresh_every < 0
        ):
            raise ValueError(
                "need beta > 0, group_size >= 2, sample_steps >= 1, "
                "noise_level >= 0, 0 <= eta <= 1, ref_refresh_every >= 0"
            )

    def __call__(self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]) -> ObjectiveOutput:
        assert ref_err is not None, "online_dpo needs reference errors"
        loss, inside = diffusion_dpo_loss(
            policy_err[:, 0], policy_err[:, 1], ref_err[:, 0], ref_err[:, 1], self.beta
        )
        return ObjectiveOutput(loss, preference_metrics(policy_err, ref_err, inside, self.beta))
