"""DDIM (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021), with eta >= 0 and log-probs.

Matches ``diffusers.DDIMScheduler.step`` (tested); notation as there:
    alpha_prod_t       -> abar_t            alpha_prod_t_prev -> abar_prev
    pred_original      -> x0_hat            std_dev_t         -> sigma_t = eta * sqrt(var(t, prev))
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat + sigma_t z

The log-prob of a stochastic step (eta > 0) is that of x_prev under N(mean, sigma_t^2), averaged
over non-batch dims (as ddpo-pytorch's ``ddim_step_with_logprob``, used by D3PO and SPO).
``DDPM`` is DDIM with eta = 1 on the same grid (the posterior variance of Ho et al.).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .base import ModelFn, SampleOutput, gaussian_log_prob, guided, randn_like


@dataclass
class NoiseSchedule:
    """The DDPM noise schedule a DDIM sampler needs, read from a diffusers scheduler."""

    alphas_cumprod: Tensor
    final_alpha_cumprod: float
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        ac = scheduler.alphas_cumprod.double()
        final = 1.0 if getattr(scheduler.config, "set_alpha_to_one", False) else float(ac[0])
        return cls(ac, final, scheduler.config.prediction_type)

    def abar(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def eps_x0(self, pred: Tensor, x: Tensor, a: float) -> tuple[Tensor, Tensor]:
        """(eps_hat, x0_hat) from the network output at abar = a."""
        sa, s1a = a**0.5, (1 - a) ** 0.5
        if self.prediction_type == "epsilon":
            return pred, (x - s1a * pred) / sa
        return sa * pred + s1a * x, sa * x - s1a * pred  # v-prediction


def ddim_timesteps(scheduler_config: Any, num_steps: int) -> list[int]:
    """The ``num_steps`` sampling timesteps (descending) that ``diffusers.DDIMScheduler`` picks for this
    scheduler config (its ``timestep_spacing`` and ``steps_offset`` included)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(num_steps)
    return [int(t) for t in ddim.timesteps]


def ddim_mean_std(
    pred: Tensor, x: Tensor, t: int, t_prev: int, sched: NoiseSchedule, eta: float = 0.0
) -> tuple[Tensor, float]:
    """The DDIM step's Gaussian from ``t`` to ``t_prev``: ``(mean [B,...], sigma_t)`` with
    ``sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))`` and
    ``mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat`` (differentiable in
    ``pred``; ``t_prev = -1`` is the final alpha)."""
    a, a_prev = sched.abar(t), sched.abar(t_prev)
    eps, x0 = sched.eps_x0(pred, x, a)
    var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    sigma = eta * var**0.5
    mean = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps
    return mean, sigma


def ddim_step(
    pred: Tensor,
    x: Tensor,
    t: int,
    t_prev: int,
    sched: NoiseSchedule,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One DDIM step. Returns ``(x_prev, log_prob [B] or None, mean)``."""
    mean, sigma = ddim_mean_std(pred, x, t, t_prev, sched, eta)
    if sigma == 0:
        return mean, None, mean
    assert noise is not None, "a stochastic step (eta > 0) needs noise"
    x_prev = mean + sigma * noise
    return x_prev, gaussian_log_prob(x_prev, mean, sigma), mean


def ddim_transition(
    pred: Tensor, x_t: Tensor, x_prev: Tensor, t: int, t_prev: int, sched: NoiseSchedule, eta: float = 1.0
) -> tuple[Tensor, Tensor, float]:
    """A given stochastic DDIM transition ``x_t -> x_prev`` under the prediction ``pred`` (ddpo-pytorch's
    ``ddim_step_with_logprob`` with ``prev_sample`` given, as DDPO / DanceGRPO-SD train on it).
    Returns ``(log_prob [B], mean [B,...], sigma_t)``: the Gaussian log-density of ``x_prev``
    (detached) under ``N(mean, sigma_t^2)`` averaged over non-batch dims, differentiable in ``pred``;
    the step's mean; its std ``sigma_t`` (the KL to a reference's mean divides by ``2 sigma_t^2``).
    A deterministic step (``sigma_t = 0``: eta = 0, or the last step into ``abar = 1``) has no
    log-prob: ValueError."""
    mean, sigma = ddim_mean_std(pred, x_t, t, t_prev, sched, eta)
    if sigma == 0:
        raise ValueError("a deterministic step (eta = 0) has no log-prob")
    return gaussian_log_prob(x_prev, mean, sigma), mean, sigma


def ddim_transition_log_prob(
    pred: Tensor, x_t: Tensor, x_prev: Tensor, t: int, t_prev: int, sched: NoiseSchedule, eta: float = 1.0
) -> Tensor:
    """log p_theta(x_prev | x_t) of a given stochastic DDIM transition (the step's Gaussian), ``[B]``,
    averaged over non-batch dims; differentiable in ``pred`` (SPO/D3PO's ``ddim_step_with_logprob``
    with ``prev_sample`` given). ``ddim_transition``'s first output."""
    return ddim_transition(pred, x_t, x_prev, t, t_prev, sched, eta)[0]


def ddim_sample(
    model_fn: ModelFn,
    x_T: Tensor,
    timesteps: list[int] | Tensor,
    cond: Any,
    sched: NoiseSchedule,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    return_trajectory: bool = False,
    return_log_probs: bool = False,
) -> SampleOutput:
    """Sample from ``x_T`` over descending ``timesteps``; the step after the last goes to the final alpha."""
    ts = [int(t) for t in timesteps]
    x = x_T
    out = SampleOutput(x_T)
    if return_trajectory:
        out.trajectory.append(x)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        pred = guided(model_fn, x, torch.tensor(t, device=x.device), cond, guidance_scale)
        noise = randn_like(x, generator) if eta > 0 else None
        x, lp, _ = ddim_step(pred, x, t, t_prev, sched, eta, noise)
        if return_trajectory:
            out.trajectory.append(x)
        if return_log_probs and lp is not None:
            out.log_probs.append(lp)
    out.sample = x
    return out


def ddpm_sample(
    model_fn: ModelFn,
    x_T: Tensor,
    timesteps: list[int] | Tensor,
    cond: Any,
    sched: NoiseSchedule,
    guidance_scale: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    return_trajectory: bool = False,
    return_log_probs: bool = False,
) -> SampleOutput:
    """Ancestral DDPM sampling: DDIM with eta = 1 (the posterior variance ``beta~_t``)."""
    return ddim_sample(
        model_fn,
        x_T,
        timesteps,
        cond,
        sched,
        guidance_scale,
        1.0,
        generator,
        return_trajectory,
        return_log_probs,
    )
