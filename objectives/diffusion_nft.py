"""DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
NVIDIA 2025), for flow-matching models (SD3 family).

Reference implementation: NVlabs/DiffusionNFT@24af555 ``scripts/train_nft_sd3.py``
- the optimality r: ``L910-929`` (``r = clamp(clip(A, ±5) / 5 / 2 + 0.5, 0, 1)``);
- the forward process: ``L810-816`` (a per-sample permutation of the grid, the first
  ``int(num_steps * timestep_fraction)`` entries trained), ``L864-870`` (``x_t = (1 - t) x0 + t eps``);
- the loss as coded: ``L934-970`` (x0-space, adaptive weights, the factor ``adv_clip_max``, KL);
- the old-policy update: ``return_decay`` ``L169-189`` and ``L1034-1039``;
- configs: ``config/nft.py:11-67``, ``config/base.py`` (``train.beta = 1e-4``, ``timestep_fraction 0.99``).

Rollout (the source's job): the ``old`` policy samples deterministically (DPM-Solver-2, 10 steps,
CFG 1) and only the clean ``x0`` is kept: no trajectory, no log-probs. Each trained point draws
fresh noise at a grid sigma; the policy, the old policy and (kl_beta > 0) the reference give
velocities there.

Code -> paper (``/work/shared/reference/online-rl.md`` §4):

    v_theta, v_old, v_ref -> v_theta(x_t, t), v_old (the "old" adapter), v_ref (LoRA off)
    sigma                 -> t (= timestep / 1000, a grid sigma)
    r                     -> the optimality probability r in [0, 1] (``nft_optimality``)
    beta                  -> beta, the implicit-policy MIXING coefficient:
                               v+ = beta v_theta + (1 - beta) v_old,  v- = (1 + beta) v_old - beta v_theta
    kl_beta               -> the KL weight (the official ``config.train.beta``)
    adv_clip              -> the loss factor 5 (the official ``config.train.adv_clip_max``)

    x0+- = x_t - t v+-,   w+- = sg(max(mean_D |x0+- - x0|, 1e-5))
    loss_b = adv_clip * (r mean_D (x0+ - x0)^2 / w+ + (1 - r) mean_D (x0- - x0)^2 / w-) / beta
             + kl_beta * mean_D (v_theta - v_ref)^2

!! ``beta`` here is NFT's mixing beta (official ``config.beta``: 1.0, 0.1 for OCR / multi-reward),
!! NOT a KL weight; the KL weight is ``kl_beta`` (official ``config.train.beta`` = 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .base import OBJECTIVES, ObjectiveOutput
from .grpo import require

NFT_METRICS = frozenset({"policy_loss", "unweighted_policy_loss", "kl", "old_deviate", "optimality"})
"""The per-sample ``[B]`` keys ``nft_loss`` returns."""

DECAY_TYPES: dict[str, int] = {"none": 0, "linear": 1}
"""``DiffusionNFT.old_decay`` -> the official ``decay_type``."""


def nft_optimality(advantage: Tensor, adv_clip: float = 5.0) -> Tensor:
    """``r = clamp(clip(A, ±adv_clip) / adv_clip / 2 + 0.5, 0, 1)`` ``[B]``: 0.5 at A = 0, 1 at
    A >= adv_clip, 0 at A <= -adv_clip (``train_nft_sd3.py:910-929``, adv_mode "all")."""
    a = advantage.clamp(-adv_clip, adv_clip)
    return (a / adv_clip / 2.0 + 0.5).clamp(0, 1)


def _mean_d(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)  # [B,...] -> [B]


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    x_t: Tensor,
    sigma: Tensor,
    r: Tensor,
    beta: float,
    v_ref: Tensor | None = None,
    kl_beta: float = 0.0,
    adv_clip: float = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample DiffusionNFT loss ``[B]`` as officially coded (x0-space, adaptive weights).

    ``v_theta`` ``[B,...]`` (with gradient), ``v_old`` (detached here), ``x0`` the clean rollout
    latents, ``x_t = (1 - sigma) x0 + sigma eps``, ``sigma`` ``[B]``, ``r`` ``[B]`` in [0, 1],
    ``beta`` the mixing coefficient (> 0), ``v_ref`` the reference's velocity (detached; required
    when ``kl_beta > 0``), ``adv_clip`` the official loss factor (``adv_clip_max`` = 5). The weights
    ``w+-`` are computed in fp64 without gradient (as the reference) and cast to ``v_theta``'s dtype.

    Metrics (per sample, detached): ``policy_loss`` (the first term), ``unweighted_policy_loss``
    (it without the factor ``adv_clip``), ``kl`` = mean_D (v_theta - v_ref)^2 (zeros without
    ``v_ref``), ``old_deviate`` = mean_D (v_theta - v_old)^2, ``optimality`` = r."""
    v_old = v_old.detach()
    t = sigma.reshape(-1, *[1] * (x0.ndim - 1)).to(v_theta.dtype)  # [B, 1, ...]
    v_pos = beta * v_theta + (1 - beta) * v_old  # [B,...]
    v_neg = (1.0 + beta) * v_old - beta * v_theta  # [B,...]
    x0_pos = x_t - t * v_pos
    x0_neg = x_t - t * v_neg
    with torch.no_grad():
        w_pos = _mean_d((x0_pos.double() - x0.double()).abs()).clamp(min=1e-5)  # [B]
        w_neg = _mean_d((x0_neg.double() - x0.double()).abs()).clamp(min=1e-5)  # [B]
    pos = _mean_d((x0_pos - x0) ** 2) / w_pos.to(v_theta.dtype)  # [B]
    neg = _mean_d((x0_neg - x0) ** 2) / w_neg.to(v_theta.dtype)  # [B]
    r = r.detach().to(v_theta.dtype)
    unweighted = r * pos / beta + (1.0 - r) * neg / beta  # [B]
    policy_loss = unweighted * adv_clip
    kl = torch.zeros_like(policy_loss)
    if v_ref is not None:
        kl = _mean_d((v_theta - v_ref.detach()) ** 2)  # [B]
    elif kl_beta > 0:
        raise ValueError("nft_loss: kl_beta > 0 needs the reference velocity v_ref")
    loss = policy_loss + kl_beta * kl if kl_beta > 0 else policy_loss
    metrics = {
        "policy_loss": policy_loss.detach(),
        "unweighted_policy_loss": unweighted.detach(),
        "kl": kl.detach(),
        "old_deviate": _mean_d((v_theta - v_old) ** 2).detach(),
        "optimality": r,
    }
    return loss, metrics


def old_policy_decay(step: int, decay_type: int) -> float:
    """The decay d of the old-policy update ``theta_old <- d theta_old + (1 - d) theta`` after a
    rollout at optimizer step ``step`` (``return_decay``, ``train_nft_sd3.py:169-189``):
    type 0: 0 (a plain copy); type 1 (default): ``min(0.001 step, 0.5)``; type 2 (OCR): 0 before
    step 75, then ``min(0.0075 (step - 75), 0.999)``."""
    flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}.get(
        decay_type, (None, None, None)
    )
    if flat is None:
        raise ValueError(f"old_policy_decay: decay_type must be 0, 1 or 2, got {decay_type}")
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


@OBJECTIVES.register("diffusion_nft")
@dataclass(frozen=True)
class DiffusionNFT:
    """DiffusionNFT: the policy vs. its decayed old copy on forward-process points of clean rollouts.

    Zero-advantage groups (all G rewards equal) are trained like any other, so there is no
    ``drop_zero_advantage`` here (unlike Flow-GRPO / GRPO): their optimality r = 0.5 weighs the
    positive and negative implicit policies equally, which is still a loss with a gradient once
    theta has left theta_old (it holds v_theta near v_old), and the official script keeps them."""

    rewards: str = ""
    """Comma-separated reward specs (as online_dpo)."""
    group_size: int = 24
    """Images per prompt (official: 48 groups x 24 per epoch, ``config/nft.py``)."""
    sample_steps: int = 10
    """Rollout steps and the training grid's size (official: 10; 25 for multi-reward)."""
    guidance_scale: float = 1.0
    """CFG at rollout and training (official code supports only 1; #37: CFG > 1 slows convergence)."""
    beta: float = 1.0
    """!! NFT's implicit-policy MIXING beta (official ``config.beta``: 1.0; 0.1 for OCR and
    multi-reward), NOT a KL weight (that is ``kl_beta``). The loss divides by it."""
    kl_beta: float = 1e-4
    """KL weight: ``kl_beta * mean_D (v_theta - v_ref)^2`` to the reference (LoRA off); official
    ``config.train.beta`` = 1e-4. 0 skips the reference forward."""
    adv_clip: float = 5.0
    """Advantages clamp to ±adv_clip before r; also the loss factor (official ``adv_clip_max`` = 5)."""
    global_std: bool = True
    """Advantage std over all rewards (the flow_grpo tracker with global std, as official)."""
    timestep_fraction: float = 0.99
    """Grid entries trained per sample: ``int(sample_steps * timestep_fraction)`` of a random
    permutation (0.99 -> 9 of 10)."""
    old_decay: Literal["linear", "none"] = "linear"
    """Old-policy update after each rollout (``old_policy_decay``): "linear" = decay_type 1,
    ``d = min(0.001 step, 0.5)``; "none" = decay_type 0, a plain copy."""
    updates_per_rollout: int = 1
    """Optimizer steps per rollout round (official: accumulation over the whole epoch, 1; OCR: 2)."""

    kind: ClassVar[str] = "online"
    source: ClassVar[str] = "rollout"
    terms: ClassVar[str] = "velocities"
    noises_inputs: ClassVar[bool] = False
    ref_refresh_every: ClassVar[int] = 0
    winner_only: ClassVar[bool] = False
    per_image_captions: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    reports_margin: ClassVar[bool] = False
    logistic_margin: ClassVar[bool] = False
    reported_metrics: ClassVar[frozenset[str]] = NFT_METRICS

    @property
    def needs_reference(self) -> bool:
        """The reference (LoRA off) forward runs only for the KL term."""
        return self.kl_beta > 0

    @property
    def decay_type(self) -> int:
        """The official ``decay_type`` of ``old_decay`` (for ``old_policy_decay``)."""
        return DECAY_TYPES[self.old_decay]

    @property
    def train_steps(self) -> int:
        """Grid entries trained per sample: ``int(sample_steps * timestep_fraction)``."""
        return int(self.sample_steps * self.timestep_fraction)

    def __post_init__(self) -> None:
        require(
            (self.group_size >= 2, f"group_size >= 2, got {self.group_size}"),
            (self.sample_steps >= 1, f"sample_steps >= 1, got {self.sample_steps}"),
            (self.guidance_scale >= 1, f"guidance_scale >= 1, got {self.guidance_scale}"),
            (self.beta > 0, f"beta > 0 (NFT's mixing coefficient; the loss divides by it), got {self.beta}"),
            (self.kl_beta >= 0, f"kl_beta >= 0, got {self.kl_beta}"),
            (self.adv_clip > 0, f"adv_clip > 0, got {self.adv_clip}"),
            (self.updates_per_rollout >= 1, f"updates_per_rollout >= 1, got {self.updates_per_rollout}"),
            (0 < self.timestep_fraction <= 1, f"0 < timestep_fraction <= 1, got {self.timestep_fraction}"),
            (self.train_steps >= 1, "int(sample_steps * timestep_fraction) >= 1 (at least one trained step)"),
        )

    def __call__(
        self, policy: dict[str, Tensor], ref: dict[str, Tensor] | None, batch: dict[str, Any]
    ) -> ObjectiveOutput:
        """``policy = {"velocity" [B,...]}``, ``ref = {"velocity"}`` (read when kl_beta > 0) or None;
        ``batch``: ``old_velocity`` [B,...], ``x0``, ``x_t`` [B,...], ``sigma`` [B], ``optimality`` [B]."""
        if self.kl_beta > 0 and ref is None:
            raise ValueError("diffusion_nft: kl_beta > 0 needs the reference's velocity (ref={'velocity'})")
        loss, metrics = nft_loss(
            policy["velocity"],
            batch["old_velocity"],
            batch["x0"],
            batch["x_t"],
            torch.as_tensor(batch["sigma"]),
            torch.as_tensor(batch["optimality"]),
            self.beta,
            ref["velocity"] if self.kl_beta > 0 and ref is not None else None,
            self.kl_beta,
            self.adv_clip,
        )
        return ObjectiveOutput(loss, metrics)
