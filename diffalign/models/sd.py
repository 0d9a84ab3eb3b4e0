"""SD1.5 / SD2-style models: ``UNet2DConditionModel`` on VAE latents with one CLIP text encoder.

Prediction type (epsilon or v_prediction) is read from the checkpoint's scheduler config and never
forced (DCPO's script forces epsilon on the v-prediction SD2.1-768; diffalign refuses a mismatch).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter


class SDAdapter(Adapter):
    family = "sd"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        # the pipeline's own encode_prompt: identical conditioning at train and sampling time
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"prompt_embeds": embeds.float()}  # [B, 77, D]

    def predict(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Tensor],
        micro: Tensor | None = None,
        model: nn.Module | None = None,
    ) -> Tensor:
        unet = model if model is not None else self.denoiser
        return unet(x_t, t, encoder_hidden_states=cond["prompt_embeds"].to(x_t.dtype), return_dict=False)[0]
