"""SDXL-style models: two CLIP text encoders, pooled text embeddings and micro-conditioning.

``add_time_ids`` are built per image from its real original size and crop offset
(``original_h, original_w, crop_top, crop_left, target_h, target_w``), the diffusers DPO port's
fix (PR #6668); the loser of a pair is resized to the winner's size first, so both share one row.
The official Salesforce script hard-codes ``(res, res, 0, 0, res, res)`` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter


class SDXLAdapter(Adapter):
    family = "sdxl"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}  # [B,77,D1+D2], [B,P]

    def predict(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Tensor],
        micro: Tensor | None = None,
        model: nn.Module | None = None,
    ) -> Tensor:
        if micro is None:
            f = self.pipe.vae_scale_factor
            micro = self.default_micro(x_t.shape[0], x_t.shape[-2] * f, x_t.shape[-1] * f)
        added = {"text_embeds": cond["pooled"].to(x_t.dtype), "time_ids": micro.to(x_t.device, x_t.dtype)}
        unet = model if model is not None else self.denoiser
        return unet(
            x_t,
            t,
            encoder_hidden_states=cond["prompt_embeds"].to(x_t.dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
