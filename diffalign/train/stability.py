"""Stability toolkit shared by every margin-based objective (Diffusion-DPO family, RankDPO, InPO,
SmPO, MaPO, DCPO, KTO): the failure modes users of the reference code keep reporting
(Salesforce DiffusionDPO #17, diffusers #6565: beta too large/small for the model's error scale,
runaway margins, "both errors rise while accuracy is 1").

- **Auto-beta** (``train.auto_beta_target`` > 0): an adaptive controller in the spirit of PPO's
  adaptive KL coefficient (Ziegler et al. 2019). The *gradient factor* of a logistic preference
  loss is ``sigmoid(-margin)`` per pair: 0.5 at the start, -> 0 once pairs are won by a wide margin
  (updates vanish; beta is too large for the error scale), stuck at 0.5 when beta is too small to
  move the margin. With ``g`` the step's mean factor, a factor below target means margins are
  saturating, so beta is lowered, and raised when above:
  ``beta_scale *= exp(-rate * clip((target - g) / target, -1, 1))``. The live beta is
  ``beta * beta_scale``; the scale is checkpointed, so resumes continue exactly.
- **Margin cap** (``train.margin_cap`` > 0): pairs whose margin already exceeds the cap get zero
  loss weight (no further push), bounding how far the policy can drift on any one pair.
- **Divergence warning**: over a window of steps, if the policy's errors on winners *and* losers
  both rise against the reference while implicit accuracy stays near 1, the model is winning the
  preference by getting worse at denoising everything; a one-line warning is printed and
  ``stability/diverging`` = 1 is logged.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Any

import torch
from torch import Tensor

from diffalign.errors import ConfigError


class AutoBeta:
    def __init__(self, target: float, rate: float = 0.05, lo: float = 1e-3, hi: float = 1e3) -> None:
        if not 0.0 < target < 0.5:
            raise ConfigError(
                f"train.auto_beta_target: must be in (0, 0.5), got {target} (0.5 is the factor at the start)"
            )
        self.target, self.rate, self.lo, self.hi = target, rate, lo, hi
        self.scale = 1.0

    def update(self, g: float) -> float:
        """Feed the step's mean gradient factor (``gradient_factor``); returns the new beta scale."""
        err = max(-1.0, min(1.0, (self.target - g) / self.target))
        self.scale = min(self.hi, max(self.lo, self.scale * math.exp(-self.rate * err)))
        return self.scale


def gradient_factor(margins: Tensor) -> Tensor:
    """Mean ``sigmoid(-margin)``: the weight a logistic preference loss puts on its gradient."""
    return torch.sigmoid(-margins.float()).mean()


def with_beta_scale(objective: Any, base_beta: float, scale: float) -> Any:
    """The objective with ``beta = base_beta * scale`` (objectives are frozen dataclasses)."""
    return dataclasses.replace(objective, beta=base_beta * scale)


def check_supports_beta(objective: Any, name: str) -> float:
    """Auto-beta needs a logistic loss on a beta-scaled margin (DPO family with the sigmoid loss)."""
    if not any(f.name == "beta" for f in dataclasses.fields(objective)):
        raise ConfigError(f"train.auto_beta_target: objective {name!r} has no beta to adapt")
    if (
        not getattr(objective, "logistic_margin", False)
        or getattr(objective, "loss_type", "sigmoid") != "sigmoid"
    ):
        raise ConfigError(
            f"train.auto_beta_target: objective {name!r} has no logistic loss on a beta-scaled margin "
            f"(supported: diffusion_dpo with loss_type=sigmoid, dcpo, inpo, smpo)"
        )
    return float(objective.beta)


def check_reports_margin(objective: Any, name: str) -> None:
    if not getattr(objective, "reports_margin", False):
        raise ConfigError(
            f"train.margin_cap: objective {name!r} reports no per-pair margin "
            f"(supported: diffusion_dpo, dcpo, inpo, smpo, mapo)"
        )


def cap_margins(loss: Tensor, margins: Tensor | None, cap: float) -> Tensor:
    """Zero the loss of pairs whose margin exceeds ``cap`` (per sample, [B])."""
    if cap <= 0:
        return loss
    if margins is None:
        raise ConfigError("train.margin_cap: this objective reports no per-pair margin")
    return loss * (margins.detach() <= cap).to(loss.dtype)


class DivergenceMonitor:
    """Flags "both policy errors rise relative to the reference while accuracy ~ 1"."""

    def __init__(self, window: int = 50, acc_threshold: float = 0.95) -> None:
        self.window, self.acc_threshold = window, acc_threshold
        self.history: deque[tuple[float, float, float]] = deque(maxlen=window)
        self.warned = False

    def update(self, logs: dict[str, float]) -> bool:
        keys = ("err/policy_w", "err/ref_w", "err/policy_l", "err/ref_l", "implicit_acc")
        if self.window <= 1 or not all(k in logs for k in keys):
            return False
        self.history.append(
            (
                logs["err/policy_w"] - logs["err/ref_w"],
                logs["err/policy_l"] - logs["err/ref_l"],
                logs["implicit_acc"],
            )
        )
        if len(self.history) < self.window:
            return False
        h = list(self.history)
        half = self.window // 2
        first, second = h[:half], h[half:]

        def mean(xs: list[tuple[float, float, float]], i: int) -> float:
            return sum(x[i] for x in xs) / len(xs)

        rising = mean(second, 0) > max(mean(first, 0), 0.0) and mean(second, 1) > max(mean(first, 1), 0.0)
        return rising and mean(second, 2) >= self.acc_threshold
