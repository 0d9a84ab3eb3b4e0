"""DDIM-InPO (Lu et al., "InPO: Inversion Preference Optimization with Reparametrized DDIM for
Efficient Diffusion Model Alignment", CVPR 2025).

Reference implementation: JaydenLyh/InPO@a9cfc4d ``train.py:990-1050`` (method ``ddiminpo``).

Instead of noising each clean latent with random noise, InPO inverts it with DDIM using the
*current* model (no grad, conditional, no CFG) over the grid points of a 10-step
``DDIMInverseScheduler`` below the sampled t, adding ``inversion_eta * sigma * N(0, I)`` after each
step, and regresses the implied noise ``eps* = (x_inv - sqrt(abar_t) x0) / sqrt(1 - abar_t)`` at t
(v-prediction models: the matching velocity ``sqrt(abar_t) eps* - sqrt(1 - abar_t) x0``).
The loss on top is Diffusion-DPO's, same beta convention (``-0.5 * beta``).

Code -> paper: ``x_inv`` -> x_t reparametrised by DDIM inversion; ``eps*`` -> the image-specific
noise; ``beta`` -> beta (official SD1.5 2000 from an SFT init, SDXL 5000).

Deviations (documented bugs of the reference): the official code inverts the whole batch to
``t[0]`` and uses ``abar[t[0]]`` for every sample, so it is only correct at batch size 1; here
every pair inverts to its own t (``samplers.inversion.invert_per_sample``), so any batch size
works. Its eta noise reads ``alphas_cumprod[t + 100]``, which overruns the schedule for t > 899;
we clamp the index. Noise comes from per-image generators seeded by the data position.
Extension: the official code runs epsilon models only; DDIM inversion is equally defined for
v-prediction (SD2.x-768), so v models are accepted, their outputs converted to epsilon exactly as
``DDIMInverseScheduler.step`` does (``epsilon_model``). Flow-matching models are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffalign.errors import ConfigError

from .base import OBJECTIVES, ObjectiveOutput
from .diffusion_dpo import PREFERENCE_METRICS, diffusion_dpo_loss, preference_metrics


def epsilon_model(model_fn: Any, sched: Any, grid: list[int]) -> Any:
    """Wrap a v-prediction ``model_fn`` so DDIM inversion sees epsilon, exactly as diffusers'
    ``DDIMInverseScheduler.step`` (the official stepper) converts v: with ``a`` the noise level of the
    latent being stepped (the previous grid point; ``final_alpha_cumprod`` below the first),
    ``eps = sqrt(a) v + sqrt(1 - a) x``. The network is called at the *target* grid timestep, so the
    level comes from the grid. A ReNoise call (same timestep again, at the tentative latent) is
    converted with the latent the step starts from, as the official loop averages the raw model
    outputs and steps from there; that makes the average of the converted calls equal the
    conversion of the averaged outputs."""
    # one-step grid: the step starts below the grid (final_alpha_cumprod), as in invert_per_sample
    r = grid[1] - grid[0] if len(grid) > 1 else len(sched.alphas_cumprod)
    start: dict[str, Any] = {}  # the current step's timesteps and starting latent

    def fn(x: Tensor, tt: Tensor, c: Any) -> Tensor:
        v = model_fn(x, tt, c)
        if not (start and torch.equal(start["t"], tt)):  # the first call of a new step
            start.update(t=tt.clone(), x=x)
        prev = tt - r  # [N] the level the step starts from
        ac = sched.alphas_cumprod.to(x.device)[prev.clamp_min(0)]
        a = torch.where(prev >= grid[0], ac, torch.full_like(ac, sched.final_alpha_cumprod))
        a = a.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return a.sqrt() * v + (1 - a).sqrt() * start["x"]

    return fn


def inversion_inputs(
    adapter: Any,
    model: torch.nn.Module,
    x0: Tensor,
    cond: dict[str, Tensor],
    micro: Tensor | None,
    seeds: list[int],
    steps: int,
    renoise_steps: int = 0,
    eta: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """InPO/SmPO's replacement for random noising: x0 ``[B,k,C,h,w]`` -> (x_inv, t, target), each
    ``[B*k,...]``. t is drawn per group from the group's generator (as in ordinary noising) and
    shared by its k images; each image gets its own inverted latent and implied noise
    ``eps* = (x_inv - sqrt(abar_t) x0) / sqrt(1 - abar_t)``. The target is ``eps*`` for epsilon models
    and the matching velocity ``sqrt(abar_t) eps* - sqrt(1 - abar_t) x0`` for v-prediction models
    (whose outputs are converted to epsilon for the inversion, see ``epsilon_model``)."""
    import dataclasses

    from diffalign.data.pairs import sample_seed
    from diffalign.samplers.ddim import NoiseSchedule
    from diffalign.samplers.inversion import inversion_grid, invert_per_sample

    if adapter.prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(
            f"inversion objectives (inpo, smpo) need an epsilon- or v-prediction model (DDIM inversion); "
            f"this one predicts {adapter.prediction_type}; on flow models (sd3, flux, qwenimage, wan) use "
            "diffusion_dpo, rankdpo, kto, mapo or sft"
        )
    B, k = x0.shape[:2]
    ts = torch.stack([adapter.sample_timestep(torch.Generator().manual_seed(s)) for s in seeds])
    t = ts.to(x0.device).repeat_interleave(k)  # [B*k]
    sched = NoiseSchedule.from_scheduler(adapter.noise_scheduler)
    grid = inversion_grid(
        adapter.num_train_timesteps, steps, int(getattr(adapter.noise_scheduler.config, "steps_offset", 0))
    )
    gens = (
        [torch.Generator().manual_seed(sample_seed(s, j, domain=2)) for s in seeds for j in range(k)]
        if eta > 0
        else None
    )

    def model_fn(x: Tensor, tt: Tensor, c: Any) -> Tensor:
        return adapter.predict(x, tt, c[0], c[1], model=model).float()

    if sched.prediction_type == "v_prediction":
        model_fn = epsilon_model(model_fn, sched, grid)
        sched = dataclasses.replace(sched, prediction_type="epsilon")
    x0f = x0.flatten(0, 1).float()  # [B*k,C,h,w]
    with torch.no_grad():
        x_inv, eps = invert_per_sample(
            model_fn,
            x0f,
            t,
            grid,
            (cond, micro),
            sched,
            renoise_steps=renoise_steps,
            eta=eta,
            generators=gens,
        )
        target = eps if adapter.prediction_type == "epsilon" else adapter.target(x0f, eps, t)
    return x_inv.to(x0.dtype), t, target.to(x0.dtype)


@OBJECTIVES.register("inpo")
@dataclass(frozen=True)
class InPO:
    """DDIM-InPO: Diffusion-DPO on DDIM-inverted latents and their implied noise."""

    beta: float = 2000.0
    """Official convention (``-0.5 * beta``): 2000 for SD1.5 (from an SFT init), 5000 for SDXL."""
    inversion_steps: int = 10
    """Grid of ``DDIMInverseScheduler.set_timesteps(inversion_steps)``; up to this many extra
    no-grad forwards per step."""
    inversion_eta: float = 0.1

    needs_reference: ClassVar[bool] = True
    kind: ClassVar[str] = "preference"
    source: ClassVar[str] = "dataset"
    terms: ClassVar[str] = "errors"
    noises_inputs: ClassVar[bool] = True
    ref_refresh_every: ClassVar[int] = 0
    winner_only: ClassVar[bool] = False
    per_image_captions: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    reports_margin: ClassVar[bool] = True
    logistic_margin: ClassVar[bool] = True
    reported_metrics: ClassVar[frozenset[str]] = PREFERENCE_METRICS
    renoise_steps: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.beta <= 0 or self.inversion_steps < 1 or self.inversion_eta < 0:
            raise ValueError("need beta > 0, inversion_steps >= 1, inversion_eta >= 0")

    def noised_inputs(
        self,
        adapter: Any,
        model: torch.nn.Module,
        x0: Tensor,
        cond: dict[str, Tensor],
        micro: Tensor | None,
        seeds: list[int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        return inversion_inputs(
            adapter,
            model,
            x0,
            cond,
            micro,
            seeds,
            self.inversion_steps,
            self.renoise_steps,
            self.inversion_eta,
        )

    def __call__(self, policy_err: Tensor, ref_err: Tensor | None, batch: dict[str, Any]) -> ObjectiveOutput:
        assert ref_err is not None, "inpo needs reference errors"
        loss, inside = diffusion_dpo_loss(
            policy_err[:, 0], policy_err[:, 1], ref_err[:, 0], ref_err[:, 1], self.beta
        )
        return ObjectiveOutput(loss, preference_metrics(policy_err, ref_err, inside, self.beta))
