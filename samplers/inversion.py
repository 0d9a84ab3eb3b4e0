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


def ddim_invert(
    model_fn: ModelFn,
    x0: Tensor,
    timesteps: list[int] | Tensor,
    cond: Any,
    sched: NoiseSchedule,
    guidance_scale: float = 1.0,
    renoise_steps: int = 0,
) -> InversionOutput:
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


def inversion_grid(num_train_timesteps: int, steps: int, steps_offset: int = 0) -> list[int]:
    """``DDIMInverseScheduler.set_timesteps(steps)`` with "leading" spacing: ascending
    ``[0, r, 2r, ...] + steps_offset`` with ``r = T // steps`` (SD1.5: offset 1 -> 1, 101, ..., 901)."""
    r = num_train_timesteps // steps
    return [i * r + steps_offset for i in range(steps)]


def _take(cond: Any, idx: Tensor) -> Any:
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[idx]
    if isinstance(cond, dict):
        return {k: _take(v, idx) for k, v in cond.items()}
    if isinstance(cond, tuple | list):
        return type(cond)(_take(v, idx) for v in cond)
    return cond


def invert_per_sample(
    model_fn: ModelFn,
    x0: Tensor,
    t: Tensor,
    grid: list[int],
    cond: Any,
    sched: NoiseSchedule,
    renoise_steps: int = 0,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """Invert each latent up the ascending ``grid`` to just below its *own* timestep ``t[i]``.

    InPO/SmPO (``train.py:990-1024``) invert the batch over the grid points ``< t``, then use
    ``abar_t`` of the sampled t for the implied noise. The official code reads only ``t[0]`` (correct
    for batch size 1); here every sample stops at its own t, so any batch size works: at each grid
    point the samples still below their t run one forward together, the others wait.

    Each step goes from the previous grid point (the clean latent, at ``final_alpha_cumprod``, for
    the first) to the grid point, evaluating the model at the current latent with the *target*
    timestep, exactly ``DDIMInverseScheduler.step``. ``renoise_steps`` adds ReNoise refinements
    (SmPO: 1). ``eta > 0`` adds ``eta * N(0, I) * sigma`` after each step, sigma^2 the DDIM
    variance of the step from the next grid point back down to this one (InPO's
    ``inversion_eta = 0.1``; its ``_get_variance(t + r, t)``, with the index clamped to T - 1
    where the official code would read past the schedule). Noise comes from one generator per
    sample (CPU), so results do not depend on batch composition.

    Returns ``(x_inv [N,...], eps* [N,...])`` with ``eps* = (x_inv - sqrt(abar_t) x0) / sqrt(1 - abar_t)``.
    """
    if sched.prediction_type != "epsilon":
        raise ValueError("inversion is implemented for epsilon-prediction models")
    if eta > 0 and (generators is None or len(generators) != x0.shape[0]):
        raise ValueError("eta > 0 needs one generator per sample")
    T = len(sched.alphas_cumprod)
    r = grid[1] - grid[0] if len(grid) > 1 else T
    t = t.to(x0.device).long()
    x = x0.clone()
    prev = -1
    for g in grid:
        idx = (t > g).nonzero().flatten()
        if idx.numel() == 0:
            break  # ascending grid: nobody is below a later point either
        xa = x[idx]
        a, a_next = sched.abar(prev), sched.abar(g)
        tg = torch.full((idx.numel(),), g, device=x.device, dtype=torch.long)
        ca = _take(cond, idx)
        eps = model_fn(xa, tg, ca)
        for _ in range(renoise_steps):
            eps = 0.5 * (eps + model_fn(_up(xa, eps, a, a_next), tg, ca))
        xa = _up(xa, eps, a, a_next)
        if eta > 0:
            hi = min(g + r, T - 1)
            a_hi = sched.abar(hi)
            sigma = ((1 - a_next) / (1 - a_hi) * (1 - a_hi / a_next)) ** 0.5
            noise = torch.stack([torch.randn(x0.shape[1:], generator=generators[int(i)]) for i in idx]).to(
                x.device, x.dtype
            )
            xa = xa + eta * sigma * noise
        x = x.index_copy(0, idx, xa.to(x.dtype))
        prev = g
    ab = sched.alphas_cumprod.to(x.device)[t].to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    return x, (x - ab.sqrt() * x0) / (1 - ab).sqrt()
