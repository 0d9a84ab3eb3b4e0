"""FLUX.1 (dev / schnell): ``FluxTransformer2DModel`` on 2x2-packed latents, rectified flow.

    x_t    = (1 - sigma) * x0 + sigma * eps          (x0: VAE latents [B,16,h,w], (z - 0.1159) * 0.3611)
    target = eps - x0                                (examples/dreambooth/train_dreambooth_lora_flux.py)

The loop keeps the family-independent layout ``[B,C,h,w]``; packing happens inside :meth:`predict`:
``_pack_latents`` turns ``[B,C,h,w]`` into ``[B, h/2*w/2, 4C]`` tokens with position ids
``[0, row, col]`` per 2x2 patch (``pipeline_flux.py`` ``_pack_latents``/``_prepare_latent_image_ids``),
the transformer's output is unpacked back, so per-sample errors (a mean over every non-batch dim) are
those of the packed computation (a permutation of the same numbers).

Conditioning: CLIP-L gives only the pooled vector ``[B,768]``, T5-XXL the sequence ``[B,L,4096]``
(``encode_prompt``); text position ids are zeros ``[L,3]``. The transformer takes ``timestep = sigma``
in [0,1] (it multiplies by 1000 itself) and, for dev, the distilled guidance scale ``[B]`` (also
multiplied inside); schnell has no guidance embedding and gets ``None``.

Training timesteps follow the diffusers script: ``sigma = scheduler.sigmas[floor(u * 1000)]`` with
``u`` uniform (``--weighting_scheme none``) on the scheduler's *training* grid. FLUX-dev ships
``use_dynamic_shifting=True``, whose training grid is unshifted (the shift depends on the image size
and is applied only at ``set_timesteps``), so the script trains on uniform sigma. Sampling uses the
resolution-dependent shift: :func:`calculate_mu` and :meth:`FluxAdapter.sampling_sigmas` give the
sigmas the pipeline steps through, which online methods evaluating rollout timesteps must use
(``set_timesteps(n)`` alone raises under dynamic shifting: it needs ``mu``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .sd3 import SD3Adapter

FLUX_LORA_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
"""``train_dreambooth_lora_flux.py``'s default ``--lora_layers``: double blocks' joint attention and
both MLPs, single blocks' q/k/v (not their ``proj_mlp``/``proj_out``)."""


def pack_latents(x: Tensor) -> Tensor:
    """``[B,C,h,w]`` -> ``[B, h/2*w/2, 4C]``: each 2x2 patch becomes one token, channel-major within
    it (``FluxPipeline._pack_latents``)."""
    B, C, h, w = x.shape
    x = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents`: ``[B, h/2*w/2, 4C]`` -> ``[B,C,h,w]``."""
    B, _, D = x.shape
    x = x.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, h/2, 2, w/2, 2]
    return x.reshape(B, D // 4, h, w)


def image_ids(h: int, w: int, device: torch.device | None = None) -> Tensor:
    """Position ids ``[h/2*w/2, 3]`` of the packed tokens: ``[0, row, col]`` of each 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def calculate_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The dynamic-shift exponent, linear in the packed token count (``pipeline_flux.py``
    ``calculate_shift``): 0.5 at 256 tokens (256 px), 1.15 at 4096 (1024 px)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def check_even(h: int, w: int, family: str) -> None:
    if h % 2 or w % 2:
        raise ValueError(
            f"{family}: latent size {h}x{w} must be even (2x2 packing); use an image size divisible by 16"
        )


class FluxAdapter(SD3Adapter):
    family = "flux"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_sequence_length = 512  # T5 tokens (dev's pipeline default); set by the loader
        self.guidance_scale = 3.5
        """Distilled guidance fed to dev while training (the diffusers script's ``--guidance_scale``
        default, and the pipeline's sampling default); ignored by schnell."""

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        p = list(prompts)
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=p,
            prompt_2=p,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}  # [B,L,D_t5], [B,D_clip]

    def guidance(self, n: int, device: torch.device) -> Tensor | None:
        """``[n]`` distilled guidance for dev, ``None`` for schnell (no guidance embedding)."""
        if not self.denoiser.config.guidance_embeds:
            return None
        return torch.full((n,), self.guidance_scale, device=device, dtype=torch.float32)

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
        text = cond["prompt_embeds"].to(x_t.dtype)
        out = transformer(
            hidden_states=pack_latents(x_t),  # [B, h/2*w/2, 4C]
            timestep=(t.float() / self.num_train_timesteps).to(x_t.device, x_t.dtype),  # sigma; x1000 inside
            guidance=self.guidance(B, x_t.device),
            pooled_projections=cond["pooled"].to(x_t.dtype),
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=image_ids(h, w, x_t.device).to(x_t.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def sampling_sigmas(self, num_steps: int, h: int, w: int) -> Tensor:
        """The sigmas ``FluxPipeline`` steps through for latents ``h x w`` (pixels / 8):
        ``linspace(1, 1/n, n)`` shifted by ``sigma' = e^mu / (e^mu + 1/sigma - 1)`` with the resolution's
        ``mu`` (dynamic shifting) or the scheduler's static shift; a final 0 appended (``[n+1]``)."""
        return flow_sampling_sigmas(self.pipe.scheduler, num_steps, (h // 2) * (w // 2))


def flow_sampling_sigmas(scheduler: object, num_steps: int, image_seq_len: int) -> Tensor:
    """What a dynamic-shift flow pipeline (FLUX, Qwen-Image) passes to ``set_timesteps``, on a copy of
    its scheduler: ``sigmas = linspace(1, 1/n, n)`` and ``mu`` from the scheduler config."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = scheduler.config  # type: ignore[attr-defined]
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    mu = calculate_mu(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    sched.set_timesteps(sigmas=sigmas, mu=mu if cfg.get("use_dynamic_shifting") else None)
    return sched.sigmas.float()


def shift_sigma(sigma: Tensor, mu: float) -> Tensor:
    """The exponential time shift ``e^mu / (e^mu + 1/sigma - 1)`` (``time_shift`` in the scheduler)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
