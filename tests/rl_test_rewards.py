"""Deterministic toy rewards for the rollout tests, registered on import (in the test process and,
by module name, in a reward process: ``rewards.process`` imports every named reward's module).

- ``pixel_mean_test``: the mean pixel value (float images) or mean byte / 255 (uint8 images).
- ``flat_circles_test``: 0.0 for every prompt containing "circle" (a zero-spread group), else the
  mean pixel value: rounds with some zero-advantage groups.
- ``constant_test``: 1.0 for everything: every group of every round has zero spread.
- ``misbehaving_test=MODE``: ``load`` fails at load time (ConfigError), ``raise`` raises a
  ValueError when scoring, ``config`` a ConfigError, ``exit`` ends its process (code 3), ``hang``
  sleeps far past any timeout.
"""

from __future__ import annotations

import os
import time

import torch

from diffalign.errors import ConfigError
from diffalign.rewards.base import REWARDS, RewardOutput


def _mean(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return x.flatten(1).mean(1)  # [B]


@REWARDS.register("pixel_mean_test")
class PixelMean:
    def __init__(self, path: str = "", device: str | torch.device = "cpu") -> None:
        pass

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        return RewardOutput(_mean(images))


@REWARDS.register("flat_circles_test")
class FlatCircles(PixelMean):
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        flat = torch.tensor(["circle" in p for p in prompts])
        return RewardOutput(torch.where(flat, 0.0, _mean(images)))


@REWARDS.register("constant_test")
class Constant(PixelMean):
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        return RewardOutput(torch.ones(images.shape[0]))


@REWARDS.register("misbehaving_test")
class Misbehaving:
    def __init__(self, path: str = "raise", device: str | torch.device = "cpu") -> None:
        if path == "load":
            raise ConfigError("misbehaving_test: cannot load 'load'")
        self.mode = path

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        if self.mode == "raise":
            raise ValueError("boom on image 0\nsecond line")
        if self.mode == "config":
            raise ConfigError("misbehaving_test: prompt not known")
        if self.mode == "exit":
            os._exit(3)
        if self.mode == "hang":
            time.sleep(600)
        return RewardOutput(_mean(images))
