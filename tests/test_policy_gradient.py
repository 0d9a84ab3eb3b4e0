"""Online-RL objectives (GRPO, Flow-GRPO, DiffusionNFT) and their sampler transitions: parity with the
official lines restated here, hand-derived numbers, and gradient checks.

Restated sources (read at these commits; see /work/shared/reference/online-rl.md):
- yifan123/flow_grpo@ac4c86e: flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:36-68,
  scripts/train_sd3.py:881-911, flow_grpo/stat_tracking.py:25-31;
- kvablack/ddpo-pytorch@1958463: ddpo_pytorch/diffusers_patch/ddim_with_logprob.py:39-192,
  ddpo_pytorch/stat_tracking.py:11-29, scripts/train.py:539-551;
- XueZeyue/DanceGRPO@15cc71d: fastvideo/train_grpo_sd.py:537-547;
- NVlabs/DiffusionNFT@24af555: scripts/train_nft_sd3.py:169-189, 910-970.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque

import numpy as np
import pytest
import torch

from diffalign.config import ConfigError, ObjectiveConfig
from diffalign.objectives import (
    GRPO,
    OBJECTIVES,
    DiffusionNFT,
    FlowGRPO,
    build_objective,
    group_advantages,
    grpo_loss,
    nft_loss,
    nft_optimality,
    old_policy_decay,
)
from diffalign.samplers.base import guided
from diffalign.samplers.ddim import NoiseSchedule, ddim_step, ddim_transition, ddim_transition_log_prob
from diffalign.samplers.flow import flow_sde_log_prob, flow_sde_step

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)  # 0.9189385


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Restated official code (never imported from diffalign)


def _flow_grpo_sde_step_with_logprob(model_output, sigmas, step_index, sample, noise_level, prev_sample):
    """flow_grpo@ac4c86e sd3_sde_with_logprob.py:36-68 (sde_type "sde"), with ``sigmas`` the
    scheduler's sigmas and ``step_index`` a list (one per sample) in place of index_for_timestep."""
    model_output = model_output.float()
    sample = sample.float()
    prev_sample = prev_sample.float()
    prev_step_index = [step + 1 for step in step_index]
    sigma = sigmas[step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_prev = sigmas[prev_step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (
        sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
        - torch.log(std_dev_t * torch.sqrt(-1 * dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def _ddpo_ddim_step_with_logprob(self, model_output, timestep, sample, eta, prev_sample):
    """ddpo-pytorch@1958463 ddim_with_logprob.py:39-192 (clip_sample off), ``timestep`` batched."""

    def _left_broadcast(t, shape):
        return t.reshape(t.shape + (1,) * (len(shape) - t.ndim)).broadcast_to(shape)

    prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, self.config.num_train_timesteps - 1)
    alpha_prod_t = self.alphas_cumprod.gather(0, timestep.cpu())
    alpha_prod_t_prev = torch.where(
        prev_timestep.cpu() >= 0, self.alphas_cumprod.gather(0, prev_timestep.cpu()), self.final_alpha_cumprod
    )
    variance = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)
    alpha_prod_t = _left_broadcast(alpha_prod_t, sample.shape)
    alpha_prod_t_prev = _left_broadcast(alpha_prod_t_prev, sample.shape)
    beta_prod_t = 1 - alpha_prod_t
    if self.config.prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    else:  # v_prediction
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    std_dev_t = eta * variance ** (0.5)
    std_dev_t = _left_broadcast(std_dev_t, sample.shape)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * (std_dev_t**2))
        - torch.log(std_dev_t)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample.type(sample.dtype), log_prob, prev_sample_mean, std_dev_t


class _FlowGrpoPerPromptStatTracker:
    """flow_grpo@ac4c86e stat_tracking.py (type 'grpo'): the lines 18-31 that compute advantages."""

    def __init__(self, global_std=False):
        self.global_std = global_std
        self.stats = {}

    def update(self, prompts, rewards):
        prompts = np.array(prompts)
        rewards = np.array(rewards, dtype=np.float64)
        unique = np.unique(prompts)
        advantages = np.empty_like(rewards) * 0.0
        for prompt in unique:
            prompt_rewards = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = []
            self.stats[prompt].extend(prompt_rewards)
        for prompt in unique:
            self.stats[prompt] = np.stack(self.stats[prompt])
            prompt_rewards = rewards[prompts == prompt]
            mean = np.mean(self.stats[prompt], axis=0, keepdims=True)
            if self.global_std:
                std = np.std(rewards, axis=0, keepdims=True) + 1e-4
            else:
                std = np.std(self.stats[prompt], axis=0, keepdims=True) + 1e-4
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages


class _DdpoPerPromptStatTracker:
    """ddpo-pytorch@1958463 stat_tracking.py:5-29."""

    def __init__(self, buffer_size, min_count):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats = {}

    def update(self, prompts, rewards):
        prompts = np.array(prompts)
        rewards = np.array(rewards)
        unique = np.unique(prompts)
        advantages = np.empty_like(rewards)
        for prompt in unique:
            prompt_rewards = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = deque(maxlen=self.buffer_size)
            self.stats[prompt].extend(prompt_rewards)
            if len(self.stats[prompt]) < self.min_count:
                mean = np.mean(rewards)
                std = np.std(rewards) + 1e-6
            else:
                mean = np.mean(self.stats[prompt])
                std = np.std(self.stats[prompt]) + 1e-6
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages


def _flow_grpo_train_step(
    log_prob, old_log_probs, advantages, prev_sample_mean, prev_sample_mean_ref, std_dev_t, cfg
):
    """flow_grpo@ac4c86e train_sd3.py:881-911 (``sample["log_probs"][:, j]`` -> ``old_log_probs``)."""
    advantages = torch.clamp(advantages, -cfg["adv_clip_max"], cfg["adv_clip_max"])
    ratio = torch.exp(log_prob - old_log_probs)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - cfg["clip_range"], 1.0 + cfg["clip_range"])
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    if cfg["beta"] > 0:
        kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (
            2 * std_dev_t**2
        )
        kl_loss = torch.mean(kl_loss)
        loss = policy_loss + cfg["beta"] * kl_loss
    else:
        loss = policy_loss
    approx_kl = 0.5 * torch.mean((log_prob - old_log_probs) ** 2)
    clipfrac = torch.mean((torch.abs(ratio - 1.0) > cfg["clip_range"]).float())
    return loss, approx_kl, clipfrac


def _nft_official_loss(
    forward_prediction, old_prediction, ref_forward_prediction, x0, xt, timesteps, adv, cfg
):
    """DiffusionNFT@24af555 train_nft_sd3.py:864-970 (``config.beta`` -> cfg["beta"], KL weight
    ``config.train.beta`` -> cfg["train_beta"]); returns (loss, r, kl_div)."""
    t = timesteps / 1000.0
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    advantages_clip = torch.clamp(adv, -cfg["adv_clip_max"], cfg["adv_clip_max"])
    normalized_advantages_clip = (advantages_clip / cfg["adv_clip_max"]) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    positive_prediction = cfg["beta"] * forward_prediction + (1 - cfg["beta"]) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + cfg["beta"]) * old_prediction.detach() - cfg[
        "beta"
    ] * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (
            torch.abs(x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (
            torch.abs(negative_x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(
        dim=tuple(range(1, x0.ndim))
    )
    ori_policy_loss = r * positive_loss / cfg["beta"] + (1.0 - r) * negative_loss / cfg["beta"]
    policy_loss = (ori_policy_loss * cfg["adv_clip_max"]).mean()
    loss = policy_loss
    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    loss += cfg["train_beta"] * torch.mean(kl_div_loss)
    return loss, r, kl_div_loss


def _nft_return_decay(step, decay_type):
    """DiffusionNFT@24af555 train_nft_sd3.py:169-189."""
    if decay_type == 0:
        flat, uprate, uphold = 0, 0.0, 0.0
    elif decay_type == 1:
        flat, uprate, uphold = 0, 0.001, 0.5
    elif decay_type == 2:
        flat, uprate, uphold = 75, 0.0075, 0.999
    else:
        raise AssertionError
    if step < flat:
        return 0.0
    decay = (step - flat) * uprate
    return min(decay, uphold)


def _sd3_sigmas(steps: int = 10) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3.5
    sch.set_timesteps(steps)
    return sch.sigmas  # [steps + 1] fp32, 1 -> 0


def _ddim_scheduler(pred: str = "epsilon", steps: int = 50):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=pred,
    )
    sch.set_timesteps(steps)
    return sch


# --------------------------------------------------------------------------------------------------
# Samplers: the Flow-SDE and DDIM transitions


def test_flow_sde_log_prob_matches_flow_grpo_at_every_step():
    """All 10 steps of the SD3.5 grid (shift 3), the sigma = 1 step (sigma_max substitution) and the
    last one included: log-prob, mean and g = std_dev_t as flow_grpo's sde_step_with_logprob."""
    sigmas = _sd3_sigmas(10)
    g = _gen(0)
    B = 3
    for i in range(10):
        x, v, z = (torch.randn(B, 4, 8, 8, generator=g) for _ in range(3))
        idx = [i] * B
        # the official rollout: x_next = mean + std * sqrt(-dt) * z
        _, _, mean_o, std_o = _flow_grpo_sde_step_with_logprob(v, sigmas, idx, x, 0.7, x)
        dt = sigmas[i + 1] - sigmas[i]
        x_next = mean_o + std_o * torch.sqrt(-1 * dt) * z
        _, lp_o, mean_o, std_o = _flow_grpo_sde_step_with_logprob(v, sigmas, idx, x, 0.7, x_next)
        lp, mean, gcoef = flow_sde_log_prob(
            v, x, x_next, float(sigmas[i]), float(sigmas[i + 1]), 0.7, sigma_max=float(sigmas[1])
        )
        assert lp.shape == (B,) and lp.dtype == torch.float32
        torch.testing.assert_close(lp, lp_o, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(mean, mean_o, atol=2e-5, rtol=1e-5)
        assert gcoef == pytest.approx(std_o.flatten()[0].item(), rel=1e-5)
    # the first step's g uses sigma_1 in the denominator only: 0.7 * sqrt(1 / (1 - sigmas[1]))
    first = flow_sde_log_prob(v, x, x, 1.0, float(sigmas[1]), 0.7, sigma_max=float(sigmas[1]))[2]
    assert first == pytest.approx(0.7 * (1 / (1 - float(sigmas[1]))) ** 0.5)


def test_flow_sde_log_prob_is_fp32_like_flow_grpo():
    """bf16 inputs are cast to fp32 before the mean (flow_grpo: 'bf16 can overflow here')."""
    g = _gen(1)
    x, v, xn = (torch.randn(2, 4, 4, 4, generator=g).bfloat16() for _ in range(3))
    lp, mean, _ = flow_sde_log_prob(v, x, xn, 0.6, 0.5, 0.7)
    assert lp.dtype == torch.float32 and mean.dtype == torch.float32
    lp32, mean32, _ = flow_sde_log_prob(v.float(), x.float(), xn.float(), 0.6, 0.5, 0.7)
    assert torch.equal(lp, lp32) and torch.equal(mean, mean32)


def test_flow_sde_rollout_log_prob_hand_derived():
    """At rollout x_next = mean + s z, so l = -1/2 mean(z^2) - log s - 1/2 log(2 pi).
    sigma 0.6 -> 0.5, a = 0.7: g = 0.7 sqrt(0.6/0.4) = 0.857321, s = g sqrt(0.1) = 0.271109;
    with z = ±1 (mean z^2 = 1): l = -0.5 + 1.305231 - 0.918939 = -0.113708.
    §9: at s = 0.7, l = -0.5 - log 0.7 - 0.919 = -1.062."""
    g = _gen(2)
    x, v = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(2))
    z = torch.randint(0, 2, (2, 4, 4, 4), generator=g).float() * 2 - 1  # ±1
    x_next, lp_step, mean = flow_sde_step(v, x, 0.6, 0.5, z, noise_level=0.7)
    lp, mean2, gcoef = flow_sde_log_prob(v, x, x_next, 0.6, 0.5, 0.7)
    assert gcoef == pytest.approx(0.857321, abs=1e-6)
    s = 0.7 * math.sqrt(0.6 / 0.4) * math.sqrt(0.1)
    assert s == pytest.approx(0.271109, abs=1e-6)
    torch.testing.assert_close(lp, torch.full((2,), -0.5 - math.log(s) - HALF_LOG_2PI))
    assert lp[0].item() == pytest.approx(-0.113708, abs=1e-5)
    # the rollout step (fp32 already) and the training recomputation agree bit for bit: ratio == 1
    assert torch.equal(lp, lp_step) and torch.equal(mean, mean2)
    # the §9 number, s = 0.7: a = 0.7 / (sqrt(0.6/0.4) sqrt(0.1)) = 1.807392 -> l = -0.5 + 0.356675 - 0.918939
    a = 0.7 / (math.sqrt(0.6 / 0.4) * math.sqrt(0.1))
    x_next, _, _ = flow_sde_step(v, x, 0.6, 0.5, z, noise_level=a)
    lp, _, _ = flow_sde_log_prob(v, x, x_next, 0.6, 0.5, a)
    torch.testing.assert_close(lp, torch.full((2,), -1.062264), atol=1e-5, rtol=0)


def test_flow_sde_log_prob_gradient():
    """dl/dv = (x_next - mean) / s^2 * c dt / D with c = 1 + g^2 (1 - sigma) / (2 sigma); x_next is
    data (no gradient)."""
    g = _gen(3)
    x, z = (torch.randn(2, 3, 2, 2, generator=g) for _ in range(2))
    v = torch.randn(2, 3, 2, 2, generator=g, requires_grad=True)
    sig, nxt, a = 0.7, 0.55, 0.7
    with torch.no_grad():
        x_next, _, _ = flow_sde_step(v, x, sig, nxt, z, a)
    x_next.requires_grad_(True)
    lp, mean, gc = flow_sde_log_prob(v, x, x_next, sig, nxt, a)
    lp.sum().backward()
    dt = nxt - sig
    s2 = gc**2 * -dt
    c = 1 + gc**2 * (1 - sig) / (2 * sig)
    want = (x_next.detach() - mean.detach()) / s2 * c * dt / 12
    torch.testing.assert_close(v.grad, want)
    assert x_next.grad is None


def test_flow_sde_log_prob_sigma_max_only_in_the_denominator_at_sigma_one():
    """At sigma = 1, g = a sqrt(1 / (1 - sigma_max)): sigma_max 0.8 -> 0.7 sqrt(5) = 1.565248 (not
    sigma_next = 0.9's 0.7 sqrt(10)); the drift keeps sigma = 1: mean = x (1 + g^2 dt / 2) + v dt."""
    g = _gen(17)
    x, v, xn = (torch.randn(2, 4, 2, 2, generator=g) for _ in range(3))
    lp, mean, gc = flow_sde_log_prob(v, x, xn, 1.0, 0.9, 0.7, sigma_max=0.8)
    assert gc == pytest.approx(1.565248, abs=1e-6)
    torch.testing.assert_close(mean, x * (1 + 0.7**2 * 5 * -0.1 / 2) + v * -0.1)
    s = 0.7 * math.sqrt(5) * math.sqrt(0.1)
    want = (-((xn - mean) ** 2) / (2 * s**2) - math.log(s) - HALF_LOG_2PI).flatten(1).mean(1)
    torch.testing.assert_close(lp, want)
    assert flow_sde_log_prob(v, x, xn, 1.0, 0.9, 0.7)[2] == pytest.approx(0.7 * math.sqrt(10))


def test_flow_sde_log_prob_refuses_a_deterministic_step():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="deterministic"):
        flow_sde_log_prob(x, x, x, 0.6, 0.5, 0.0)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_transition_matches_ddpo(pred):
    """ddim_transition == ddpo-pytorch's ddim_step_with_logprob (prev_sample given) at the first, a
    middle and the last of 50 steps (DDPO's prev clamp at 0 == our final alpha for this scheduler),
    for log-prob, mean and sigma_t; eta 1 (DDPO) and 0.5."""
    sch = _ddim_scheduler(pred, 50)
    ns = NoiseSchedule.from_scheduler(sch)
    ts = sch.timesteps.tolist()
    g = _gen(4)
    B = 2
    for eta in (1.0, 0.5):
        for i in (0, 25, 49):
            t, t_prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
            x, out, z = (torch.randn(B, 4, 8, 8, generator=g) for _ in range(3))
            tt = torch.full((B,), t, dtype=torch.long)
            _, _, mean_o, std_o = _ddpo_ddim_step_with_logprob(sch, out, tt, x, eta, x)
            x_prev = mean_o + std_o * z
            _, lp_o, mean_o, std_o = _ddpo_ddim_step_with_logprob(sch, out, tt, x, eta, x_prev)
            lp, mean, sig = ddim_transition(out, x, x_prev, t, t_prev, ns, eta)
            torch.testing.assert_close(lp, lp_o, atol=5e-5, rtol=1e-5)
            torch.testing.assert_close(mean, mean_o, atol=1e-5, rtol=1e-5)
            assert sig == pytest.approx(std_o.flatten()[0].item(), rel=1e-5)
            torch.testing.assert_close(ddim_transition_log_prob(out, x, x_prev, t, t_prev, ns, eta), lp)


def test_ddim_transition_at_rollout_hand_derived_and_gradient():
    """x_prev = mean + sigma_t z with z = ±1: l = -0.5 - log sigma_t - 0.918939, the rollout's
    log-prob equals the training recomputation exactly, and dl/dpred = (x_prev - mean)/sigma^2 *
    dmean/dpred / D, dmean/deps = sqrt(1 - abar_prev - sigma^2) - sqrt(abar_prev (1 - abar_t) / abar_t)."""
    sch = _ddim_scheduler("epsilon", 20)
    ns = NoiseSchedule.from_scheduler(sch)
    t, t_prev = 501, 451
    g = _gen(5)
    x = torch.randn(2, 4, 4, 4, generator=g)
    pred = torch.randn(2, 4, 4, 4, generator=g, requires_grad=True)
    z = torch.randint(0, 2, (2, 4, 4, 4), generator=g).float() * 2 - 1
    with torch.no_grad():
        x_prev, lp_roll, _ = ddim_step(pred, x, t, t_prev, ns, 1.0, z)
    lp, mean, sig = ddim_transition(pred, x, x_prev, t, t_prev, ns, 1.0)
    a, ap = float(sch.alphas_cumprod[t].double()), float(sch.alphas_cumprod[t_prev].double())
    want_sig = math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    assert sig == pytest.approx(want_sig, rel=1e-6)
    torch.testing.assert_close(lp.detach(), torch.full((2,), -0.5 - math.log(want_sig) - HALF_LOG_2PI))
    assert torch.equal(lp.detach(), lp_roll)
    lp.sum().backward()
    dmean = math.sqrt(1 - ap - want_sig**2) - math.sqrt(ap * (1 - a) / a)
    want = (x_prev - mean.detach()) / want_sig**2 * dmean / 64
    torch.testing.assert_close(pred.grad, want)
    with pytest.raises(ValueError, match="deterministic"):
        ddim_transition(pred, x, x_prev, t, t_prev, ns, 0.0)


# --------------------------------------------------------------------------------------------------
# Advantages


@pytest.mark.parametrize("global_std", [True, False])
def test_group_advantages_match_flow_grpo_tracker(global_std):
    """flow_grpo's PerPromptStatTracker (fresh each epoch) on the flat prompt list, then the ±5 clamp
    of train_sd3.py:881-885; G = 32 with one outlier group so the per-group clamp bites."""
    g = _gen(6)
    P, G = 5, 32
    rewards = torch.rand(P, G, generator=g, dtype=torch.float64)
    rewards[0] = 0.0
    rewards[0, 3] = 1.0  # per-group: (31/32) / (sqrt(31)/32) = sqrt(31) = 5.57 -> clamped
    prompts = [f"p{i}" for i in range(P) for _ in range(G)]
    official = _FlowGrpoPerPromptStatTracker(global_std).update(prompts, rewards.flatten().numpy())
    official = np.clip(official, -5, 5).reshape(P, G)
    ours = group_advantages(rewards, global_std=global_std)
    torch.testing.assert_close(ours, torch.from_numpy(official), atol=1e-12, rtol=0)
    if not global_std:
        assert ours[0, 3].item() == 5.0


def test_group_advantages_match_ddpo_tracker_with_its_eps():
    """ddpo-pytorch's tracker once a prompt has min_count samples: per-prompt mean and std + 1e-6."""
    g = _gen(7)
    rewards = torch.randn(3, 16, generator=g, dtype=torch.float64)
    prompts = [f"p{i}" for i in range(3) for _ in range(16)]
    official = _DdpoPerPromptStatTracker(16, 16).update(prompts, rewards.flatten().numpy()).reshape(3, 16)
    ours = group_advantages(rewards, global_std=False, eps=1e-6, clip=math.inf)
    torch.testing.assert_close(ours, torch.from_numpy(official), atol=1e-12, rtol=0)


def test_group_advantages_vs_dancegrpo_unbiased_std():
    """DanceGRPO train_grpo_sd.py:537-547 uses torch's unbiased std + 1e-8: ours (ddof 0) times
    sqrt((G-1)/G) up to the eps."""
    rewards = torch.randn(4, 8, generator=_gen(8), dtype=torch.float64)
    dance = torch.zeros_like(rewards)
    for i in range(4):
        group_rewards = rewards[i]
        dance[i] = (group_rewards - group_rewards.mean()) / (group_rewards.std() + 1e-8)
    ours = group_advantages(rewards, global_std=False, eps=1e-8, clip=math.inf)
    torch.testing.assert_close(ours * math.sqrt(7 / 8), dance, atol=1e-7, rtol=0)


def test_group_advantages_hand_derived():
    """[[1, 2, 3], [5, 5, 5]]: per group, row 0: std sqrt(2/3) = 0.816497 -> ±1/(0.816497 + 1e-4)
    = ±1.224595; the all-equal row gives exactly 0. Global: std of all six rewards = sqrt(15.5/6) =
    1.607275 -> ±1/1.607375 = ±0.622132."""
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    per = group_advantages(r, global_std=False)
    torch.testing.assert_close(per[0], torch.tensor([-1.224595, 0.0, 1.224595]), atol=1e-6, rtol=0)
    assert torch.equal(per[1], torch.zeros(3))
    glob = group_advantages(r)
    torch.testing.assert_close(glob[0], torch.tensor([-0.622132, 0.0, 0.622132]), atol=1e-6, rtol=0)
    assert torch.equal(glob[1], torch.zeros(3)) and glob.dtype == torch.float32
    # an all-equal group whose mean is not exact in fp64 (0.1 * 3 / 3 != 0.1) still gives exact zeros
    tricky = torch.full((2, 3), 0.1, dtype=torch.float64)
    tricky[1] = torch.tensor([0.0, 1.0, 2.0])
    assert (tricky[0] - tricky[0].mean()).abs().max() > 0  # what the zeroing guards against
    assert torch.equal(group_advantages(tricky)[0], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="prompts, group"):
        group_advantages(torch.ones(6))


def test_group_advantages_properties():
    """Per-prompt mean 0 (when nothing is clamped), |A| <= clip, per-group std 1 up to the eps."""
    r = torch.randn(16, 8, generator=_gen(9), dtype=torch.float64) * 3 + 1
    per = group_advantages(r, global_std=False)
    torch.testing.assert_close(per.mean(1), torch.zeros(16, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        per.std(1, unbiased=False), torch.ones(16, dtype=torch.float64), atol=1e-3, rtol=0
    )
    clipped = group_advantages(r * torch.tensor([100.0] + [1.0] * 7, dtype=torch.float64), clip=1.5)
    assert clipped.abs().max().item() <= 1.5 and (clipped.abs() == 1.5).any()


# --------------------------------------------------------------------------------------------------
# The clipped surrogate and the KL


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_flow_grpo_train_step(beta):
    """Batch means of our per-sample loss / approx_kl / clipfrac == flow_grpo's train_sd3.py lines,
    with ratios spread over the clip range (some clipped, some not) and a per-sample std_dev_t."""
    g = _gen(10)
    B = 64
    old = torch.randn(B, generator=g) - 1.0
    lp = (old + 3e-4 * torch.randn(B, generator=g)).requires_grad_(True)
    adv = torch.randn(B, generator=g) * 3  # some beyond ±5 before the clamp
    mean = torch.randn(B, 4, 4, 4, generator=g, requires_grad=True)
    ref_mean = mean.detach() + 0.05 * torch.randn(B, 4, 4, 4, generator=g)
    std = torch.rand(B, generator=g) + 0.3
    cfg = {"adv_clip_max": 5, "clip_range": 1e-4, "beta": beta}
    loss_o, akl_o, cf_o = _flow_grpo_train_step(lp, old, adv, mean, ref_mean, std.view(-1, 1, 1, 1), cfg)
    loss, m = grpo_loss(lp, old, adv.clamp(-5, 5), 1e-4, mean, ref_mean, std, beta)
    torch.testing.assert_close(loss.mean(), loss_o)
    torch.testing.assert_close(m["approx_kl"].mean(), akl_o)
    torch.testing.assert_close(m["clipfrac"].mean(), cf_o)
    assert 0 < cf_o.item() < 1  # both branches are exercised
    # gradients too (at beta 0 the means are not in the graph, in either)
    gl, gm = torch.autograd.grad(loss.mean(), [lp, mean], allow_unused=True)
    gl_o, gm_o = torch.autograd.grad(loss_o, [lp, mean], allow_unused=True)
    torch.testing.assert_close(gl, gl_o)
    if beta > 0:
        torch.testing.assert_close(gm, gm_o)
    else:
        assert gm is None and gm_o is None


def test_grpo_loss_at_the_old_policy_hand_derived():
    """theta = old: ratio == 1 exactly, loss = -A, clipfrac 0, approx_kl 0, dloss/dlog_prob = -A."""
    adv = torch.tensor([2.0, -0.5, 0.0, 5.0])
    old = torch.tensor([-1.1, -0.9, -1.0, -1.2])
    lp = old.clone().requires_grad_(True)
    loss, m = grpo_loss(lp, old, adv, 1e-4)
    assert torch.equal(m["ratio"], torch.ones(4))
    torch.testing.assert_close(loss, -adv)
    assert torch.equal(m["clipfrac"], torch.zeros(4)) and torch.equal(m["approx_kl"], torch.zeros(4))
    assert torch.equal(m["kl"], torch.zeros(4)) and torch.equal(m["advantage"], adv)
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, -adv)


def test_grpo_loss_clipping_hand_derived():
    """eps_c = 1e-4. Sample 0: A = 1, log-ratio 3e-4 -> ratio e^3e-4 = 1.0003000 > 1.0001: the
    clipped branch -A (1 + eps) = -1.0001 wins the max, gradient 0, clipfrac 1.
    Sample 1: A = 1, log-ratio -3e-4 -> ratio 0.9997000: the unclipped -0.9997 wins (pessimistic),
    gradient -A ratio = -0.9997, clipfrac 1. Sample 2: A = -2, log-ratio 5e-5 (inside): loss
    2 e^5e-5 = 2.0001000, gradient 2.0001. approx_kl = 0.5 * 9e-8 = 4.5e-8 for samples 0 and 1."""
    old = torch.zeros(3, dtype=torch.float64)
    lp = torch.tensor([3e-4, -3e-4, 5e-5], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -2.0], dtype=torch.float64)
    loss, m = grpo_loss(lp, old, adv, 1e-4)
    torch.testing.assert_close(
        loss.detach(), torch.tensor([-1.0001, -math.exp(-3e-4), 2 * math.exp(5e-5)], dtype=torch.float64)
    )
    assert m["clipfrac"].tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(m["approx_kl"], torch.tensor([4.5e-8, 4.5e-8, 1.25e-9], dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(
        lp.grad, torch.tensor([0.0, -math.exp(-3e-4), 2 * math.exp(5e-5)], dtype=torch.float64)
    )


def test_grpo_loss_kl_hand_derived():
    """mean - ref = 0.1 everywhere, kl_std 0.5: kl = 0.01 / (2 * 0.25) = 0.02; beta 0.04 adds 8e-4.
    Per-sample std [0.5, 1.0]: [0.02, 0.005]. The KL's gradient reaches mean only, never ref_mean;
    at beta 0 the kl metric is zeros even with a reference."""
    mean = torch.zeros(2, 3, 2, 2, requires_grad=True)
    ref = torch.full((2, 3, 2, 2), -0.1, requires_grad=True)
    lp = torch.zeros(2)
    adv = torch.zeros(2)
    loss, m = grpo_loss(lp, lp, adv, 1e-4, mean, ref, 0.5, 0.04)
    torch.testing.assert_close(m["kl"], torch.tensor([0.02, 0.02]))
    torch.testing.assert_close(loss.detach(), torch.tensor([8e-4, 8e-4]))
    loss.sum().backward()
    # d/dmean of 0.04 * mean_D (mean - ref)^2 / 0.5 = 0.04 * 2 * 0.1 / (12 * 0.5)
    torch.testing.assert_close(mean.grad, torch.full_like(mean, 0.04 * 2 * 0.1 / (12 * 0.5)))
    assert ref.grad is None
    _, m2 = grpo_loss(lp, lp, adv, 1e-4, mean, ref, torch.tensor([0.5, 1.0]), 0.04)
    torch.testing.assert_close(m2["kl"], torch.tensor([0.02, 0.005]))
    _, m0 = grpo_loss(lp, lp, adv, 1e-4, mean, ref, 0.5, 0.0)
    assert torch.equal(m0["kl"], torch.zeros(2))
    with pytest.raises(ValueError, match="beta > 0"):
        grpo_loss(lp, lp, adv, 1e-4, beta=0.04)


# --------------------------------------------------------------------------------------------------
# The objectives end to end on tiny "models"


def _flow_rollout_and_train(obj: FlowGRPO, w: torch.Tensor, w_old: float, w_ref: float, seed: int = 11):
    """One SDE step of a linear velocity model v = w x: rollout with w_old, train with w, KL to w_ref."""
    g = _gen(seed)
    sigmas = _sd3_sigmas(obj.sample_steps)
    i = 2
    s, s_next, s_max = float(sigmas[i]), float(sigmas[i + 1]), float(sigmas[1])
    x = torch.randn(4, 4, 4, 4, generator=g)
    with torch.no_grad():
        x_next, _, _ = flow_sde_step(
            w_old * x, x, s, s_next, torch.randn(x.shape, generator=g), obj.noise_level
        )
        old_lp, _, gcoef = flow_sde_log_prob(w_old * x, x, x_next, s, s_next, obj.noise_level, s_max)
        _, ref_mean, _ = flow_sde_log_prob(w_ref * x, x, x_next, s, s_next, obj.noise_level, s_max)
    lp, mean, _ = flow_sde_log_prob(w * x, x, x_next, s, s_next, obj.noise_level, s_max)
    adv = torch.tensor([1.0, -1.0, 7.0, 0.5])
    batch = {"old_log_prob": old_lp, "advantage": adv, "kl_std": torch.full((4,), gcoef)}
    ref = {"mean": ref_mean} if obj.needs_reference else None
    return obj({"log_prob": lp, "mean": mean}, ref, batch)


def test_flow_grpo_objective_first_update_then_drift():
    """§9.3/9.4: before the first update (theta = old = ref) ratio == 1, kl == 0 and loss == -clamp(A);
    the gradient is non-zero. After an update ratios leave the clip range (clipfrac > 0) and kl > 0."""
    obj = FlowGRPO()
    w = torch.tensor(0.3, requires_grad=True)
    out = _flow_rollout_and_train(obj, w, 0.3, 0.3)
    assert torch.equal(out.metrics["ratio"], torch.ones(4))
    assert torch.equal(out.metrics["kl"], torch.zeros(4))
    torch.testing.assert_close(out.loss.detach(), -torch.tensor([1.0, -1.0, 5.0, 0.5]))  # A clamped at 5
    assert out.metrics["advantage"][2].item() == 5.0
    out.loss.mean().backward()
    assert w.grad is not None and w.grad.item() != 0
    w2 = torch.tensor(0.35, requires_grad=True)  # after an optimizer step
    out2 = _flow_rollout_and_train(obj, w2, 0.3, 0.3)
    assert out2.metrics["clipfrac"].sum() > 0 and (out2.metrics["kl"] > 0).all()
    assert set(out2.metrics) == obj.reported_metrics
    for v in out2.metrics.values():
        assert v.shape == (4,) and not v.requires_grad


def test_flow_grpo_objective_without_kl_needs_no_reference():
    obj = FlowGRPO(beta=0.0)
    assert not obj.needs_reference
    out = _flow_rollout_and_train(obj, torch.tensor(0.3, requires_grad=True), 0.3, 0.3)
    assert torch.equal(out.metrics["kl"], torch.zeros(4))
    with pytest.raises(ValueError, match="reference"):
        FlowGRPO()(
            {"log_prob": torch.zeros(1), "mean": torch.zeros(1, 2)},
            None,
            {"old_log_prob": torch.zeros(1), "advantage": torch.zeros(1), "kl_std": 1.0},
        )


def test_grpo_objective_on_ddim_transitions():
    """GRPO (UNet, DDIM eta 1): at theta = old ratio == 1, loss == -A; gradient non-zero; the KL
    (beta > 0) uses sigma_t; a moved policy clips."""
    sch = _ddim_scheduler("epsilon", 50)
    ns = NoiseSchedule.from_scheduler(sch)
    ts = sch.timesteps.tolist()
    t, t_prev = ts[10], ts[11]
    g = _gen(12)
    x = torch.randn(3, 4, 4, 4, generator=g)
    with torch.no_grad():
        x_prev, _, _ = ddim_step(0.2 * x, x, t, t_prev, ns, 1.0, torch.randn(x.shape, generator=g))
        old_lp, ref_mean, sig = ddim_transition(0.2 * x, x, x_prev, t, t_prev, ns, 1.0)
    adv = torch.tensor([0.5, -1.5, 2.0])
    for beta in (0.0, 0.1):
        obj = GRPO(beta=beta)
        assert obj.needs_reference == (beta > 0)
        w = torch.tensor(0.2, requires_grad=True)
        lp, mean, _ = ddim_transition(w * x, x, x_prev, t, t_prev, ns, obj.eta)
        ref = {"mean": ref_mean} if obj.needs_reference else None
        out = obj(
            {"log_prob": lp, "mean": mean}, ref, {"old_log_prob": old_lp, "advantage": adv, "kl_std": sig}
        )
        assert torch.equal(out.metrics["ratio"], torch.ones(3)) and torch.equal(
            out.metrics["kl"], torch.zeros(3)
        )
        torch.testing.assert_close(out.loss.detach(), -adv)
        out.loss.sum().backward()
        assert w.grad.item() != 0
        w2 = torch.tensor(0.25)
        lp2, mean2, _ = ddim_transition(w2 * x, x, x_prev, t, t_prev, ns, obj.eta)
        out2 = obj(
            {"log_prob": lp2, "mean": mean2}, ref, {"old_log_prob": old_lp, "advantage": adv, "kl_std": sig}
        )
        assert out2.metrics["clipfrac"].sum() > 0
        assert (out2.metrics["kl"] > 0).all() == (beta > 0)


# --------------------------------------------------------------------------------------------------
# DiffusionNFT


def test_nft_optimality_matches_official_and_hand_derived():
    """r = clamp(clip(A, ±5)/5/2 + 0.5, 0, 1): A = 0 -> 0.5, 2.5 -> 0.75, -7 -> 0, 9 -> 1, -1 -> 0.4."""
    adv = torch.tensor([0.0, 2.5, -7.0, 9.0, -1.0])
    torch.testing.assert_close(nft_optimality(adv), torch.tensor([0.5, 0.75, 0.0, 1.0, 0.4]))
    a = torch.randn(100, generator=_gen(13)) * 4
    cfg = {"adv_clip_max": 5, "beta": 1.0, "train_beta": 0.0}
    x = torch.zeros(100, 1)
    _, r_o, _ = _nft_official_loss(x, x, x, x, x, torch.full((100,), 500.0), a, cfg)
    torch.testing.assert_close(nft_optimality(a), r_o)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_matches_official(beta):
    """Batch mean of our per-sample loss == DiffusionNFT's loss (x0-space, adaptive weights, factor
    adv_clip_max, + train.beta * KL), value and gradient; SD3-like latents at random grid sigmas."""
    g = _gen(14)
    B = 6
    x0 = torch.randn(B, 4, 8, 8, generator=g)
    noise = torch.randn(B, 4, 8, 8, generator=g)
    timesteps = _sd3_sigmas(10)[torch.randint(0, 10, (B,), generator=g)] * 1000
    sigma = timesteps / 1000.0
    xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    v_true = noise - x0
    v_old = v_true + 0.3 * torch.randn(B, 4, 8, 8, generator=g)
    v_theta = (v_old + 0.1 * torch.randn(B, 4, 8, 8, generator=g)).requires_grad_(True)
    v_ref = v_old + 0.2 * torch.randn(B, 4, 8, 8, generator=g)
    adv = torch.randn(B, generator=g) * 3
    cfg = {"adv_clip_max": 5, "beta": beta, "train_beta": 1e-4}
    loss_o, r_o, kl_o = _nft_official_loss(v_theta, v_old, v_ref, x0, xt, timesteps, adv, cfg)
    loss, m = nft_loss(v_theta, v_old, x0, xt, sigma, nft_optimality(adv), beta, v_ref, 1e-4)
    assert loss.shape == (B,)
    torch.testing.assert_close(loss.mean(), loss_o.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m["kl"], kl_o)
    torch.testing.assert_close(m["optimality"], r_o)
    (g_ours,) = torch.autograd.grad(loss.mean(), v_theta)
    (g_off,) = torch.autograd.grad(loss_o, v_theta)
    torch.testing.assert_close(g_ours, g_off.float(), atol=1e-7, rtol=1e-4)
    # the objective wraps the same call
    obj = DiffusionNFT(beta=beta)
    out = obj(
        {"velocity": v_theta},
        {"velocity": v_ref},
        {"old_velocity": v_old, "x0": x0, "x_t": xt, "sigma": sigma, "optimality": nft_optimality(adv)},
    )
    torch.testing.assert_close(out.loss.mean(), loss_o.float(), atol=1e-5, rtol=1e-5)
    assert set(out.metrics) == obj.reported_metrics


def test_nft_at_the_old_policy_loss_ignores_r_gradient_does_not():
    """§9.7 at v_theta = v_old = u: v+ = v- = u, so the loss is the same for every r; its gradient
    is 2 adv_clip t^2 (2r - 1)(u - v) / (D w) with v = eps - x0 the true velocity and
    w = mean_D |t (v - u)| (derived: x0_hat - x0 = t (v - u)), zero only at r = 1/2 (DiffusionNFT #46)."""
    g = _gen(15)
    B, D = 3, 4 * 4 * 4
    x0, noise = (torch.randn(B, 4, 4, 4, generator=g) for _ in range(2))
    sigma = torch.tensor([0.9, 0.5, 0.2])
    t = sigma.view(-1, 1, 1, 1)
    xt = (1 - t) * x0 + t * noise
    v_true = noise - x0
    u = v_true + 0.5 * torch.randn(B, 4, 4, 4, generator=g)
    losses = []
    for rv in (0.0, 0.3, 1.0):
        r = torch.full((B,), rv)
        v = u.clone().requires_grad_(True)
        loss, m = nft_loss(v, u, x0, xt, sigma, r, beta=1.0)
        losses.append(loss.detach())
        loss.sum().backward()
        w = (t * (v_true - u)).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
        want = 2 * 5.0 * t**2 * (2 * rv - 1) * (u - v_true) / (D * w)
        torch.testing.assert_close(v.grad, want, atol=1e-6, rtol=1e-4)
        assert (v.grad.abs().sum() > 0) and torch.equal(m["old_deviate"], torch.zeros(B))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(losses[0], losses[2])
    v = u.clone().requires_grad_(True)
    nft_loss(v, u, x0, xt, sigma, torch.full((B,), 0.5), beta=1.0)[0].sum().backward()
    assert v.grad.abs().max() < 1e-6


def test_nft_loss_hand_derived_and_floor():
    """D = 4, t = 0.5, beta = 1, v_old = v_theta = v_true + 0.2 (x0_hat - x0 = -0.1 everywhere):
    w = 0.1, each term 0.01 / 0.1 = 0.1, loss = 5 * 0.1 = 0.5 for any r. KL to v_ref = v_theta - 0.3:
    mean_D 0.09, kl_beta 1e-4 -> + 9e-6. A perfect prediction hits the 1e-5 weight floor: loss 0."""
    x0 = torch.zeros(1, 4)
    noise = torch.ones(1, 4)
    sigma = torch.tensor([0.5])
    xt = 0.5 * x0 + 0.5 * noise
    v = noise - x0 + 0.2
    loss, m = nft_loss(v, v, x0, xt, sigma, torch.tensor([0.8]), 1.0, v - 0.3, 1e-4)
    torch.testing.assert_close(m["policy_loss"], torch.tensor([0.5]))
    torch.testing.assert_close(m["kl"], torch.tensor([0.09]))
    torch.testing.assert_close(loss, torch.tensor([0.5 + 9e-6]))
    exact, _ = nft_loss(noise - x0, noise - x0, x0, xt, sigma, torch.tensor([0.8]), 1.0)
    assert torch.equal(exact, torch.zeros(1))
    # the floor: x0_hat - x0 = -t * dv; dv = 2e-4 -> |.| = 1e-4 (above 1e-5): 1e-8 / 1e-4 * 5 = 5e-4;
    # dv = 2e-6 -> |.| = 1e-6, floored at 1e-5: 1e-12 / 1e-5 * 5 = 5e-7
    x0d, xtd, sd = x0.double(), xt.double(), sigma.double()
    for dv, want in ((2e-4, 5e-4), (2e-6, 5e-7)):
        vd = (noise - x0).double() + dv
        got, _ = nft_loss(vd, vd, x0d, xtd, sd, torch.tensor([0.8], dtype=torch.float64), 1.0)
        assert got.item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="v_ref"):
        nft_loss(v, v, x0, xt, sigma, torch.tensor([0.8]), 1.0, None, 1e-4)


def test_old_policy_decay_matches_official():
    """return_decay for every step 0..1000 and the three types; hand values: type 1 step 100 -> 0.1,
    600 -> 0.5 (cap); type 2 step 74 -> 0, 100 -> 0.1875, 300 -> 0.999 (cap); type 0 -> 0."""
    for dt in (0, 1, 2):
        for step in range(0, 1001):
            assert old_policy_decay(step, dt) == _nft_return_decay(step, dt)
    assert old_policy_decay(100, 1) == pytest.approx(0.1)
    assert old_policy_decay(600, 1) == 0.5
    assert old_policy_decay(74, 2) == 0.0 and old_policy_decay(100, 2) == pytest.approx(0.1875)
    assert old_policy_decay(300, 2) == 0.999 and old_policy_decay(5, 0) == 0.0
    with pytest.raises(ValueError, match="decay_type"):
        old_policy_decay(1, 3)
    assert DiffusionNFT().decay_type == 1 and DiffusionNFT(old_decay="none").decay_type == 0


# --------------------------------------------------------------------------------------------------
# Hyperparameters, windows and the objective contract (dict terms)


def test_flow_grpo_window_start_matches_official_randint():
    """Fast window w = 3 in [0, 5): start = random.randint(0, 2) with the same seeded RNG; steps
    outside the window are ODE and never trained; both ends of the range occur."""
    obj = FlowGRPO(sde_window=3, window_hi=5, beta=0.0, clip_range=1e-5)
    starts = set()
    for seed in range(200):
        steps = obj.sde_step_indices(random.Random(seed))
        start = random.Random(seed).randint(0, 5 - 3)  # the official line
        assert steps == [start, start + 1, start + 2]
        starts.add(start)
    assert starts == {0, 1, 2}
    assert obj.train_steps == 3 and obj.window_bounds == (0, 5)
    plain = FlowGRPO()
    assert plain.sde_step_indices(random.Random(0)) == list(range(9)) and plain.train_steps == 9
    assert FlowGRPO(sde_window=2).window_bounds == (0, 9)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("flow_grpo", {"timestep_fraction": 1.0}, "sample_steps - 1"),
        ("flow_grpo", {"sde_window": 6, "window_hi": 5}, "sde_window <= window_hi - window_lo"),
        ("flow_grpo", {"window_lo": 1}, "only with sde_window > 0"),
        ("flow_grpo", {"sde_window": 2, "window_hi": 10}, "window_hi <= sample_steps - 1"),
        ("flow_grpo", {"noise_level": 0.0}, "noise_level > 0"),
        ("grpo", {"eta": 0.0}, "0 < eta <= 1"),
        ("grpo", {"group_size": 1}, "group_size >= 2"),
        ("grpo", {"timestep_fraction": 0.01}, "at least one trained step"),
        ("grpo", {"clip_range": 0.0}, "0 < clip_range < 1"),
        ("diffusion_nft", {"beta": 0.0}, "mixing"),
        ("diffusion_nft", {"kl_beta": -1.0}, "kl_beta >= 0"),
        ("diffusion_nft", {"old_decay": "cosine"}, "valid choices: linear, none"),
    ],
)
def test_bad_hyperparameters_are_one_line_errors(name, params, match):
    with pytest.raises(ConfigError, match=match):
        build_objective(ObjectiveConfig(name, params))


def test_official_defaults():
    f, gr, n = FlowGRPO(), GRPO(), DiffusionNFT()
    assert (f.sample_steps, f.guidance_scale, f.noise_level, f.clip_range, f.beta) == (
        10,
        4.5,
        0.7,
        1e-4,
        0.04,
    )
    assert (f.adv_clip, f.global_std, f.timestep_fraction, f.group_size) == (5.0, True, 0.99, 8)
    assert (gr.sample_steps, gr.guidance_scale, gr.eta, gr.clip_range, gr.beta) == (50, 5.0, 1.0, 1e-4, 0.0)
    assert (n.sample_steps, n.guidance_scale, n.beta, n.kl_beta, n.train_steps) == (10, 1.0, 1.0, 1e-4, 9)


@pytest.mark.parametrize("name", ["grpo", "flow_grpo", "diffusion_nft"])
def test_policy_gradient_objective_contract(name):
    """What tests/test_objectives.py checks, for dict terms: every protocol ClassVar declared on the
    class itself, needs_reference a read-only property, config round trip, [B] finite loss with a
    gradient, detached [B] metrics covering reported_metrics."""
    cls = OBJECTIVES.get(name)
    for k in (
        "kind",
        "source",
        "terms",
        "noises_inputs",
        "ref_refresh_every",
        "winner_only",
        "per_image_captions",
        "needs_scores",
        "reports_margin",
        "logistic_margin",
        "reported_metrics",
        "needs_reference",
    ):
        assert k in vars(cls), (name, k)
    assert isinstance(vars(cls)["needs_reference"], property)
    assert (cls.kind, cls.source) == ("online", "rollout")
    assert cls.terms == ("velocities" if name == "diffusion_nft" else "sde_steps")
    assert not (cls.reports_margin or cls.logistic_margin or cls.winner_only or cls.needs_scores)
    obj = build_objective(ObjectiveConfig(name))
    with pytest.raises(AttributeError):
        obj.needs_reference = False
    assert build_objective(ObjectiveConfig(name, dataclasses.asdict(obj))) == obj
    g = _gen(16)
    B = 5
    if cls.terms == "sde_steps":
        old = torch.randn(B, generator=g)
        policy = {
            "log_prob": (old + 1e-4 * torch.randn(B, generator=g)).requires_grad_(True),
            "mean": torch.randn(B, 4, 2, 2, generator=g, requires_grad=True),
        }
        ref = {"mean": policy["mean"].detach() + 0.01} if obj.needs_reference else None
        batch = {"old_log_prob": old, "advantage": torch.randn(B, generator=g), "kl_std": torch.rand(B) + 0.5}
        leaf = policy["log_prob"]
    else:
        v = torch.randn(B, 4, 2, 2, generator=g, requires_grad=True)
        policy = {"velocity": v}
        ref = {"velocity": v.detach() + 0.01} if obj.needs_reference else None
        x0, noise = (torch.randn(B, 4, 2, 2, generator=g) for _ in range(2))
        sigma = torch.rand(B, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        batch = {
            "old_velocity": v.detach() + 0.05,
            "x0": x0,
            "x_t": (1 - s) * x0 + s * noise,
            "sigma": sigma,
            "optimality": nft_optimality(torch.randn(B, generator=g)),
        }
        leaf = v
    out = obj(policy, ref, batch)
    assert out.loss.shape == (B,) and torch.isfinite(out.loss).all()
    out.loss.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    assert obj.reported_metrics <= set(out.metrics)
    for val in out.metrics.values():
        assert not val.requires_grad and val.shape == (B,) and torch.isfinite(val).all()


# ----------------------------------------------------------------------------- train-time CFG


def _tiny_denoiser():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6 + 3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))

    def fn(x, t, c):  # x [N,6], t [N], c [N,3] -> [N,6]
        return net(torch.cat([x + t[:, None] * 1e-3, c], 1))

    return net, fn


def test_train_time_cfg_gradient_matches_flow_grpo_detached_uncond():
    """Restated ``train_sd3.py:181-196``: one forward of the doubled batch, chunk, the uncond
    prediction detached, ``u + s (c - u)``. ``guided(..., detach_uncond=True)`` gives the same
    prediction and the same parameter gradient; without the detach (DDPO's form) the gradient
    carries ``(1 - s)`` times the uncond branch's and differs."""
    net, fn = _tiny_denoiser()
    x, t = torch.randn(4, 6), torch.full((4,), 500.0)
    u_emb, c_emb = torch.zeros(4, 3), torch.randn(4, 3)
    w, s = torch.randn(4, 6), 4.5

    def grads(pred):
        net.zero_grad()
        (pred * w).sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    out = fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([u_emb, c_emb]))  # official
    noise_pred_uncond, noise_pred_text = out.chunk(2)
    noise_pred_uncond = noise_pred_uncond.detach()
    official = noise_pred_uncond + s * (noise_pred_text - noise_pred_uncond)
    g_official = grads(official)

    ours = guided(fn, x, t, (u_emb, c_emb), s, detach_uncond=True)
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(ours), g_official, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    undetached = grads(guided(fn, x, t, (u_emb, c_emb), s))
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(undetached, g_official, strict=True))


def test_train_time_cfg_detach_is_declared_per_method_and_reaches_the_rollout_step(monkeypatch):
    """Flow-GRPO detaches (official), GRPO for UNets does not (DDPO / DanceGRPO); the rollout
    source's step passes the objective's flag to ``guided`` when training (sampling has no gradient
    and runs the doubled batch)."""
    import diffalign.samplers.base as base

    assert FlowGRPO.detach_uncond is True and GRPO.detach_uncond is False
    seen = []
    real = base.guided

    def spy(*a, **k):
        seen.append(a[5] if len(a) > 5 else k.get("detach_uncond", False))
        return real(*a, **k)

    monkeypatch.setattr(base, "guided", spy)
    from diffalign.train.rollout import GRPORollouts

    for obj, flag in ((FlowGRPO(), True), (GRPO(), False)):
        src = GRPORollouts.__new__(GRPORollouts)  # only what step() reads
        src.obj, src.flow = obj, isinstance(obj, FlowGRPO)
        seen.clear()
        if src.flow:
            src.sigmas, src.adapter = [1.0, 0.5, 0.0], type("A", (), {"num_train_timesteps": 1000})()
        else:
            from diffusers import DDIMScheduler

            src.ts, src.sched = [999, 499], NoiseSchedule.from_scheduler(DDIMScheduler())
        net, fn = _tiny_denoiser()
        x = torch.randn(4, 6)
        cond = (torch.zeros(4, 3), torch.randn(4, 3))
        x_next, lp, _, _ = src.step(fn, x, 0, cond, 4.5, None, torch.randn(4, 6))
        src.step(fn, x, 0, cond, 4.5, x_next, None)
        assert seen == [False, flag]  # sampling: no gradient, one doubled batch; training: the flag
