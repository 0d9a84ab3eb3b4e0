"""Flow-matching samplers (rectified flow, SD3): the Euler ODE and Flow-GRPO's SDE step.

Model output is the velocity ``v = eps - x0`` at ``x_sigma = (1 - sigma) x0 + sigma eps``;
``sigmas`` run from ~1 down to 0 (``FlowMatchEulerDiscreteScheduler.sigmas`` after
``set_timesteps``, shift applied) and the network sees ``t = sigma * 1000``.

- Euler ODE: ``x_next = x + (sigma_next - sigma) * v`` (= ``FlowMatchEulerDiscreteScheduler.step``).
- Flow-GRPO SDE (Liu et al. 2025; yifan123/flow_grpo ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``):
  ``std = a * sqrt(sigma / (1 - sigma))`` (a = ``noise_level``, 0.7), ``dt = sigma_next - sigma`` (< 0),
  ``mean = x * (1 + std^2 / (2 sigma) * dt) + v * (1 + std^2 (1 - sigma) / (2 sigma)) * dt``,
  ``x_next = mean + std * sqrt(-dt) * z``; log-prob averaged over dims. At sigma = 1 the
  ``sqrt(sigma/(1-sigma))`` is infinite, so flow_grpo puts ``sigma_max = sigmas[1]`` (the grid's
  second sigma) in that denominator only: ``std = a * sqrt(1 / (1 - sigmas[1]))``
  (``sd3_sde_with_logprob.py``: ``torch.where(sigma == 1, sigma_max, sigma)``). Capping sigma at
  ``1 - 1e-3`` everywhere instead (an earlier version here) gives std ~ 22 a and a first-step drift
  factor of about -15 on a 15-step grid: the samples explode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import ModelFn, SampleOutput, gaussian_log_prob, guided, randn_like


def flow_sde_coefficients(
    sigma: float, sigma_next: float, noise_level: float, sigma_max: float | None = None
) -> tuple[float, float, float]:
    """``(g, dt, scale)`` of the Flow-GRPO SDE step from ``sigma`` to ``sigma_next``: the diffusion
    coefficient ``g = noise_level * sqrt(sigma / (1 - sigma))`` (flow_grpo's ``std_dev_t``; at
    sigma = 1, ``sigma_max`` replaces sigma in the denominator, default ``sigma_next``), the step
    ``dt = sigma_next - sigma`` (< 0) and the transition's std ``scale = g * sqrt(-dt)``."""
    if sigma >= 1:
        sigma_max = sigma_next if sigma_max is None else sigma_max
        if not 0 <= sigma_max < 1:
            raise ValueError(f"flow_sde_step: sigma_max must be in [0, 1) at sigma = 1, got {sigma_max}")
        g = noise_level * (sigma / (1 - sigma_max)) ** 0.5
    else:
        g = noise_level * (sigma / (1 - sigma)) ** 0.5
    dt = sigma_next - sigma
    return g, dt, g * (-dt) ** 0.5


def flow_sde_mean(v: Tensor, x: Tensor, sigma: float, g: float, dt: float) -> Tensor:
    """The SDE step's mean ``x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt``
    (``[B,...]``, in the dtype of ``x`` and ``v``; differentiable in ``v``)."""
    return x * (1 + g**2 / (2 * sigma) * dt) + v * (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt


def flow_sde_step(
    v: Tensor,
    x: Tensor,
    sigma: float,
    sigma_next: float,
    noise: Tensor | None,
    noise_level: float = 0.7,
    sigma_max: float | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One Flow-GRPO SDE step from ``sigma`` to ``sigma_next``. ``sigma_max``: the grid's second sigma,
    used in the std's denominator when ``sigma == 1`` (default ``sigma_next``, which it is for the
    first step of a grid starting at 1). Computes in the dtype of ``v`` / ``x``; a training loop that
    needs ratio == 1 exactly recomputes the rollout log-prob with ``flow_sde_log_prob`` (fp32)."""
    g, dt, scale = flow_sde_coefficients(sigma, sigma_next, noise_level, sigma_max)
    mean = flow_sde_mean(v, x, sigma, g, dt)
    if noise is None or scale == 0:
        return mean, None, mean
    x_next = mean + scale * noise
    return x_next, gaussian_log_prob(x_next, mean, scale), mean


def flow_sde_log_prob(
    v: Tensor,
    x: Tensor,
    x_next: Tensor,
    sigma: float,
    sigma_next: float,
    noise_level: float,
    sigma_max: float | None = None,
) -> tuple[Tensor, Tensor, float]:
    """log p_theta(x_next | x) of a given Flow-GRPO SDE transition (flow_grpo ``sde_step_with_logprob``
    with ``prev_sample`` given). Returns ``(log_prob [B], mean [B,...], g)``:

    - ``log_prob``: the Gaussian log-density of ``x_next`` under ``N(mean, (g sqrt(-dt))^2)``,
      averaged over the non-batch dims, fp32 (v, x and x_next are cast to fp32 first, as flow_grpo:
      "bf16 can overflow here"); ``x_next`` is detached, the gradient flows through ``v`` only.
    - ``mean``: the step's mean ``[B,...]`` fp32 (for Flow-GRPO's KL to the reference's mean).
    - ``g``: the diffusion coefficient ``noise_level * sqrt(sigma / (1 - sigma))`` with the sigma = 1
      substitution (flow_grpo's ``std_dev_t``, *without* ``sqrt(-dt)``: the KL divides by 2 g^2).

    Use it at rollout too (on the sampled ``x_next``), so the stored old log-prob and the training
    one are the same computation. ``noise_level = 0`` (the ODE step) has no log-prob: ValueError."""
    g, dt, scale = flow_sde_coefficients(sigma, sigma_next, noise_level, sigma_max)
    if scale <= 0:
        raise ValueError(
            f"flow_sde_log_prob: a deterministic step (noise_level={noise_level}, sigma={sigma} -> "
            f"{sigma_next}) has no log-prob; need noise_level > 0 and sigma_next < sigma"
        )
    mean = flow_sde_mean(v.float(), x.float(), sigma, g, dt)  # [B,...] fp32
    return gaussian_log_prob(x_next.float(), mean, scale), mean, g


def flow_sample(
    model_fn: ModelFn,
    x_T: Tensor,
    sigmas: list[float] | Tensor,
    cond: Any,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    return_trajectory: bool = False,
    return_log_probs: bool = False,
    num_train_timesteps: int = 1000,
) -> SampleOutput:
    """``eta = 0``: Euler ODE over ``sigmas`` (including the final 0). ``eta > 0``: Flow-GRPO SDE with
    ``noise_level = eta`` (the last step, into sigma = 0, stays deterministic)."""
    sig = [float(s) for s in sigmas]
    x = x_T
    out = SampleOutput(x_T)
    if return_trajectory:
        out.trajectory.append(x)
    for i in range(len(sig) - 1):
        t = torch.tensor(sig[i] * num_train_timesteps, device=x.device, dtype=torch.float32)
        v = guided(model_fn, x, t, cond, guidance_scale)
        if eta > 0 and sig[i + 1] > 0:
            x, lp, _ = flow_sde_step(v, x, sig[i], sig[i + 1], randn_like(x, generator), eta)
            if return_log_probs and lp is not None:
                out.log_probs.append(lp)
        else:
            x = x + (sig[i + 1] - sig[i]) * v
        if return_trajectory:
            out.trajectory.append(x)
    out.sample = x
    return out


_SDE_SCHEDULER: type | None = None


def flow_sde_scheduler(
    scheduler: Any, noise_level: float, generator: torch.Generator | list[torch.Generator] | None
) -> Any:
    """A copy of a ``FlowMatchEulerDiscreteScheduler`` whose steps are Flow-GRPO SDE steps at
    ``noise_level`` (the last step, into sigma = 0, stays Euler), so any flow pipeline samples the way
    Flow-GRPO's rollouts do: ``pipe.scheduler = flow_sde_scheduler(pipe.scheduler, 0.7, gen)``.
    ``generator``: one generator, or one per sample (the noise is then independent of batching).

    Each step computes the SDE sample ``x_next`` (:func:`flow_sde_step`, fp32, ``sigma_max`` = the grid's
    second sigma, as the rollouts) and hands the Euler step the velocity that lands on it,
    ``(x_next - x) / dt``, so diffusers' own step keeps the step index and dtype handling (exact up to
    one fp32 rounding). The subclass is defined on first use: importing this module stays free of
    diffusers."""
    global _SDE_SCHEDULER
    if _SDE_SCHEDULER is None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        class FlowSDEScheduler(FlowMatchEulerDiscreteScheduler):
            noise_level: float = 0.7
            noise_generator: torch.Generator | list[torch.Generator] | None = None

            def step(self, model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, **kwargs: Any):
                i = self.step_index if self.step_index is not None else self.index_for_timestep(timestep)
                s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
                if self.noise_level > 0 and s_next > 0:
                    x = sample.float()
                    noise = randn_like(x, self.noise_generator)
                    x_next, _, _ = flow_sde_step(
                        model_output.float(), x, s, s_next, noise, self.noise_level, float(self.sigmas[1])
                    )
                    model_output = ((x_next - x) / (s_next - s)).to(model_output.dtype)
                return super().step(model_output, timestep, sample, *args, **kwargs)

        _SDE_SCHEDULER = FlowSDEScheduler
    out = _SDE_SCHEDULER.from_config(scheduler.config)
    out.noise_level, out.noise_generator = noise_level, generator
    return out
