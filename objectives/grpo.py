"""GRPO for diffusion models: the shared policy-gradient pieces (group advantages, the clipped
surrogate with Flow-GRPO's KL) and the method for epsilon / v-prediction UNets (SD1.5, SDXL).

Papers: Black et al., "Training Diffusion Models with Reinforcement Learning" (DDPO, ICLR 2024);
Xue et al., "DanceGRPO: Unleashing GRPO on Visual Generation" (2025); Liu et al., "Flow-GRPO:
Training Flow Matching Models via Online RL" (arXiv 2505.05470).

Reference implementations (restated, with their lines, in ``tests/test_policy_gradient.py``):

- the clipped surrogate: kvablack/ddpo-pytorch@1958463 ``scripts/train.py:539-551``;
  XueZeyue/DanceGRPO@15cc71d ``fastvideo/train_grpo_sd.py:640-652``;
  yifan123/flow_grpo@ac4c86e ``scripts/train_sd3.py:881-893``;
- the KL to the reference and the logged statistics: yifan123/flow_grpo@ac4c86e
  ``scripts/train_sd3.py:894-911``;
- the advantages: yifan123/flow_grpo@ac4c86e ``flow_grpo/stat_tracking.py:25-31`` (clamped at
  ``train_sd3.py:881-885``); DanceGRPO@15cc71d ``train_grpo_sd.py:537-547``;
  ddpo-pytorch@1958463 ``ddpo_pytorch/stat_tracking.py:11-29``;
- the UNet transition: ddpo-pytorch@1958463 ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py:39-192``
  (``samplers.ddim.ddim_transition``).

Code -> paper (notation of ``/work/shared/reference/online-rl.md`` §0):

    log_prob        -> l^theta_i = log p_theta(x_{i+1} | x_i, c), a mean over the D latent elements
    old_log_prob    -> l^old_i, stored at rollout (no gradient)
    advantage       -> A, one per trajectory, reused at every trained step
    ratio           -> rho = exp(l^theta - l^old)
    clip_range      -> eps_c (1e-4: log-probs are means over D, so ratios move very little)
    mean, ref_mean  -> mu_theta, mu_ref, the step's Gaussian mean under the policy / the reference
    kl_std          -> g_i (flow: the diffusion coefficient, *without* sqrt|dt|) or sigma_t (DDIM)
    beta            -> beta, the KL weight

    loss_b = max(-A rho, -A clip(rho, 1 - eps_c, 1 + eps_c))
             + beta * mean_D (mu_theta - mu_ref)^2 / (2 kl_std^2)

The loop averages over the batch and over the trained steps (flow_grpo: one backward per step,
accumulated over ``grad_accum x trained steps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import OBJECTIVES, ObjectiveOutput

GRPO_METRICS = frozenset({"ratio", "clipfrac", "approx_kl", "kl", "advantage"})
"""The per-sample ``[B]`` keys ``grpo_loss`` returns."""


def require(*checks: tuple[bool, str]) -> None:
    """Hyperparameter validation: raise ``ValueError`` naming the first constraint that fails."""
    for ok, constraint in checks:
        if not ok:
            raise ValueError(f"need {constraint}")


def group_advantages(
    rewards: Tensor, global_std: bool = True, eps: float = 1e-4, clip: float = 5.0
) -> Tensor:
    """GRPO advantages ``[P, G]`` from rewards ``[P, G]`` (P prompts, a group of G images each):

        A = clamp((r - mean_group(r)) / (std + eps), -clip, clip)

    with ``std`` the population std (numpy's ``np.std``, ddof 0) of *all* P x G rewards
    (``global_std=True``, flow_grpo's default for SD3/FLUX) or of each group (``False``).
    flow_grpo ``stat_tracking.py`` (eps 1e-4, the tracker cleared every epoch, so the group is this
    rollout's G images; the loop gathers every rank's rewards first) and the clamp at ±5
    (``train.adv_clip_max``). Other references: ddpo-pytorch's tracker uses eps 1e-6 (per-prompt
    history of 16; below 16 the batch statistics), its no-tracker path and DanceGRPO eps 1e-8 with
    DanceGRPO's std *unbiased* (ddof 1): pass ``eps`` to match, the ddof differs by sqrt(G/(G-1)).

    A group whose rewards are all equal gets exactly 0 (its samples carry no signal; flow_grpo drops
    samples with A == 0 before training), not the rounding noise of ``r - mean``. Computed in fp64;
    returned in the rewards' floating dtype (fp32 for integer rewards)."""
    if rewards.ndim != 2 or rewards.shape[1] < 1:
        raise ValueError(f"group_advantages: rewards must be [prompts, group], got {tuple(rewards.shape)}")
    r = rewards.double()  # [P, G]
    mean = r.mean(1, keepdim=True)  # [P, 1]
    std = r.std(unbiased=False) if global_std else r.std(1, unbiased=False, keepdim=True)  # [] or [P, 1]
    adv = ((r - mean) / (std + eps)).clamp(-clip, clip)  # [P, G]
    flat = flat_groups(r).unsqueeze(1)  # [P, 1]
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def flat_groups(rewards: Tensor) -> Tensor:
    """``[P]`` bool from rewards ``[P, G]``: the groups whose G rewards are all equal (zero spread,
    e.g. all 0 or all 1 under a strict judge). ``group_advantages`` gives their samples exactly 0, so
    they carry no policy-gradient signal (only the KL term, when ``beta > 0``)."""
    return rewards.amax(1) == rewards.amin(1)


NEUTRAL_METRICS: dict[str, float] = {"ratio": 1.0}
"""The value a ``grpo_loss`` metric reads for a sample of weight 0 (the others: 0)."""


def weigh_samples(
    loss: Tensor, metrics: dict[str, Tensor], weight: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample weights ``w [B]`` on a ``grpo_loss`` result: ``loss_b * w_b`` and each metric
    ``m_b -> c + w_b (m_b - c)`` with ``c`` its neutral value (``NEUTRAL_METRICS``, else 0).

    The rollout source sets ``w = world x samples trained on this process / samples kept over all
    processes`` for kept samples and 0 for the zero-advantage samples it trains only as padding
    (``train.rollout.zero_advantage_layout``): the loop's plain means of the loss and the metrics over
    micro-batches and processes are then the means over the kept samples, wherever they were
    trained. A metric at its neutral value stays exactly there (a first-step ratio of 1 reads 1)."""
    w = weight.to(loss.device, loss.dtype)  # [B]
    out = {}
    for k, m in metrics.items():
        c = NEUTRAL_METRICS.get(k, 0.0)
        out[k] = c + w.to(m.dtype) * (m - c)  # [B]
    return loss * w, out


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantage: Tensor,
    clip_range: float,
    mean: Tensor | None = None,
    ref_mean: Tensor | None = None,
    kl_std: Tensor | float | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample clipped policy-gradient loss ``[B]`` of one trained step, plus Flow-GRPO's KL.

    ``log_prob`` ``[B]`` (with gradient), ``old_log_prob`` and ``advantage`` ``[B]`` (rollout data,
    detached here; clamp the advantage beforehand, the objectives do). With ``beta > 0`` the step's
    means ``mean`` / ``ref_mean`` ``[B,...]`` and ``kl_std`` (``[B]`` or a float) are required:

        kl_b = mean_D (mean - ref_mean)^2 / (2 kl_std^2)

    as flow_grpo codes it (``train_sd3.py:894-899``): ``kl_std`` is the diffusion coefficient g, the
    exact Gaussian KL's ``|dt|`` is dropped on purpose (flow_grpo #22, #78), so late steps weigh more.
    ``ref_mean`` is detached. Metrics, per sample and detached: ``ratio``, ``clipfrac`` (1.0 where
    ``|ratio - 1| > clip_range``), ``approx_kl = 0.5 (log_prob - old_log_prob)^2``, ``kl`` (zeros
    when ``beta == 0``) and ``advantage``."""
    old = old_log_prob.detach()  # [B]
    adv = advantage.detach().to(log_prob.dtype)  # [B]
    ratio = torch.exp(log_prob - old)  # [B]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)  # [B]
    kl = torch.zeros_like(loss)
    if beta > 0:
        if mean is None or ref_mean is None or kl_std is None:
            raise ValueError("grpo_loss: beta > 0 needs mean, ref_mean and kl_std")
        std = torch.as_tensor(kl_std, dtype=mean.dtype, device=mean.device)  # [] or [B]
        kl = ((mean - ref_mean.detach()) ** 2).flatten(1).mean(1) / (2 * std**2)  # [B]
        loss = loss + beta * kl.to(loss.dtype)
    metrics = {
        "ratio": ratio.detach(),
        "clipfrac": ((ratio - 1.0).abs() > clip_range).float().detach(),
        "approx_kl": (0.5 * (log_prob - old) ** 2).detach(),
        "kl": kl.detach(),
        "advantage": adv,
    }
    return loss, metrics


def sde_step_loss(
    policy: dict[str, Tensor],
    ref: dict[str, Tensor] | None,
    batch: dict[str, Any],
    clip_range: float,
    adv_clip: float,
    beta: float,
) -> ObjectiveOutput:
    """The ``terms = "sde_steps"`` call shared by GRPO and Flow-GRPO: ``policy = {"log_prob" [B],
    "mean" [B,...]}``, ``ref = {"mean" [B,...]}`` (read only when ``beta > 0``), ``batch`` with
    ``old_log_prob`` [B], ``advantage`` [B] (clamped here to ±adv_clip, as the references do in the
    loss), when ``beta > 0`` ``kl_std`` ([B] or a float), and optionally ``sample_weight`` [B]
    (``weigh_samples``: a round with zero-advantage samples left out)."""
    adv = torch.as_tensor(batch["advantage"]).clamp(-adv_clip, adv_clip)  # [B]
    if beta > 0:
        if ref is None:
            raise ValueError("beta > 0 needs the reference's step means (ref={'mean': ...})")
        loss, metrics = grpo_loss(
            policy["log_prob"],
            batch["old_log_prob"],
            adv,
            clip_range,
            policy["mean"],
            ref["mean"],
            batch["kl_std"],
            beta,
        )
    else:
        loss, metrics = grpo_loss(policy["log_prob"], batch["old_log_prob"], adv, clip_range)
    if batch.get("sample_weight") is not None:
        loss, metrics = weigh_samples(loss, metrics, batch["sample_weight"])
    return ObjectiveOutput(loss, metrics)


@OBJECTIVES.register("grpo")
@dataclass(frozen=True)
class GRPO:
    """GRPO for epsilon / v-prediction UNets on DDIM (eta > 0) transitions, DDPO / DanceGRPO style.

    Each rollout samples ``group_size`` images per prompt with DDIM at ``eta`` (1 = every step
    stochastic, DDPO), ``sample_steps`` steps and CFG ``guidance_scale``, storing every transition
    and its log-prob (``samplers.ddim.ddim_transition``); the rewards give group advantages
    (``group_advantages``); ``train_steps`` of the transitions, a random permutation per sample
    (DDPO ``train.py:460-471``), are re-scored under the current policy and trained with
    ``grpo_loss``. ``kl_std`` is the step's ``sigma_t`` (the exact per-element Gaussian KL; the UNet
    references have no KL at all, it is our addition from Flow-GRPO, off by default)."""

    rewards: str = ""
    """Comma-separated reward specs, e.g. ``pickscore=PATH,hpsv2=PATH`` (as online_dpo)."""
    group_size: int = 16
    """Images per prompt (DanceGRPO SD ``config_sd/dgx.py:hpsv2``: ``num_generations = 16``)."""
    sample_steps: int = 50
    """DDIM steps per rollout (DDPO and DanceGRPO-SD: 50)."""
    guidance_scale: float = 5.0
    """CFG at rollout (DDPO / DanceGRPO-SD: 5)."""
    eta: float = 1.0
    """DDIM eta; every trained step must be stochastic (DDPO: 1.0)."""
    clip_range: float = 1e-4
    """PPO clip eps_c (DDPO, DanceGRPO, Flow-GRPO: 1e-4)."""
    beta: float = 0.0
    """KL weight to the reference (0 in DDPO / DanceGRPO: no reference forward at all)."""
    adv_clip: float = 5.0
    """Advantages are clamped to ±adv_clip (all references: 5)."""
    global_std: bool = False
    """Advantage std over all rewards (True) or per group (False: DanceGRPO's per-group std,
    DDPO's per-prompt tracker)."""
    timestep_fraction: float = 1.0
    """Share of the sampling steps trained per rollout: ``int(sample_steps * timestep_fraction)``
    (DDPO 1.0 = all 50; DanceGRPO-SD trains ``int(49 * fraction)`` of its 50)."""
    train_cfg: bool = True
    """Recompute CFG at train time with ``guidance_scale`` (DDPO / DanceGRPO: yes, uncond branch
    *not* detached); False: the conditional prediction alone (then sample with CFG 1 too, or the
    ratio is not 1 at the first update)."""
    updates_per_rollout: int = 1
    """Optimizer steps per rollout batch (1 = on-policy, ratio == 1 at every update; DDPO's dgx
    configs make 4 per epoch, DanceGRPO-SD 2)."""
    drop_zero_advantage: bool = False
    """Leave the samples of zero-spread groups (every advantage 0) out of the round, as
    ``FlowGRPO.drop_zero_advantage``. Off by default: DDPO and DanceGRPO train every sample."""

    detach_uncond: ClassVar[bool] = False
    """Train-time CFG differentiates both halves (DDPO and DanceGRPO do not detach the unconditional
    prediction), as one forward of the doubled batch."""
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
    def train_steps(self) -> int:
        """Transitions trained per trajectory: ``int(sample_steps * timestep_fraction)`` (DDPO)."""
        return int(self.sample_steps * self.timestep_fraction)

    def __post_init__(self) -> None:
        require(
            (self.group_size >= 2, f"group_size >= 2, got {self.group_size}"),
            (self.sample_steps >= 1, f"sample_steps >= 1, got {self.sample_steps}"),
            (self.guidance_scale >= 1, f"guidance_scale >= 1, got {self.guidance_scale}"),
            (0 < self.eta <= 1, f"0 < eta <= 1 (trained steps must be stochastic), got {self.eta}"),
            (0 < self.clip_range < 1, f"0 < clip_range < 1, got {self.clip_range}"),
            (self.beta >= 0, f"beta >= 0, got {self.beta}"),
            (self.adv_clip > 0, f"adv_clip > 0, got {self.adv_clip}"),
            (0 < self.timestep_fraction <= 1, f"0 < timestep_fraction <= 1, got {self.timestep_fraction}"),
            (self.train_steps >= 1, "int(sample_steps * timestep_fraction) >= 1 (at least one trained step)"),
            (self.updates_per_rollout >= 1, f"updates_per_rollout >= 1, got {self.updates_per_rollout}"),
        )

    def __call__(
        self, policy: dict[str, Tensor], ref: dict[str, Tensor] | None, batch: dict[str, Any]
    ) -> ObjectiveOutput:
        return sde_step_loss(policy, ref, batch, self.clip_range, self.adv_clip, self.beta)
