"""Flow-GRPO (Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL",
arXiv 2505.05470), for flow-matching models (SD3 family), with Flow-GRPO-Fast's SDE window.

Reference implementation: yifan123/flow_grpo@ac4c86e
- the rollout SDE and its log-prob: ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:40-68``
  (``samplers.flow.flow_sde_log_prob``);
- the loss, KL and logged statistics: ``scripts/train_sd3.py:881-911``; trained steps
  ``train_sd3.py:345`` (``int(num_steps * timestep_fraction)``, the first ones, in order);
- CFG at train time: ``train_sd3.py:180-212`` (uncond branch detached);
- advantages: ``flow_grpo/stat_tracking.py:25-31`` (``objectives.grpo.group_advantages``);
- configs: ``config/grpo.py:221-258`` (``general_ocr_sd3_1gpu``) and the 32-GPU ``*_sd3`` configs;
- the SDE window (Flow-GRPO-Fast; index copy @9dcdc35 of a later commit): ``start = randint(lo, hi - w)``,
  steps ``[start, start + w)`` are SDE and trained, the rest are Euler ODE (noise_level 0).

Code -> paper (``/work/shared/reference/online-rl.md`` §0-§1):

    noise_level -> a        g = a sqrt(sigma / (1 - sigma))  (sigma = 1: sigma_1 in the denominator)
    log_prob    -> l^theta_i = mean_D log N(x_{i+1}; mu_i, (g_i sqrt|dt_i|)^2)
    mean        -> mu_i = x_i (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt
    kl_std      -> g_i (the KL is mean_D (mu_theta - mu_ref)^2 / (2 g_i^2), |dt| dropped as coded)
    clip_range  -> eps_c;  beta -> beta (KL weight, 0.04 at 10 steps);  adv_clip -> 5

The loss is ``objectives.grpo.grpo_loss`` per trained step; the loop averages over the batch and
steps. The reference is the same network with the LoRA off; ``needs_reference`` is ``beta > 0``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .base import OBJECTIVES, ObjectiveOutput
from .grpo import GRPO_METRICS, require, sde_step_loss


@OBJECTIVES.register("flow_grpo")
@dataclass(frozen=True)
class FlowGRPO:
    """Flow-GRPO on the Flow-SDE (§1a) for rectified-flow models; optional Fast SDE window."""

    rewards: str = ""
    """Comma-separated reward specs, e.g. ``pickscore=PATH,ocr=`` (as online_dpo)."""
    group_size: int = 8
    """Images per prompt: 8 as the official 1-GPU configs (``*_sd3_1gpu``: 8 prompts x 8 per epoch);
    the 32-GPU configs use 24 (48 groups x 24), the 4-GPU ones 16."""
    sample_steps: int = 10
    """Sampling steps at rollout (official SD3.5: 10 train, 40 eval)."""
    guidance_scale: float = 4.5
    """CFG at rollout (SD3.5: 4.5; the ``*_nocfg`` configs: 1 with ``train_cfg=False``)."""
    noise_level: float = 0.7
    """The SDE's ``a`` (0.7 SD3.5, 0.9 FLUX, 1.2 Qwen-Image)."""
    clip_range: float = 1e-4
    """PPO clip eps_c (1e-4; the Fast CPS configs 1e-5)."""
    beta: float = 0.04
    """KL weight to the reference (0.04 for geneval/ocr SD3.5 at 10 steps; 0.01 pickscore; 0 FLUX)."""
    adv_clip: float = 5.0
    """Advantages are clamped to ±adv_clip (``train.adv_clip_max`` = 5)."""
    global_std: bool = True
    """Advantage std over all rewards of the rollout (True, most configs) or per group."""
    timestep_fraction: float = 0.99
    """Without a window, the first ``int(sample_steps * timestep_fraction)`` steps are trained
    (0.99 -> 9 of 10: never the last, nearly deterministic step, flow_grpo #62)."""
    train_cfg: bool = True
    """Recompute CFG at train time with ``guidance_scale`` (official: the uncond branch detached)."""
    sde_window: int = 0
    """Flow-GRPO-Fast. 0: every step but the last is SDE (the first ``train_steps`` trained);
    w > 0: only the w consecutive steps from a seeded random start in ``[window_lo, window_hi - w]``
    are SDE, all w trained, the rest Euler ODE (official fast configs: 3 in [0, 5))."""
    window_lo: int = 0
    """First step a window may start at (w > 0 only)."""
    window_hi: int = 0
    """End (exclusive) of the range a window lies in; 0 = ``sample_steps - 1`` (w > 0 only)."""
    updates_per_rollout: int = 1
    """Optimizer steps per rollout batch (1 = on-policy, ratio == 1 at every update; the official
    configs make 2 per epoch, ``grad_accum = batches / 2``, flow_grpo #138)."""
    drop_zero_advantage: bool = True
    """Leave the samples of zero-spread groups (all G rewards of a prompt equal, e.g. all 0 or all 1
    under a strict judge, so every advantage is 0) out of the round: the loss is the mean over the
    other samples, and the left-out ones are not trained at all once they make up a quarter of a
    process's round (``train.rollout.zero_advantage_layout``). On as in the official script
    (``train_sd3.py:796-817`` drops the samples with A == 0 on each process, then re-pads each
    process's count to a multiple of its batches with random dropped samples, which it trains);
    False trains every sample (with ``beta > 0`` the dropped samples' KL term goes with them)."""

    detach_uncond: ClassVar[bool] = True
    """Train-time CFG passes no gradient through the unconditional prediction (``train_sd3.py:190``)."""
    kind: ClassVar[str] = "online"
    source: ClassVar[str] = "rollout"
    terms: ClassVar[str] = "sde_steps"
    noises_inputs: ClassVar[bool] = False
    ref_refresh_every: ClassVar[int] = 0
    winner_only: ClassVar[bool] = False
    per_image_captions: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    reports_margin: ClassVar[bool] = False
    logistic_margin: ClassVar[bool] = False
    reported_metrics: ClassVar[frozenset[str]] = GRPO_METRICS

    @property
    def needs_reference(self) -> bool:
        """The reference (LoRA off) forward runs only for the KL term (flow_grpo skips it at beta 0)."""
        return self.beta > 0

    @property
    def window_bounds(self) -> tuple[int, int]:
        """``(lo, hi)``: a window lies in steps ``[lo, hi)`` (``hi`` resolved from 0)."""
        return self.window_lo, self.window_hi or self.sample_steps - 1

    @property
    def train_steps(self) -> int:
        """Steps trained per trajectory: ``sde_window`` when set (``train_sd3_fast.py``), else
        ``int(sample_steps * timestep_fraction)`` (``train_sd3.py:345``)."""
        return self.sde_window or int(self.sample_steps * self.timestep_fraction)

    def sde_step_indices(self, rng: random.Random) -> list[int]:
        """The step indices that run as SDE (and are trained) in one rollout. No window: steps
        ``0 .. sample_steps - 2`` (``rng`` untouched). Window w: ``start = rng.randint(lo, hi - w)``
        (inclusive, as the official ``random.randint``), steps ``start .. start + w - 1``."""
        if not self.sde_window:
            return list(range(self.sample_steps - 1))
        lo, hi = self.window_bounds
        start = rng.randint(lo, hi - self.sde_window)
        return list(range(start, start + self.sde_window))

    def __post_init__(self) -> None:
        n, w = self.sample_steps, self.sde_window
        lo, hi = self.window_bounds
        require(
            (self.group_size >= 2, f"group_size >= 2, got {self.group_size}"),
            (n >= 2, f"sample_steps >= 2 (the last step is ODE), got {n}"),
            (self.guidance_scale >= 1, f"guidance_scale >= 1, got {self.guidance_scale}"),
            (self.noise_level > 0, f"noise_level > 0 (an SDE), got {self.noise_level}"),
            (0 < self.clip_range < 1, f"0 < clip_range < 1, got {self.clip_range}"),
            (self.beta >= 0, f"beta >= 0, got {self.beta}"),
            (self.adv_clip > 0, f"adv_clip > 0, got {self.adv_clip}"),
            (0 < self.timestep_fraction <= 1, f"0 < timestep_fraction <= 1, got {self.timestep_fraction}"),
            (self.updates_per_rollout >= 1, f"updates_per_rollout >= 1, got {self.updates_per_rollout}"),
            (w >= 0, f"sde_window >= 0, got {w}"),
            (
                w > 0 or (self.window_lo == 0 and self.window_hi == 0),
                "window_lo / window_hi only with sde_window > 0",
            ),
            (
                w == 0 or 0 <= lo < hi <= n - 1,
                f"0 <= window_lo < window_hi <= sample_steps - 1, got {lo}, {hi}",
            ),
            (w <= hi - lo, f"sde_window <= window_hi - window_lo, got {w} in [{lo}, {hi})"),
            (
                1 <= self.train_steps <= n - 1,
                f"1 <= int(sample_steps * timestep_fraction) <= sample_steps - 1 (the last step is ODE), "
                f"got {self.train_steps} of {n}",
            ),
        )

    def __call__(
        self, policy: dict[str, Tensor], ref: dict[str, Tensor] | None, batch: dict[str, Any]
    ) -> ObjectiveOutput:
        return sde_step_loss(policy, ref, batch, self.clip_range, self.adv_clip, self.beta)
