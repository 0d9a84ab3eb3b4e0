"""Stability toolkit for the margin-based objectives: the failure modes users of the reference
code keep reporting (Salesforce DiffusionDPO #17, diffusers #6565: beta too large/small for the
model's error scale, runaway margins, "both errors rise while accuracy is 1").

Which objective gets what is declared on the objective (``objectives.base.Objective``), never
guessed: ``logistic_margin`` (auto-beta), ``reports_margin`` (margin cap), ``reported_metrics``
(the divergence monitor needs ``implicit_acc`` and ``err/{policy,ref}_{w,l}``). Offline today:

=============================  =========  ==========  ==================
objective                      auto-beta  margin cap  divergence monitor
=============================  =========  ==========  ==================
diffusion_dpo, dcpo (sigmoid)  yes        yes         yes
inpo, smpo                     yes        yes         yes
rankdpo                        yes        yes         yes
kto                            no         yes         yes
mapo                           no         yes         no (no reference)
sft                            no         no          no (no reference)
=============================  =========  ==========  ==================

(``spo`` and ``online_dpo`` run in the online loop, which refuses auto-beta and the margin cap.)

- **Auto-beta** (``train.auto_beta_target`` > 0): an adaptive controller in the spirit of PPO's
  adaptive KL coefficient (Ziegler et al. 2019). The *gradient factor* of a logistic preference
  loss is ``sigmoid(-margin)`` per pair: 0.5 at the start, -> 0 once pairs are won by a wide margin
  (updates vanish; beta is too large for the error scale), stuck at 0.5 when beta is too small to
  move the margin. With ``g`` the step's mean factor, a factor below target means margins are
  saturating, so beta is lowered, and raised when above:
  ``beta_scale *= exp(-rate * clip((target - g) / target, -1, 1))``. The live beta is
  ``beta * beta_scale``; the scale is checkpointed, so resumes continue exactly.
- **Margin cap** (``train.margin_cap`` > 0): samples (pairs; whole ranked sets for RankDPO; groups
  for KTO) whose margin already exceeds the cap get zero loss weight (no further push), bounding how
  far the policy can drift on any one of them.
- **Divergence warning** (``DivergenceMonitor``): the policy's errors on winners *and* losers rise
  against the reference, either while implicit accuracy stays near 1 (winning the preference by
  getting worse at denoising everything) or far beyond the reference's error level whatever the
  accuracy (a blow-up); a one-line warning is printed once and ``stability/diverging`` = 1 is logged.
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


def _supporting(flag: str) -> str:
    """The registered offline objectives whose ``flag`` ClassVar is True, for error messages."""
    from diffalign.objectives import OBJECTIVES

    return ", ".join(
        n
        for n in OBJECTIVES.names()
        if getattr(OBJECTIVES.get(n), flag) and OBJECTIVES.get(n).kind != "online"
    )


def check_supports_beta(objective: Any, name: str) -> float:
    """Auto-beta needs a logistic loss on a beta-scaled margin (``logistic_margin``; DPO family with
    the sigmoid loss, RankDPO)."""
    params = {f.name: getattr(objective, f.name) for f in dataclasses.fields(objective)}
    if "beta" not in params:
        raise ConfigError(f"train.auto_beta_target: objective {name!r} has no beta to adapt")
    if not type(objective).logistic_margin or params.get("loss_type", "sigmoid") != "sigmoid":
        raise ConfigError(
            f"train.auto_beta_target: objective {name!r} has no logistic loss on a beta-scaled margin "
            f"(supported: {_supporting('logistic_margin')}, with loss_type=sigmoid where it has one)"
        )
    return float(params["beta"])


def check_reports_margin(objective: Any, name: str) -> None:
    if not type(objective).reports_margin:
        raise ConfigError(
            f"train.margin_cap: objective {name!r} reports no per-pair margin "
            f"(supported: {_supporting('reports_margin')})"
        )


def cap_margins(loss: Tensor, margins: Tensor | None, cap: float) -> Tensor:
    """Zero the loss of pairs whose margin exceeds ``cap`` (per sample, [B])."""
    if cap <= 0:
        return loss
    if margins is None:
        raise ConfigError("train.margin_cap: this objective reports no per-pair margin")
    return loss * (margins.detach() <= cap).to(loss.dtype)


class DivergenceMonitor:
    """Flags a policy that gets worse at denoising relative to the reference, by two rules over a
    window of steps (first half vs second half of the policy-minus-reference error gaps
    ``d_w = err/policy_w - err/ref_w`` and ``d_l = err/policy_l - err/ref_l``):

    1. *winning by degrading*: both gaps rise above their early level (and above 0) while implicit
       accuracy stays >= ``acc_threshold`` (Salesforce DiffusionDPO #17);
    2. *blow-up*: both gaps rise by more than ``rise_threshold`` times the reference's own error level
       (mean of ``err/ref_w`` and ``err/ref_l`` over the window), whatever the accuracy. Scale-free,
       so one threshold holds for epsilon, v and velocity errors; a healthy run moves the gaps by a
       few percent of the reference error, a diverging one (lr 0.3 on the toy model: +1.7 with
       accuracy at 0.5) by far more.

    Needs the four error metrics and ``implicit_acc`` (objectives without a reference report no
    reference errors and are not monitored)."""

    KEYS = ("err/policy_w", "err/ref_w", "err/policy_l", "err/ref_l", "implicit_acc")

    def __init__(self, window: int = 50, acc_threshold: float = 0.95, rise_threshold: float = 0.5) -> None:
        self.window, self.acc_threshold, self.rise_threshold = window, acc_threshold, rise_threshold
        self.history: deque[tuple[float, float, float, float]] = deque(maxlen=window)
        self.warned = False
        self.reason = ""
        """Which rule fired last ("" when none)."""

    def update(self, logs: dict[str, float]) -> bool:
        if self.window <= 1 or not all(k in logs for k in self.KEYS):
            return False
        self.history.append(
            (
                logs["err/policy_w"] - logs["err/ref_w"],
                logs["err/policy_l"] - logs["err/ref_l"],
                logs["implicit_acc"],
                0.5 * (abs(logs["err/ref_w"]) + abs(logs["err/ref_l"])),
            )
        )
        self.reason = ""
        if len(self.history) < self.window:
            return False
        h = list(self.history)
        half = self.window // 2
        first, second = h[:half], h[half:]

        def mean(xs: list[tuple[float, float, float, float]], i: int) -> float:
            return sum(x[i] for x in xs) / len(xs)

        rise_w, rise_l = mean(second, 0) - mean(first, 0), mean(second, 1) - mean(first, 1)
        rising = mean(second, 0) > max(mean(first, 0), 0.0) and mean(second, 1) > max(mean(first, 1), 0.0)
        if rising and mean(second, 2) >= self.acc_threshold:
            self.reason = "winning by degrading"
        elif min(rise_w, rise_l) > self.rise_threshold * mean(h, 3):
            self.reason = "blow-up"
        return bool(self.reason)

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed run warns exactly when an uninterrupted one would."""
        return {"history": [list(h) for h in self.history], "warned": self.warned}

    def restore(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(tuple(h) for h in state.get("history", []))
        self.warned = bool(state.get("warned", False))

    def warning(self, step: int) -> str:
        """The one-line warning for the rule that fired at ``step``."""
        if self.reason == "blow-up":
            what = (
                f"rose by more than {self.rise_threshold:g}x the reference error level over the last "
                f"{self.window} steps"
            )
        else:
            what = "both rise against the reference while implicit accuracy is ~1"
        return (
            f"warning: step {step}: policy errors on winners and losers {what} (diverging); "
            f"lower train.lr, raise beta or set train.auto_beta_target"
        )
