"""The adapter interface: everything the training loop and objectives need from a model family.

Objectives only ever see per-sample errors, so the family differences (epsilon / v / flow
targets, SDXL micro-conditioning, SD3 pooled projections, latent scaling) live here:

    cond   = adapter.encode_prompts(prompts)             # dict of tensors, leading dim B
    x0     = adapter.encode_images(pixels)                # pixels [B,3,H,W] in [-1,1] -> latents
    t      = adapter.sample_timestep(generator)           # one draw per sample (reproducible)
    x_t    = adapter.add_noise(x0, noise, t)
    target = adapter.target(x0, noise, t)                 # eps, v, or flow velocity eps - x0
    pred   = adapter.predict(x_t, t, cond, micro)         # micro: SDXL size/crop ids [B,6]
    err    = per_sample_error(pred, target)               # [B], mean over every non-batch dim
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

Family = Literal["sd", "sdxl", "sd3", "animatediff", "text2video", "audioldm", "flux", "wan", "qwenimage"]
Modality = Literal["image", "video", "audio"]
PredictionType = Literal["epsilon", "v_prediction", "flow_matching"]


def per_sample_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample over all non-batch dims, in fp32: ``[B, ...] -> [B]``.

    The mean (not the sum) is the convention of every official implementation except SimpleTuner;
    beta values in configs assume it."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


class Adapter:
    """Shared plumbing; each family module subclasses it with its own encode/predict.

    Attributes:
        pipe: the diffusers pipeline (holds the VAE, text encoders, tokenizers, denoiser).
        denoiser: ``pipe.unet`` or ``pipe.transformer``: the module that trains.
        prediction_type: what ``target`` returns and the denoiser predicts.
    """

    family: Family
    modality: Modality = "image"
    """What ``encode_images`` takes: images ``[B,3,H,W]``, clips ``[B,F,3,H,W]`` or waveforms ``[B,S]``."""
    denoiser_name: Literal["unet", "transformer"] = "unet"

    def __init__(
        self,
        pipe: Any,
        noise_scheduler: Any,
        prediction_type: PredictionType,
        timestep_sampling: Literal["uniform", "logit_normal"] = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> None:
        self.pipe = pipe
        self.noise_scheduler = noise_scheduler
        self.prediction_type = prediction_type
        self.timestep_sampling = timestep_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.num_train_timesteps: int = int(noise_scheduler.config.num_train_timesteps)

    # -- modules -------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @denoiser.setter
    def denoiser(self, module: nn.Module) -> None:
        setattr(self.pipe, self.denoiser_name, module)

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the loop holds (``[B,C,h,w]``, what ``encode_images`` returns and
        samplers start from); the denoiser's input channels unless it packs patches (FLUX, Qwen-Image)."""
        return int(self.denoiser.config.in_channels)

    def frozen_modules(self) -> list[nn.Module]:
        """Text encoders and VAE: never trained, cast to the mixed-precision dtype."""
        names = ["vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
        return [m for n in names if (m := getattr(self.pipe, n, None)) is not None]

    def to(
        self,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        denoiser_dtype: torch.dtype | None = None,
    ) -> Adapter:
        """Frozen parts to ``dtype``; the denoiser to ``denoiser_dtype`` (None: as loaded), cast tensor
        by tensor on the way, so the device never holds a copy in the loaded precision."""
        for m in self.frozen_modules():
            m.to(device=device, dtype=dtype)
        self.denoiser.to(device=device, dtype=denoiser_dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    # -- latents -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """``[B,3,H,W]`` in [-1,1] -> scaled latents ``[B,C,H/8,W/8]`` (posterior mean: deterministic,
        so cached and uncached training see the same latents; the scripts' ``.sample()`` differs by
        the posterior std, ~1e-3 of the latent scale for SD VAEs)."""
        vae = self.vae
        x = pixels.to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(x).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def encode_chunked(self, pixels: Tensor, chunk: int = 8) -> Tensor:
        """``encode_images`` over ``chunk`` images (or clips) at a time: the VAE encoder's
        full-resolution activations are the data path's memory peak, linear in how many it sees at
        once (SD1.5's VAE at half width, 256 px: +1.26 GiB for 16 images, +0.72 GiB for 8)."""
        return torch.cat([self.encode_images(c) for c in pixels.split(chunk)])

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Inverse of ``encode_images``; returns images ``[B,3,H,W]`` in [0,1]."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
        return (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)

    # -- noise / timesteps / targets (DDPM families; sd3 overrides) ------------------------
    def sample_timestep(self, generator: torch.Generator) -> Tensor:
        """One training timestep (scalar tensor) drawn from ``generator`` (CPU)."""
        T = self.num_train_timesteps
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn((), generator=generator))
            return (u * T).long().clamp(0, T - 1)
        return torch.randint(0, T, (), generator=generator)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.noise_scheduler.add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(x0, noise, t)

    # -- conditioning ----------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Tensor],
        micro: Tensor | None = None,
        model: nn.Module | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def default_micro(self, n: int, height: int, width: int) -> Tensor:
        """Size/crop ids ``[n,6]`` = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) for
        images that were not cropped (only SDXL uses them)."""
        return torch.tensor([[height, width, 0, 0, height, width]] * n, dtype=torch.float32)

    # -- loader for the denoiser alone (full fine-tuning export / reload) -----------------
    def denoiser_class(self) -> type:
        return type(self.denoiser)
