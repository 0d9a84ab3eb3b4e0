"""One call that samples any supported pipeline: images, video clips or audio clips.

    media = generate_media(pipe, prompts, k, seeds, steps, guidance)   # len(prompts) * k arrays, prompt-major

Images come back as uint8 ``[H, W, 3]``, clips as uint8 ``[F, H, W, 3]``, audio as float32 ``[S]``
in [-1, 1]. Each output has its own generator seeded from ``seeds`` (one per output), so an
output does not depend on the batch it was drawn in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.media import Modality

VIDEO_PIPELINES = ("AnimateDiffPipeline", "TextToVideoSDPipeline", "WanPipeline")
AUDIO_PIPELINES = ("AudioLDMPipeline", "TokenAudioLDMPipeline")


def pipeline_modality(pipe: Any) -> Modality:
    name = type(pipe).__name__
    return "video" if name in VIDEO_PIPELINES else "audio" if name in AUDIO_PIPELINES else "image"


def sample_rate(pipe: Any) -> int | None:
    """The waveform rate of an audio pipeline (its vocoder's), else None."""
    voc = getattr(pipe, "vocoder", None)
    return int(voc.config.sampling_rate) if voc is not None else None


def _uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def generate_media(
    pipe: Any, prompts: list[str], k: int, seeds: list[int], steps: int, guidance: float, **call_kw: Any
) -> list[np.ndarray]:
    """``k`` samples per prompt, prompt-major; ``seeds`` has one entry per sample."""
    if len(seeds) != len(prompts) * k:
        raise ValueError(f"need {len(prompts) * k} seeds, got {len(seeds)}")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    name = type(pipe).__name__
    kw: dict[str, Any] = {
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "generator": gens,
        **call_kw,
    }
    if name == "QwenImagePipeline":
        # no distilled guidance: the scale is true CFG (`true_cfg_scale`), which runs only with a
        # negative prompt (" ", as the pipeline's docs suggest) and rescales to the conditional norm
        kw.update(guidance_scale=None, true_cfg_scale=guidance)
        if guidance > 1:
            kw.setdefault("negative_prompt", [" "] * len(prompts))
    with torch.inference_mode():
        if name in VIDEO_PIPELINES:
            # TextToVideoSD makes one video per prompt, and AnimateDiff checks a generator list against
            # the prompt count alone: repeat the prompts instead of asking for k per prompt
            frames = pipe([p for p in prompts for _ in range(k)], output_type="np", **kw).frames
            return list(_uint8(np.asarray(frames)))
        if name in AUDIO_PIPELINES:
            audios = pipe(prompts, num_waveforms_per_prompt=k, output_type="np", **kw).audios
            return list(np.clip(np.asarray(audios, dtype=np.float32), -1, 1))
        return list(_uint8(pipe(prompts, num_images_per_prompt=k, output_type="np", **kw).images))
