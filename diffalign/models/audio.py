"""Text-to-audio latent diffusion (AudioLDM): ``UNet2DConditionModel`` on VAE latents of log-mel
spectrograms, conditioned through its class embedding on the CLAP text embedding, with a HiFi-GAN
vocoder turning mel frames back into a waveform (Liu et al. 2023; diffusers ``AudioLDMPipeline``).

Waveforms ``[B, S]`` in [-1, 1] are the "images" of this family:

    features = (log(clamp(mel(|STFT(wave)|), floor)) - offset) / scale     # [B, 1, T, n_mels]
    x0       = vae.encode(features).mode() * scaling_factor                  # [B, C, T/f, n_mels/f]

The mel front end is HiFi-GAN's (AudioLDM's ``TacotronSTFT``): reflect padding of
``(n_fft - hop)/2`` on both sides, Hann window, magnitude (not power) STFT, Slaney-normalised
Slaney-scale filters, natural log of the magnitudes clamped at ``floor``. The defaults are
AudioLDM's (16 kHz, n_fft 1024, hop 160, 64 mels, 0-8 kHz, floor 1e-5, no offset/scale); a model
folder may override them in ``diffalign.json`` (``{"mel": {...}}``), as the toy ToneWorld model does.
The pipeline feeds the VAE's output straight to the vocoder, so ``features`` is also the vocoder's
input domain. Per-sample errors are means over (C, T, F), so the DPO conventions carry over.

Text conditioning comes in two kinds, named by ``diffalign.json`` (``"text_conditioning"``):

* ``"pooled"`` (AudioLDM, the default): one L2-normalised CLAP text embedding ``[B, D]`` enters the
  UNet through its class embedding; the attention blocks attend to themselves.
* ``"tokens"`` (Tango's conditioning, Ghosal et al. 2023, github.com/declare-lab/tango, the model
  Tango 2 aligns): the UNet cross-attends to the text encoder's token states ``[B, L, D]``, as
  Stable Diffusion does. A pooled embedding cannot say which event comes first in an order the
  model never heard; token states keep the word order. Such folders load as
  :class:`TokenAudioLDMPipeline`, which differs from ``AudioLDMPipeline`` only in what the UNet
  is given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import AudioLDMPipeline
from torch import Tensor, nn

from .base import Adapter

TextConditioning = Literal["pooled", "tokens"]


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 16000
    n_fft: int = 1024
    hop: int = 160
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 8000.0
    floor: float = 1e-5
    offset: float = 0.0
    scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FILTERS: dict[MelConfig, Tensor] = {}


def mel_filters(cfg: MelConfig) -> Tensor:
    """Slaney filters ``[n_fft/2+1, n_mels]`` (librosa's default ``htk=False, norm='slaney'``)."""
    if cfg not in _FILTERS:
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(
            num_frequency_bins=cfg.n_fft // 2 + 1,
            num_mel_filters=cfg.n_mels,
            min_frequency=cfg.fmin,
            max_frequency=cfg.fmax,
            sampling_rate=cfg.sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        _FILTERS[cfg] = torch.from_numpy(fb).float()
    return _FILTERS[cfg]


def log_mel(wave: Tensor, cfg: MelConfig) -> Tensor:
    """``[B, S]`` waveform -> normalised log-mel features ``[B, S // hop, n_mels]`` (fp32)."""
    if wave.ndim != 2:
        raise ValueError(f"expected waveforms [B, S], got shape {tuple(wave.shape)}")
    pad = (cfg.n_fft - cfg.hop) // 2
    x = F.pad(wave.float().unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(
        x,
        cfg.n_fft,
        cfg.hop,
        cfg.n_fft,
        torch.hann_window(cfg.n_fft, device=x.device),
        center=False,
        return_complex=True,
    ).abs()  # [B, n_fft/2+1, T]
    mel = torch.einsum("bft,fm->btm", spec, mel_filters(cfg).to(spec.device))
    return (torch.log(mel.clamp(min=cfg.floor)) - cfg.offset) / cfg.scale


def _tokens_as_context(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """UNet forward pre-hook: AudioLDMPipeline passes the text conditioning as ``class_labels``;
    a token-conditioned UNet wants it as ``encoder_hidden_states``."""
    kwargs["encoder_hidden_states"] = kwargs.pop("class_labels")
    return args, kwargs


class TokenAudioLDMPipeline(AudioLDMPipeline):
    """``AudioLDMPipeline`` whose UNet cross-attends to the text tokens (Tango-style).

    Everything else (latent shape from the audio length, scheduler loop, guidance, VAE, vocoder,
    output length) is the parent's ``__call__``: only the prompt encoding (token states
    ``[B * n, L, D]`` instead of pooled ``[B * n, D]``) and the UNet keyword it arrives in differ.
    """

    def encode_tokens(self, prompts: list[str], device: torch.device | str) -> Tensor:
        """Prompts -> the text encoder's last hidden states ``[B, L, D]`` (padded to the tokenizer's
        ``model_max_length``, as in training)."""
        enc = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        return self.text_encoder(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state

    def _encode_prompt(
        self,
        prompt,
        device,
        num_waveforms_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
    ):
        if prompt_embeds is not None or negative_prompt_embeds is not None:
            raise ValueError(
                "TokenAudioLDMPipeline encodes prompts itself; "
                "pass prompt (and negative_prompt), not embeddings"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds = self.encode_tokens(prompts, device).repeat_interleave(num_waveforms_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return embeds
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negative) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negative)} entries for {len(prompts)} prompts")
        uncond = self.encode_tokens(negative, device).repeat_interleave(num_waveforms_per_prompt, dim=0)
        return torch.cat([uncond, embeds])  # the parent's order: unconditional half first

    def __call__(self, *args: Any, **kwargs: Any):
        handle = self.unet.register_forward_pre_hook(_tokens_as_context, with_kwargs=True)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            handle.remove()


class AudioLDMAdapter(Adapter):
    family = "audioldm"
    modality = "audio"

    def __init__(self, *args, mel: MelConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mel = mel or MelConfig()

    def frozen_modules(self) -> list[nn.Module]:
        return super().frozen_modules() + [self.pipe.vocoder]

    @torch.no_grad()
    def encode_images(self, waves: Tensor) -> Tensor:
        """Waveforms ``[B, S]`` in [-1, 1] -> scaled latents ``[B, C, T/f, n_mels/f]``."""
        feats = log_mel(waves.to(self.vae.device), self.mel).unsqueeze(1)  # [B,1,T,M]
        z = self.vae.encode(feats.to(self.vae.dtype)).latent_dist.mode()
        return (z * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents -> waveforms ``[B, S]`` through the VAE and the vocoder."""
        z = latents.to(device=self.vae.device, dtype=self.vae.dtype) / self.vae.config.scaling_factor
        mel = self.vae.decode(z).sample.squeeze(1)  # [B,T,M]
        return self.pipe.vocoder(mel.to(self.pipe.vocoder.dtype)).float().clamp(-1, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        if isinstance(self.pipe, TokenAudioLDMPipeline):
            return {
                "encoder_hidden_states": self.pipe.encode_tokens(list(prompts), self.device).float()
            }  # [B, L, D]
        # the pipeline's own encoder: L2-normalised CLAP text embeddings [B, D]
        embeds = self.pipe._encode_prompt(list(prompts), self.device, 1, False)
        return {"class_labels": embeds.float()}

    def predict(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Tensor],
        micro: Tensor | None = None,
        model: nn.Module | None = None,
    ) -> Tensor:
        unet = model if model is not None else self.denoiser
        if "encoder_hidden_states" in cond:
            return unet(
                x_t, t, encoder_hidden_states=cond["encoder_hidden_states"].to(x_t.dtype), return_dict=False
            )[0]
        return unet(
            x_t,
            t,
            encoder_hidden_states=None,
            class_labels=cond["class_labels"].to(x_t.dtype),
            return_dict=False,
        )[0]
