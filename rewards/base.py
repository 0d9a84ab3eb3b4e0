"""The reward contract: images ``[B,3,H,W]`` float in [0,1] plus prompts -> one score per image.

Higher is better. Device and dtype are constructor arguments, heavy imports happen inside the
constructor, scoring runs batched under ``torch.inference_mode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffalign.errors import ConfigError
from diffalign.registry import Registry

REWARDS: Registry[type] = Registry("reward")


@dataclass
class RewardOutput:
    scores: Tensor
    """Shape [B], float32, on the CPU."""
    sub: dict[str, Tensor] = field(default_factory=dict)
    """Optional named sub-scores, each [B]."""


def check_inputs(images: Tensor, prompts: list[str] | tuple[str, ...]) -> None:
    """One-line errors for the usual mistakes (uint8 or [-1,1] images, HWC layout, count mismatch)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(f"reward input: images must be a [B,3,H,W] tensor, got {shape}")
    if not images.is_floating_point():
        raise ConfigError(f"reward input: images must be float in [0,1], got dtype {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ConfigError(f"reward input: images must be in [0,1], got values in [{lo:.3f}, {hi:.3f}] (convert from [-1,1] with x/2+0.5)")
    if len(prompts) == 0:
        raise ConfigError("reward input: the prompt list is empty")
    if len(prompts) != images.shape[0]:
        raise ConfigError(f"reward input: {images.shape[0]} images but {len(prompts)} prompts")


def batched(fn, images: Tensor, prompts: list[str], batch_size: int) -> Tensor:
    out = [fn(images[i : i + batch_size], list(prompts[i : i + batch_size])) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out).float().cpu()
