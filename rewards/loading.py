"""Loading rewards from ``name[=path]`` specs and scoring media of any modality: the one home for
what Syn-Pic, labelling, evaluation, online training and the benchmarks share."""

from __future__ import annotations

from typing import Any

import torch

from diffalign.errors import ConfigError

from .base import REWARDS


def check_reward_names(specs: str, key: str) -> None:
    """Every ``name`` of comma-separated ``name[=path]`` specs is a registered reward (checked by
    ``validate``, before any model loads); an unknown one is one error naming ``key``."""
    for spec in (s.strip() for s in specs.split(",")):
        name = spec.partition("=")[0]
        if spec and name not in REWARDS:
            try:
                REWARDS.get(name)  # the registry's message, with close-match suggestions
            except ConfigError as e:
                raise ConfigError(
                    f"{key}: {e} (a reward your own module registers: add --plugin MODULE)"
                ) from None


def load_rewards(
    specs: list[str], device: str | torch.device = "cpu", modality: str | None = None
) -> dict[str, Any]:
    """Reward models from ``name[=path]`` specs; with ``modality`` given, each must score that kind
    of media (one-line error otherwise, before anything is generated)."""
    out = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        cls = REWARDS.get(name)
        kind = getattr(cls, "modality", "image")
        if modality is not None and kind != modality:
            raise ConfigError(
                f"reward {name!r} scores {kind}, but the generators make {modality}; "
                f"choose a {modality} reward ({', '.join(n for n in REWARDS.names() if getattr(REWARDS.get(n), 'modality', 'image') == modality)})"  # noqa: E501 (an f-string expression cannot wrap before Python 3.12)
            )
        key = name if name not in out else f"{name}:{len(out)}"
        out[key] = cls(path, device=device) if path else cls(device=device)
    return out


def score_media(reward: Any, x: torch.Tensor, prompts: list[str], sr: int | None) -> torch.Tensor:
    """Scores ``[N]`` of any reward on its kind of media (audio rewards also take the sample rate)."""
    if getattr(reward, "modality", "image") == "audio":
        return reward(x, prompts, sample_rate=sr).scores
    return reward(x, prompts).scores
