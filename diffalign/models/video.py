"""Text-to-video latent diffusion: ``UNet3DConditionModel`` (ModelScope / ``TextToVideoSDPipeline``)
and AnimateDiff's ``UNetMotionModel`` (``AnimateDiffPipeline``), both epsilon/v DDPM models on
frame-wise VAE latents with one CLIP text encoder.

Clips are the "images" of this family: ``[B, F, 3, H, W]`` in [-1, 1] -> latents
``[B, C, F, h, w]`` (each frame through the image VAE, as both pipelines decode). Per-sample errors
are means over (C, F, h, w); winner and loser clips share noise and timestep like images, so
every objective applies unchanged. The two denoisers differ in one calling detail:
``UNet3DConditionModel`` repeats the text embedding over frames itself, ``UNetMotionModel``
expects it already repeated (``[B*F, L, D]``, as ``AnimateDiffPipeline`` passes it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter


class VideoAdapter(Adapter):
    family = "animatediff"
    modality = "video"

    @torch.no_grad()
    def encode_images(self, clips: Tensor) -> Tensor:
        """``[B, F, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, C, F, h, w]``."""
        if clips.ndim != 5:
            raise ValueError(f"expected clips [B,F,3,H,W], got shape {tuple(clips.shape)}")
        B, F = clips.shape[:2]
        z = super().encode_images(clips.flatten(0, 1))  # [B*F, C, h, w]
        return z.unflatten(0, (B, F)).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """``[B, C, F, h, w]`` -> clips ``[B, F, 3, H, W]`` in [0, 1]."""
        B, _, F = latents.shape[:3]
        x = super().decode_latents(latents.permute(0, 2, 1, 3, 4).flatten(0, 1))
        return x.unflatten(0, (B, F))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"prompt_embeds": embeds.float()}  # [B, L, D]

    def predict(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Tensor],
        micro: Tensor | None = None,
        model: nn.Module | None = None,
    ) -> Tensor:
        unet = model if model is not None else self.denoiser
        ehs = cond["prompt_embeds"].to(x_t.dtype)
        if self.family == "animatediff":
            ehs = ehs.repeat_interleave(x_t.shape[2], 0)  # one copy per frame, frame-major within a clip
        return unet(x_t, t, encoder_hidden_states=ehs, return_dict=False)[0]


class TextToVideoAdapter(VideoAdapter):
    family = "text2video"
