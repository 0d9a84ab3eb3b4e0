"""Qwen-Image: ``QwenImageTransformer2DModel`` (MMDiT) on 2x2-packed latents, rectified flow, with a
Qwen2.5-VL text encoder.

The VAE (``AutoencoderKLQwenImage``, Wan-style) works on 5-D tensors: an image is a one-frame video
``[B,3,1,H,W]`` -> ``[B,16,1,h,w]``, normalised per channel ``(z - latents_mean) / latents_std``
(``train_dreambooth_lora_qwen_image.py``). The loop sees ``[B,16,h,w]`` (the frame axis squeezed);
:meth:`QwenImageAdapter.predict` packs it like FLUX (``[B, h/2*w/2, 64]``) with
``img_shapes = [(1, h/2, w/2)]`` per sample and unpacks the output.

    x_t = (1 - sigma) * x0 + sigma * eps,  target = eps - x0,  timestep passed = sigma (in [0, 1])

Training sigma: the diffusers script's ``--weighting_scheme none`` on the scheduler's training grid,
which is unshifted because the hub scheduler uses dynamic shifting (sampling-time ``mu`` between 0.5
and 0.9 over 256-8192 tokens, ``shift_terminal`` 0.02): :func:`~diffalign.models.flux.flow_sampling_sigmas`
gives the sampling sigmas. No distilled guidance: the pipeline's ``true_cfg_scale`` runs a negative
prompt and rescales the combined prediction to the conditional norm (sampling only).

Text: the pipeline wraps each prompt in its chat template, runs the language model, keeps the last
hidden states of the real tokens and drops the template's first 34; prompts shorter than the longest
are zero-padded with a 0 mask. The adapter pads every batch to ``max_sequence_length`` tokens (mask 0
past each prompt) so cached conditioning has one shape; the joint attention mask makes padding
invisible to the image tokens (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .flux import check_even, flow_sampling_sigmas, pack_latents, unpack_latents
from .sd3 import SD3Adapter
from .wan import latent_stats

QWEN_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
"""``train_dreambooth_lora_qwen_image.py``'s default: the image stream's attention only (the text
stream's ``add_*_proj``/``to_add_out`` and both MLPs ``img_mlp``/``txt_mlp`` stay frozen)."""


class QwenImageAdapter(SD3Adapter):
    family = "qwenimage"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_sequence_length = 512  # text tokens (the pipeline's __call__ default); set by the loader

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """``[B,3,H,W]`` in [-1,1] -> normalised latents ``[B,16,H/8,W/8]`` (posterior mean)."""
        vae = self.vae
        z = vae.encode(pixels[:, :, None].to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        mean, std = latent_stats(self.vae, z)
        return ((z - mean) / std)[:, :, 0].float()  # [B,16,1,h,w] -> [B,16,h,w]

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.vae
        z = latents[:, :, None].to(device=vae.device, dtype=vae.dtype)
        mean, std = latent_stats(self.vae, z)
        image = vae.decode(z * std + mean).sample[:, :, 0].float()
        return (image / 2 + 0.5).clamp(0, 1)

    def sampling_sigmas(self, num_steps: int, h: int, w: int) -> Tensor:
        """``QwenImagePipeline``'s sigmas for latents ``h x w``: ``linspace(1, 1/n, n)``, dynamic shift with
        ``mu`` of ``(h/2)(w/2)`` tokens (base/max 0.5/0.9 over 256-8192 tokens on the hub config),
        stretched to ``shift_terminal``; a final 0 appended."""
        return flow_sampling_sigmas(self.pipe.scheduler, num_steps, (h // 2) * (w // 2))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, mask = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], device=embeds.device)
        pad = self.max_sequence_length - embeds.shape[1]
        embeds = torch.nn.functional.pad(embeds.float(), (0, 0, 0, pad))  # [B, L, D]
        mask = torch.nn.functional.pad(mask.float(), (0, pad))  # [B, L], 1 on real tokens
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4  # the transformer sees 2x2-packed patches

    def predict(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Tensor],
        micro: Tensor | None = None,
        model: nn.Module | None = None,
    ) -> Tensor:
        transformer = model if model is not None else self.denoiser
        B, _, h, w = x_t.shape
        check_even(h, w, self.family)
        out = transformer(
            hidden_states=pack_latents(x_t),  # [B, h/2*w/2, 64]
            timestep=(t.float() / self.num_train_timesteps).to(x_t.device, x_t.dtype),  # sigma
            encoder_hidden_states=cond["prompt_embeds"].to(x_t.dtype),
            encoder_hidden_states_mask=cond["prompt_mask"].to(x_t.device).long(),
            img_shapes=[[(1, h // 2, w // 2)]] * B,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)
