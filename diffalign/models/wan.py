"""Wan2.1 text-to-video: ``WanTransformer3DModel`` on causal 3-D VAE latents, rectified flow.

Clips ``[B, F, 3, H, W]`` in [-1, 1] (F = 1 + 4k frames: the VAE keeps the first frame and folds
every following 4 into one latent frame) -> latents ``[B, 16, 1 + (F-1)/4, H/8, W/8]`` normalised per
channel, ``(z - latents_mean) / latents_std`` (``pipeline_wan.py`` inverts exactly this before
decoding). Per-sample errors are means over (C, F', h, w).

    x_t    = (1 - sigma) * x0 + sigma * eps
    target = eps - x0                              (finetrainers ``models/wan/base_specification.py``)
    timestep passed to the transformer = sigma * 1000 (raw, as ``WanPipeline`` passes it)

diffusers ships no Wan training script. Timesteps follow DanceGRPO (``train_grpo_wan_2_1.py``) and
the pipeline's own scheduler: sigma on a 1000-point grid with the *static* shift
``sigma' = s * sigma / (1 + (s - 1) * sigma)`` of the checkpoint's ``flow_shift`` (3.0 for T2V at
480p; 5.0 is recommended for 720p), drawn uniformly by default (finetrainers' ``none`` weighting).
The grid is ``FlowMatchEulerDiscreteScheduler(shift=flow_shift).timesteps``, the same grid SD3's
adapter draws from. Conditioning: UMT5 token states ``[B, L, 4096]``, padded to ``L`` with zeros (not
masked) past each prompt's length, exactly as ``WanPipeline.encode_prompt``; no pooled vector; true
CFG at sampling only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ConfigError
from .sd3 import SD3Adapter

WAN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
"""Self- (``attn1``) and cross-attention (``attn2``) projections plus the FFN (Flow-Factory's
``wan2_t2v.py`` list); flow_grpo's list (``add_*``) hits only q/k/v/out on T2V and leaves the FFN
frozen (flow_grpo#103)."""


def latent_stats(vae: nn.Module, z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel latent mean and std ``[1,C,1,1,1]`` of a Wan-style VAE (Wan2.1, Qwen-Image), in
    ``z``'s device and dtype: latents are normalised as ``(z - mean) / std``."""
    cfg = vae.config
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(shape)
    std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(shape)
    return mean, std


class WanAdapter(SD3Adapter):
    family = "wan"
    modality = "video"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_sequence_length = 512  # UMT5 tokens (the pipeline's __call__ default); set by the loader

    @torch.no_grad()
    def encode_images(self, clips: Tensor) -> Tensor:
        """``[B, F, 3, H, W]`` in [-1, 1] -> normalised latents ``[B, 16, 1 + (F-1)/4, H/8, W/8]``
        (posterior mean, like every adapter here)."""
        if clips.ndim != 5:
            raise ValueError(f"wan: expected clips [B,F,3,H,W], got shape {tuple(clips.shape)}")
        F = clips.shape[1]
        tf = self.vae.config.scale_factor_temporal
        if (F - 1) % tf:
            raise ConfigError(
                f"wan: clips have {F} frames; the Wan VAE needs 1 + {tf}k frames (1, 5, 9, ..., 81): "
                "trim the clips in the data"
            )
        vae = self.vae
        x = clips.permute(0, 2, 1, 3, 4).to(device=vae.device, dtype=vae.dtype)  # [B, 3, F, H, W]
        z = vae.encode(x).latent_dist.mode()
        mean, std = latent_stats(self.vae, z)
        return ((z - mean) / std).float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Inverse of :meth:`encode_images`: ``[B, 16, F', h, w]`` -> clips ``[B, F, 3, H, W]`` in [0, 1]."""
        vae = self.vae
        z = latents.to(device=vae.device, dtype=vae.dtype)
        mean, std = latent_stats(self.vae, z)
        video = vae.decode(z * std + mean).sample.float()  # [B, 3, F, H, W]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"prompt_embeds": embeds.float()}  # [B, L, D], zeros past each prompt

    def predict(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Tensor],
        micro: Tensor | None = None,
        model: nn.Module | None = None,
    ) -> Tensor:
        transformer = model if model is not None else self.denoiser
        h, w = x_t.shape[-2:]
        if h % 2 or w % 2:  # the (1,2,2) patch embedding would silently drop the last row / column
            raise ValueError(f"wan: latent size {h}x{w} must be even; use a frame size divisible by 16")
        return transformer(
            hidden_states=x_t,  # [B, 16, F', h, w]
            timestep=t.to(x_t.device),  # sigma * 1000, as the pipeline passes it
            encoder_hidden_states=cond["prompt_embeds"].to(x_t.dtype),
            return_dict=False,
        )[0]
