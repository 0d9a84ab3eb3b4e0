"""SPO's step-wise resampler (Liang et al., "Aesthetic Post-Training Diffusion Models from Generic
Preferences with Step-by-step Preference Optimization", CVPR 2025; RockeyCoss/SPO
``spo/custom_diffusers/multi_sample_pipeline.py``).

From one shared ``x_t`` draw k candidates for ``x_{t-1}`` with the stochastic DDIM step (eta = 1),
score them (a step-aware preference model judges each candidate), keep the best and the worst as
a preference pair with their transition log-probs, and continue the trajectory from a candidate
chosen uniformly at random, so sampling stays on-policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import ModelFn, guided, randn_like
from .ddim import NoiseSchedule, ddim_step


@dataclass
class StepwiseOutput:
    best: Tensor
    """x_{t-1} of the best candidate per sample ``[B,...]``."""
    worst: Tensor
    best_log_prob: Tensor
    worst_log_prob: Tensor
    scores: Tensor
    """``[k, B]``."""
    next_x: Tensor
    """The candidate the trajectory continues from (uniformly random)."""
    choice: Tensor
    """Index of that candidate per sample ``[B]``."""


def stepwise_resample(
    model_fn: ModelFn,
    x_t: Tensor,
    t: int,
    t_prev: int,
    cond: Any,
    sched: NoiseSchedule,
    k: int,
    scorer: Callable[[Tensor, int], Tensor],
    guidance_scale: float = 1.0,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
) -> StepwiseOutput:
    """``scorer(candidates [k*B,...], t_prev) -> scores [k*B]`` (higher is better)."""
    B = x_t.shape[0]
    pred = guided(
        model_fn, x_t, torch.tensor(t, device=x_t.device), cond, guidance_scale
    )  # shared by all candidates
    cands, lps = [], []
    for _ in range(k):
        x_prev, lp, _ = ddim_step(pred, x_t, t, t_prev, sched, eta, randn_like(x_t, generator))
        cands.append(x_prev)
        lps.append(lp)
    C = torch.stack(cands)  # [k,B,...]
    LP = torch.stack(lps)  # [k,B]
    scores = scorer(C.flatten(0, 1), t_prev).view(k, B)
    ar = torch.arange(B, device=x_t.device)
    bi, wi = scores.argmax(0), scores.argmin(0)
    choice = torch.randint(0, k, (B,), generator=generator).to(x_t.device)
    return StepwiseOutput(C[bi, ar], C[wi, ar], LP[bi, ar], LP[wi, ar], scores, C[choice, ar], choice)
