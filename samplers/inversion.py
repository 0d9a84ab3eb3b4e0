"""DDIM inversion and ReNoise inversion: map a clean latent to noise along the model's own ODE.

DDIM inversion (used by InPO; JaydenLyh/InPO ``train.py:990-1050``) runs the deterministic DDIM
update upwards: ``x_next = sqrt(abar_next) x0_hat(x, t) + sqrt(1 - abar_next) eps_hat(x, t)``.
ReNoise (Garibi et al. 2024; SmPO ``train.py:1000-1024``) refines each step: predict eps at the
current latent, take a tentative step, predict again at the tentative latent (same timestep
argument), average the two predictions and redo the step from the current latent.

Both return the inverted latent ``x_T`` and the implied noise
``eps* = (x_T - sqrt(abar_T) x0) / sqrt(1 - abar_T)``, the regression target of InPO/SmPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import ModelFn, guided
from .ddim import NoiseSchedule


@dataclass
class InversionOutput:
    latent: Tensor
    """x at the last timestep of the grid."""
    noise: Tensor
    """The implied noise eps* for that timestep."""
    trajectory: list[Tensor]


def _up(x: Tensor, eps: Tensor, a: float, a_next: float) -> Tensor:
    x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
    return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps


def ddim_invert(model_fn: ModelFn, x0: Tensor, timesteps: list[int] | Tensor, cond: Any, sched: NoiseSchedule,
                guidance_scale: float = 1.0, renoise_steps: int = 0) -> InversionOutput:
    """Invert ``x0`` up the *ascending* ``timesteps`` grid (e.g. ``reversed(scheduler.timesteps)``).

    Step i goes from ``timesteps[i-1]`` (the clean latent for i = 0, at abar = final alpha) to
    ``timesteps[i]``; as in ``diffusers.DDIMInverseScheduler`` the network sees the current latent
    with the *target* timestep. ``renoise_steps`` > 0 enables ReNoise refinement (SmPO uses 1)."""
    ts = [int(t) for t in timesteps]
    if sched.prediction_type != "epsilon":
        raise ValueError("inversion is implemented for epsilon-prediction models")
    x, traj = x0, [x0]
    prev = -1
    for t in ts:
        a, a_next = sched.abar(prev), sched.abar(t)
        t_eval = torch.tensor(t, device=x.device)
        eps = guided(model_fn, x, t_eval, cond, guidance_scale)
        for _ in range(renoise_steps):
            tentative = _up(x, eps, a, a_next)
            eps = 0.5 * (eps + guided(model_fn, tentative, t_eval, cond, guidance_scale))
        x = _up(x, eps, a, a_next)
        traj.append(x)
        prev = t
    aT = sched.abar(ts[-1])
    noise = (x - aT**0.5 * x0) / (1 - aT) ** 0.5
    return InversionOutput(x, noise, traj)
