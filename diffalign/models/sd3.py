"""SD3-style models: ``SD3Transformer2DModel`` (MMDiT) trained with rectified flow matching; SD3-Medium,
SD3.5-Medium and SD3.5-Large share the pipeline, the scheduler (static shift 3) and this adapter.

    x_t    = (1 - sigma) * x0 + sigma * eps
    target = eps - x0                        (the velocity the transformer predicts)

sigma is read from the scheduler's *shifted* grid (``FlowMatchEulerDiscreteScheduler.sigmas``,
shift 3 for SD3), at an index drawn logit-normally by default (``u = sigmoid(N(0,1))``,
``idx = floor(u * 1000)``), as in flow_grpo ``scripts/train_sd3_dpo.py``. No loss weighting
(both public flow-DPO implementations use none). ``t = sigma * num_train_timesteps`` is what
the transformer receives, exactly as in the pipeline.

SD3.5 adds RMS qk-norm (inside the attention, nothing to adapt) and, on 3.5-Medium, an image-only
self-attention ``attn2`` in the first 13 blocks (``dual_attention_layers``). The diffusers script's
LoRA list (``attn.to_q`` ...) never matches ``attn2.*``, so those layers stay frozen unless listed:
:data:`SD35_LORA_TARGETS` lists them. diffalign's default ``to_q, to_k, to_v, to_out.0`` (suffix
match) covers ``attn`` and ``attn2`` alike. Skip-layer guidance is sampling-only and left off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter

SD3_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
"""``train_dreambooth_lora_sd3.py``'s default (also flow_grpo's and DiffusionNFT's): joint attention,
image and text streams."""
SD35_LORA_TARGETS = [*SD3_LORA_TARGETS, "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
"""The same plus SD3.5-Medium's dual-attention layers (``attn2``, image tokens only)."""


class SD3Adapter(Adapter):
    family = "sd3"
    denoiser_name = "transformer"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_sequence_length = 256  # T5 tokens; set from ModelConfig by the loader
        # the training grid: timesteps = shifted sigmas * T, descending from ~T to ~1
        self.grid_timesteps = self.noise_scheduler.timesteps.float().cpu()

    def sample_timestep(self, generator: torch.Generator) -> Tensor:
        n = len(self.grid_timesteps)
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn((), generator=generator))
        else:
            u = torch.rand((), generator=generator)
        idx = (u * n).long().clamp(0, n - 1)
        return self.grid_timesteps[idx]

    def sigma(self, t: Tensor, ndim: int) -> Tensor:
        s = t.float() / self.num_train_timesteps
        return s.reshape(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        s = self.sigma(t, x0.ndim).to(x0.device)
        return (1.0 - s) * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def sampling_sigmas(self, num_steps: int, h: int, w: int) -> Tensor:
        """The sigmas the pipeline steps through for latents ``h x w`` in ``num_steps`` steps (``[n+1]``,
        final 0): ``StableDiffusion3Pipeline`` calls ``set_timesteps(n)`` on its static-shift scheduler.
        FLUX and Qwen-Image override this with their resolution-dependent shift; online methods sample
        flow rollouts on it."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(num_steps)
        return sched.sigmas.float()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        p = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=p,
            prompt_2=p,
            prompt_3=p,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}

    def predict(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Tensor],
        micro: Tensor | None = None,
        model: nn.Module | None = None,
    ) -> Tensor:
        transformer = model if model is not None else self.denoiser
        return transformer(
            hidden_states=x_t,
            timestep=t.to(x_t.device),
            encoder_hidden_states=cond["prompt_embeds"].to(x_t.dtype),
            pooled_projections=cond["pooled"].to(x_t.dtype),
            return_dict=False,
        )[0]
