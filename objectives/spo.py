"""SPO: Step-aware Preference Optimization (Liang et al., "Aesthetic Post-Training Diffusion Models
from Generic Preferences with Step-by-step Preference Optimization", CVPR 2025).

Reference implementation: RockeyCoss/SPO@27a8642 ``spo_training_and_inference/train_scripts/
train_spo.py:584-586`` (loss), ``spo/custom_diffusers/multi_sample_pipeline.py`` (sampling),
``spo/preference_models/compare_funcs.py`` (pair selection).

Online: for each prompt, sample with DDIM (``sample_steps`` = 20, eta = 1, CFG ``guidance_scale``);
after ``divert_start_step`` steps, at every step draw ``samples_per_step`` candidates for x_{t-1}
from the shared x_t (``samplers.stepwise_resample``), score each candidate's predicted x0 with the
step-aware preference model (``rewards.step_aware``) at its timestep, keep (best, worst) when
``softmax([s_best, s_worst])`` differs by more than ``threshold``, continue from a random
candidate. With ``num_inner_step`` = n > 0 (official SDXL: 3) the candidates first run n more steps
each and are judged at the end of that segment; all n + 1 transitions become pairs with its label.
Training (``diffalign.train.spo_rollout``, through the one loop): with ``logp`` the DDIM transition log-prob
(mean over C,H,W) under the CFG-combined prediction,

    r_w = clamp(exp(logp_theta(w) - logp_ref(w)), 1 - clip_eps, 1 + clip_eps)    (same for l)
    loss = -log sigmoid(beta * log r_w - beta * log r_l)

Code -> paper: ``policy_err`` / ``ref_err`` hold the transition log-probs ``[B, 2]`` (winner
first) for this objective; ``beta`` = beta (10), ``clip_eps`` = the trust-region eps (0.1). The clamp
zeroes the gradient once a ratio leaves [1 - eps, 1 + eps] (as in the reference). Reference: the
model before LoRA (LoRA-off), as the official ``deepcopy`` taken before adding LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import OBJECTIVES, ObjectiveOutput


def spo_loss(
    logp_w: Tensor, logp_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, clip_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample SPO loss [B] and the clipped ratios (r_w, r_l)."""
    r_w = torch.clamp(torch.exp(logp_w - ref_w), 1 - clip_eps, 1 + clip_eps)
    r_l = torch.clamp(torch.exp(logp_l - ref_l), 1 - clip_eps, 1 + clip_eps)
    return -F.logsigmoid(beta * torch.log(r_w) - beta * torch.log(r_l)), r_w, r_l


@OBJECTIVES.register("spo")
@dataclass(frozen=True)
class SPO:
    """Online step-aware preference optimization on DDIM transitions (epsilon models, LoRA)."""

    spm: str = ""
    """Step-aware preference model folder (``diffalign train-spm``) or a CLIP checkpoint."""
    beta: float = 10.0
    clip_eps: float = 0.1
    samples_per_step: int = 4
    threshold: float = 0.3
    """0.3 for SD1.5, 0.4 for SDXL."""
    sample_steps: int = 20
    divert_start_step: int = 4
    guidance_scale: float = 5.0
    eta: float = 1.0
    num_inner_step: int = 0
    """Official ``config.sample.num_inner_step`` (0 for SD1.5, 3 for SDXL): after each branch the k
    candidates each run this many more stochastic DDIM steps on their own before they are judged,
    and every transition of the segment (the branch step and the inner steps) becomes a pair with the
    segment's label (``multi_sample_pipeline_sdxl.py``). 0: judge right after the branch step."""

    needs_reference: ClassVar[bool] = True
    kind: ClassVar[str] = "online"
    source: ClassVar[str] = "rollout"
    terms: ClassVar[str] = "transition_log_probs"
    noises_inputs: ClassVar[bool] = False
    ref_refresh_every: ClassVar[int] = 0
    winner_only: ClassVar[bool] = False
    per_image_captions: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    reports_margin: ClassVar[bool] = True
    """``margin = beta * (log r_w - log r_l)``, the clipped log-ratio difference."""
    logistic_margin: ClassVar[bool] = True
    reported_metrics: ClassVar[frozenset[str]] = frozenset(
        {"implicit_acc", "margin", "ratio_win", "ratio_lose"}
    )
    """``policy_err`` / ``ref_err`` hold transition log-probs here, so there are no error metrics."""

    def __post_init__(self) -> None:
        if self.beta <= 0 or not 0 < self.clip_eps < 1 or self.samples_per_step < 2 or self.eta <= 0:
            raise ValueError("need beta > 0, 0 < clip_eps < 1, samples_per_step >= 2, eta > 0")
        if self.num_inner_step < 0:
            raise ValueError(f"num_inner_step must be >= 0, got {self.num_inner_step}")
        if not 0 <= self.divert_start_step < self.sample_steps:
            raise ValueError("need 0 <= divert_start_step < sample_steps")

    def __call__(self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]) -> ObjectiveOutput:
        assert ref_err is not None, "spo needs reference log-probs"
        loss, r_w, r_l = spo_loss(
            policy_err[:, 0], policy_err[:, 1], ref_err[:, 0], ref_err[:, 1], self.beta, self.clip_eps
        )
        return ObjectiveOutput(
            loss,
            {
                "ratio_win": r_w.detach(),
                "ratio_lose": r_l.detach(),
                "implicit_acc": (r_w > r_l).float().detach(),
                "margin": (self.beta * (torch.log(r_w) - torch.log(r_l))).detach(),
            },
        )
