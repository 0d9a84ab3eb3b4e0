"""The reward contract: images ``[B,3,H,W]`` float in [0,1] plus prompts -> one score per image.

Higher is better. Device and dtype are constructor arguments, heavy imports happen inside the
constructor, scoring runs batched under ``torch.inference_mode``.

Audio rewards (class attribute ``modality = "audio"``; image rewards have none, or ``"image"``) take
``(audio [B,S] float in [-1,1], prompts, sample_rate)`` instead and are checked by ``check_audio_inputs``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path

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
    if len(prompts) == 0:
        raise ConfigError("reward input: the prompt list is empty")
    if images.shape[0] == 0:
        raise ConfigError("reward input: the image batch is empty")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ConfigError(
            "reward input: images must be in [0,1], got values in "
            f"[{lo:.3f}, {hi:.3f}] (convert from [-1,1] with x/2+0.5)"
        )
    if len(prompts) != images.shape[0]:
        raise ConfigError(f"reward input: {images.shape[0]} images but {len(prompts)} prompts")


def check_audio_inputs(audio: Tensor, prompts: list[str] | tuple[str, ...], sample_rate: int) -> None:
    """One-line errors for audio rewards: ``audio`` is ``[B,S]`` mono float in [-1,1] at
    ``sample_rate`` Hz."""
    if not isinstance(audio, Tensor) or audio.ndim != 2:
        shape = tuple(audio.shape) if isinstance(audio, Tensor) else type(audio).__name__
        raise ConfigError(
            "reward input: audio must be a [B,S] mono waveform "
            f"tensor, got {shape} (mix or pick channels first)"
        )
    if not audio.is_floating_point():
        raise ConfigError(
            "reward input: audio must be float in [-1,1], got "
            f"dtype {audio.dtype} (int16 PCM: divide by 32768)"
        )
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, numbers.Real)
        or sample_rate <= 0
        or not float(sample_rate).is_integer()
    ):
        raise ConfigError(f"reward input: sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if len(prompts) == 0:
        raise ConfigError("reward input: the prompt list is empty")
    if audio.shape[0] == 0:
        raise ConfigError("reward input: the audio batch is empty")
    if audio.shape[1] == 0:
        raise ConfigError("reward input: the waveforms are empty (0 samples)")
    if not torch.isfinite(audio).all():
        raise ConfigError("reward input: audio holds NaN or inf values")
    lo, hi = float(audio.min()), float(audio.max())
    if lo < -1 - 1e-3 or hi > 1 + 1e-3:
        raise ConfigError(
            "reward input: audio must be in [-1,1], got values "
            f"in [{lo:.3f}, {hi:.3f}] (int16 PCM: divide by 32768)"
        )
    if len(prompts) != audio.shape[0]:
        raise ConfigError(f"reward input: {audio.shape[0]} waveforms but {len(prompts)} prompts")


def batched(fn, images: Tensor, prompts: list[str], batch_size: int) -> Tensor:
    out = [
        fn(images[i : i + batch_size], list(prompts[i : i + batch_size]))
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out).float().cpu()


def hub_file(repo: str, filename: str) -> Path:
    """Download (or find in the cache) one file of a hub repo; ``HF_HUB_OFFLINE=1`` is honoured
    by huggingface_hub. Failures become one line naming the repo, the file and the way out."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # noqa: BLE001  (offline, missing repo, missing file: one message)
        raise ConfigError(
            f"cannot get {filename!r} from hub repo {repo!r} ({type(e).__name__}); "
            f"download it elsewhere and pass the local path"
        ) from None


def is_local(path: str) -> bool:
    """A path the user meant as local (exists, or written like a path rather than a hub id)."""
    return path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") > 1
