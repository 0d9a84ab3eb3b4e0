"""The sampler calling convention and the pieces every sampler shares.

    sample(model_fn, x_T, timesteps, cond, guidance_scale=1.0, eta=0.0, generator=None,
           return_trajectory=False, return_log_probs=False) -> SampleOutput

``model_fn(x [N,...], t [N], cond) -> prediction [N,...]`` is the raw network (eps, v or flow
velocity, per the sampler). With ``guidance_scale != 1`` pass ``cond=(uncond, cond)``: the sampler
runs both halves in one forward and combines them as ``u + g * (c - u)`` (classifier-free guidance).
Conditioning may be a tensor or a dict of tensors (batch first). Samplers never wrap themselves in
``torch.no_grad``: callers decide (SPO and GRPO need gradients through log-probs).

Per-step log-probs are Gaussian log densities of the sampled transition, *averaged* over all
non-batch dimensions (the ddpo/D3PO/SPO/Flow-GRPO convention), shape ``[B]`` per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]


@dataclass
class SampleOutput:
    sample: Tensor
    """The final sample ``[B,...]``."""
    trajectory: list[Tensor] = field(default_factory=list)
    """``[x_T, x_{t_1}, ..., x_0]`` when requested (len = steps + 1)."""
    log_probs: list[Tensor] = field(default_factory=list)
    """Per step ``[B]``: log p(x_prev | x_t), mean over non-batch dims (empty for deterministic steps)."""


def _cat_cond(u: Any, c: Any) -> Any:
    if isinstance(u, dict):
        return {k: torch.cat([u[k], c[k]]) for k in u}
    return torch.cat([u, c])


def guided(
    model_fn: ModelFn, x: Tensor, t: Tensor, cond: Any, guidance_scale: float, detach_uncond: bool = False
) -> Tensor:
    """One (possibly classifier-free guided) prediction; both halves go through one forward of the
    doubled batch (two forwards with ``detach_uncond``).
    ``cond`` is an ``(uncond, cond)`` pair, or the conditioning alone when ``guidance_scale`` is 1
    (a pair is accepted there too: only its conditional half is run).

    ``detach_uncond``: no gradient through the unconditional prediction (Flow-GRPO's train-time CFG,
    flow_grpo ``scripts/train_sd3.py:190``). The uncond half then runs as its own forward under
    ``no_grad``: training neither stores its activations nor runs its backward (a third of a trained
    step's compute) at the price of one more call, which only pays off when compute, not per-call
    overhead, dominates (tiny toy models: slower). Without a gradient (sampling) the flag changes
    nothing but the call count, so samplers leave it off."""
    tt = t.expand(x.shape[0]) if t.ndim == 0 else t
    if guidance_scale == 1.0:
        return model_fn(x, tt, cond[1] if isinstance(cond, tuple) else cond)
    uncond, c = cond
    if detach_uncond:
        with torch.no_grad():
            pred_u = model_fn(x, tt, uncond)
        return pred_u + guidance_scale * (model_fn(x, tt, c) - pred_u)
    pred_u, pred_c = model_fn(torch.cat([x, x]), torch.cat([tt, tt]), _cat_cond(uncond, c)).chunk(2)
    return pred_u + guidance_scale * (pred_c - pred_u)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """log N(x; mean, std^2) averaged over non-batch dims -> ``[B]``."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def randn_like(x: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Noise drawn on the CPU from ``generator`` (or one generator per sample), moved to x's device."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator]).to(x.device, x.dtype)
    return torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
